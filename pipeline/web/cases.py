"""The case view and what can be done from it: unmask, triage, assign, suppress similar.

Every view of a case is written to the store's audit log *before* the page is rendered (no
audit entry, no page), with whether patient identifiers were shown; so is every unmask,
with the reason the analyst gave.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from functools import partial, wraps
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from pipeline.alerting.records import (
    AlertFilter,
    InvalidTransition,
    StoredAlert,
    SuppressionSpec,
    UnknownAlert,
    alert_patient_ids,
)
from pipeline.web import views
from pipeline.web.app import Feed, _feed, db, flash
from pipeline.web.auth import grant_unmask, may_see_patients, requires
from pipeline.web.settings import User
from pipeline.web.users import allowed

SCOPES = {
    "user_id": "this user",
    "role": "this role",
    "department": "this department",
    "patient_id": "these patients",
}
MIN_REASON = 8  # characters an unmask reason needs at least
RECENT = 10  # the user's other alerts listed on a case


def routes() -> list[BaseRoute]:
    return [
        Route("/cases/bulk", bulk, methods=["POST"]),
        Route("/cases/{alert_id}", case_page, methods=["GET"]),
        Route("/cases/{alert_id}/unmask", unmask, methods=["POST"]),
        Route("/cases/{alert_id}/triage", triage, methods=["POST"]),
        Route("/cases/{alert_id}/comment", comment, methods=["POST"]),
        Route("/cases/{alert_id}/suppress", suppress_preview, methods=["GET"]),
        Route("/cases/{alert_id}/suppress", suppress, methods=["POST"]),
        Route("/cases/{alert_id}/export", case_export, methods=["GET"]),
        Route("/cases/{alert_id}/report", case_report, methods=["GET"]),
    ]


def _back(alert_id: str) -> RedirectResponse:
    return RedirectResponse(f"/cases/{alert_id}", status_code=303)


async def _stored(request: Request) -> StoredAlert | None:
    return await db(_feed(request).store.get, request.path_params["alert_id"])


def _missing(request: Request) -> Response:
    return _feed(request).page(
        request,
        "error.html",
        {"heading": "No such case", "message": "There is no alert with this id in the store."},
        status=404,
    )


CaseHandler = Callable[[Request, Feed, StoredAlert, User], Awaitable[Response]]


def _with_case(handler: CaseHandler) -> Callable[[Request], Awaitable[Response]]:
    """A handler of one stored case: called with the feed, the stored alert of the path's
    ``alert_id`` and the reader (inside :func:`requires`); the "no such case" page if the
    store has no such alert."""

    @wraps(handler)
    async def run(request: Request) -> Response:
        stored = await _stored(request)
        if stored is None:
            return _missing(request)
        return await handler(request, _feed(request), stored, request.state.user)

    return run


@requires("case.read")
@_with_case
async def case_page(request: Request, feed: Feed, stored: StoredAlert, user: User) -> Response:
    aid = stored.alert_id
    unmasked = may_see_patients(request, user, aid)
    detail = {"role": user.role, "unmasked": unmasked, "version": stored.version}
    await db(feed.store.record_access, user.username, "case.view", aid, detail)
    case = views.case(stored, unmasked)
    hist = views.history(await db(feed.store.history, aid))
    recent_page = await db(feed.store.page, AlertFilter(user_id=case["user_id"]), None, RECENT + 1)
    others = [s for s in recent_page.items if s.alert_id != aid][:RECENT]
    # the user's other cases: shown masked unless the reader sees patients everywhere
    recent = await db(feed.rows, others, may_see_patients(request, user))
    # other people's cases on the same patients (one VIP, several snoopers)
    same, same_total = await db(
        feed.store.alerts_on_patients, alert_patient_ids(stored.alert), aid, RECENT
    )
    same_rows = await db(feed.rows, same, may_see_patients(request, user))
    assignees = feed.triagers()
    return feed.page(
        request,
        "case.html",
        {
            "case": case,
            "history": hist,
            "recent": recent,
            "same": same_rows,
            "same_total": same_total,
            # the feed filtered by these patients, for a reader who sees them
            "all_on_patients": _patients_link(stored) if allowed(user.role, "patients.see") else "",
            "actions": views.actions_for(stored.state) if allowed(user.role, "triage") else [],
            "assignees": assignees,
            "scopes": SCOPES,
            "can_unmask": allowed(user.role, "unmask") and not unmasked,
            "can_suppress": allowed(user.role, "suppress"),
            "can_export": allowed(user.role, "case.export"),
            "access_link": _access_link(stored) if allowed(user.role, "access.report") else "",
            "unmask_minutes": feed.settings.unmask_ttl_s // 60,
        },
    )


def _patients_link(stored: StoredAlert) -> str:
    pids = alert_patient_ids(stored.alert)
    return "/?" + urlencode([("patient", p) for p in pids[:MAX_PATIENT_LINK]]) if pids else ""


MAX_PATIENT_LINK = 50  # patients the "all cases on these patients" link names at most


#: days before and after a case that its "access report" link asks for
ACCESS_MARGIN_DAYS = 7


def _access_link(stored: StoredAlert) -> str:
    """The access report form for the case's user over its days, a week either side (the
    alert's own local dates: its times carry the hospital's offset)."""
    from datetime import date, timedelta

    a = stored.alert
    try:
        d0 = date.fromisoformat(str(a["first_seen"])[:10])
        d1 = date.fromisoformat(str(a["last_seen"])[:10])
    except (KeyError, ValueError):
        return "/access-report?" + urlencode({"user": a.get("user_id", "")})
    margin = timedelta(days=ACCESS_MARGIN_DAYS)
    q = {
        "user": a.get("user_id", ""),
        "from": (d0 - margin).isoformat(),
        "to": (d1 + margin + timedelta(days=1)).isoformat(),
    }
    return "/access-report?" + urlencode(q)


async def _export_doc(
    request: Request, feed: Feed, stored: StoredAlert, user: User, fmt: str
) -> dict[str, Any]:
    """The whole case for a file, audited (``case.export``) before anything is returned."""
    aid = stored.alert_id
    unmasked = may_see_patients(request, user, aid)
    await db(
        feed.store.record_access,
        user.username,
        "case.export",
        aid,
        {"role": user.role, "unmasked": unmasked, "version": stored.version, "format": fmt},
    )
    hist = await db(feed.store.history, aid)
    audit = await db(feed.store.audit_log, aid, None, None, 1000)
    return {
        "format": "emrwatch case export 1",
        "exported_at": feed.store.clock().isoformat(timespec="seconds"),
        "exported_by": {"username": user.username, "role": user.role},
        "patient_ids": "shown" if unmasked else "masked",
        "case": views.case(stored, unmasked, max_rows=None),
        "event_ids": [str(e) for e in stored.alert.get("event_ids") or []],
        "triage_history": [
            {
                "at": h.at.isoformat(timespec="seconds"),
                "actor": h.actor,
                "from": h.from_state,
                "to": h.to_state,
                "assignee": h.assignee,
                "note": h.note,
            }
            for h in hist
        ],
        "access_log": [
            {"at": a.at.isoformat(timespec="seconds"), "actor": a.actor, "action": a.action}
            for a in reversed(audit)
        ],
    }


@requires("case.export")
@_with_case
async def case_export(request: Request, feed: Feed, stored: StoredAlert, user: User) -> Response:
    """The whole case as one JSON file for an HR, legal or compliance file: every evidence
    event, findings, explanations checked, the triage history with its notes and who has
    looked at the case. Patient ids as the reader may see them; audited before it is sent."""
    doc = await _export_doc(request, feed, stored, user, "json")
    return JSONResponse(
        doc,
        headers={"content-disposition": f'attachment; filename="case-{stored.alert_id}.json"'},
    )


@requires("case.export")
@_with_case
async def case_report(request: Request, feed: Feed, stored: StoredAlert, user: User) -> Response:
    """The same as a printable page (the browser prints it to PDF): what a privacy officer
    hands to HR. Audited like the JSON export."""
    doc = await _export_doc(request, feed, stored, user, "html")
    return feed.page(request, "case_report.html", {"doc": doc, "case": doc["case"]})


@requires("unmask", csrf=True)
@_with_case
async def unmask(request: Request, feed: Feed, stored: StoredAlert, user: User) -> Response:
    reason = str((await request.form()).get("reason") or "").strip()
    if len(reason) < MIN_REASON:
        flash(request, "error", "Say why you need to see the patient identifiers (a sentence).")
        return _back(stored.alert_id)
    await db(
        feed.store.record_access,
        user.username,
        "unmask",
        stored.alert_id,
        {"reason": reason[:500], "role": user.role},
    )
    grant_unmask(request, stored.alert_id, feed.settings.unmask_ttl_s)
    flash(request, "info", "Patient identifiers are shown for this case; this was logged.")
    return _back(stored.alert_id)


@requires("triage", csrf=True)
async def triage(request: Request) -> Response:
    feed = _feed(request)
    aid = request.path_params["alert_id"]
    user: User = request.state.user
    form = await request.form()
    action = str(form.get("action") or "")
    note = str(form.get("note") or "").strip()
    if action not in views.ACTIONS:
        flash(request, "error", f"Unknown triage action {action!r}.")
        return _back(aid)
    to = views.ACTIONS[action][0]
    try:
        stored = await db(feed.store.get, aid)
        if stored is None:
            raise UnknownAlert(aid)
        if to.startswith("closed_") and not note:
            raise InvalidTransition("Closing a case needs a note: what did you find?")
        if to.startswith("closed_") and stored.state == "acknowledged":
            await db(feed.store.transition, aid, "investigating", user.username)
        await db(feed.store.transition, aid, to, user.username, note)
    except UnknownAlert:
        return _missing(request)
    except InvalidTransition as exc:
        flash(request, "error", str(exc))
        return _back(aid)
    feed.changes.notify()
    flash(request, "info", f"Case is now: {views.STATE_LABELS[to]}.")
    return _back(aid)


@requires("triage", csrf=True)
async def comment(request: Request) -> Response:
    feed = _feed(request)
    aid = request.path_params["alert_id"]
    user: User = request.state.user
    form = await request.form()
    note = str(form.get("note") or "").strip()
    raw = str(form.get("assignee") or "")
    # "" keeps the assignee; "-" clears it; "me" is the reader
    assignee = None if raw == "" else "" if raw == "-" else user.username if raw == "me" else raw
    try:
        await db(feed.store.comment, aid, user.username, note, assignee)
    except UnknownAlert:
        return _missing(request)
    except InvalidTransition as exc:
        flash(request, "error", str(exc))
        return _back(aid)
    feed.changes.notify()
    flash(request, "info", "Assigned." if assignee is not None else "Note added.")
    return _back(aid)


MAX_BULK = 200  # cases one bulk step may take


@requires("triage", csrf=True)
async def bulk(request: Request) -> Response:
    """Several cases at once, from the feed's checkboxes: acknowledge the new ones, or
    assign them all (to the reader, another analyst, or nobody). Each case gets the same
    history entry as one done on its own page; cases past the step are left as they are."""
    feed = _feed(request)
    user: User = request.state.user
    form = await request.form()
    ids = list(dict.fromkeys(str(v) for v in form.getlist("alert_id") if v))[:MAX_BULK]
    action = str(form.get("action") or "")
    back = "/?" + str(form.get("back") or "") if form.get("back") else "/"
    if not ids:
        flash(request, "error", "No case was selected.")
        return RedirectResponse(back, status_code=303)
    if action == "acknowledge":
        ack = partial(feed.store.transition, to="acknowledged", actor=user.username)
        done, skipped = await db(_each, ids, ack)
        text = f"Acknowledged {done} case(s)."
        if skipped:
            text += f" Left {skipped} as they were (not new)."
    elif action == "assign":
        raw = str(form.get("assignee") or "me")
        assignee = user.username if raw == "me" else "" if raw == "-" else raw
        if assignee and assignee not in feed.triagers():
            flash(request, "error", f"{raw!r} is not a user who triages.")
            return RedirectResponse(back, status_code=303)
        assign = partial(feed.store.comment, actor=user.username, assignee=assignee)
        done, skipped = await db(_each, ids, assign)
        text = f"Assigned {done} case(s) to {assignee or 'nobody'}."
        if skipped:
            text += f" {skipped} not found."
    else:
        flash(request, "error", f"Unknown action {action!r}.")
        return RedirectResponse(back, status_code=303)
    feed.changes.notify()
    flash(request, "info", text)
    return RedirectResponse(back, status_code=303)


def _each(ids: Sequence[str], step: Callable[[str], object]) -> tuple[int, int]:
    """``step`` on each case: (done, skipped: unknown, or past the step)."""
    done = skipped = 0
    for aid in ids:
        try:
            step(aid)
            done += 1
        except (InvalidTransition, UnknownAlert):
            skipped += 1
    return done, skipped


# ---------------------------------------------------------------------------- suppress
def _suppress_params(source: Any) -> tuple[list[str], str, str]:
    scope = [s for s in source.getlist("scope") if s in SCOPES] or ["user_id"]
    until = str(source.get("until") or "").strip()
    description = str(source.get("description") or "").strip()[:500]
    return scope, until, description


def _specs(
    request: Request, alert_id: str, scope: Sequence[str], until: str, description: str
) -> Any:
    store = _feed(request).store
    return db(store.suppression_from_alert, alert_id, scope, until, description)


@requires("suppress")
@_with_case
async def suppress_preview(
    request: Request, feed: Feed, stored: StoredAlert, user: User
) -> Response:
    """What "suppress similar" would create, and which stored alerts it would have hidden."""
    scope, until, description = _suppress_params(request.query_params)
    error = ""
    specs: list[SuppressionSpec] = []
    preview = None
    try:
        specs = await _specs(request, stored.alert_id, scope, until, description)
        preview = await db(feed.store.preview_suppression, *specs)
    except ValueError as exc:
        error = str(exc)
    unmasked = may_see_patients(request, user, stored.alert_id)
    masker = views.Masker(unmasked, stored.alert.get("patient_ids") or [])
    shown_specs = [
        {**vars(s), "patient_id": masker.id(s.patient_id)} for s in specs
    ]  # a spec narrowed to patients names them: masked like the case
    hidden = await db(feed.rows, preview.hidden, may_see_patients(request, user)) if preview else []
    reduced = (
        await db(feed.rows, preview.reduced, may_see_patients(request, user)) if preview else []
    )
    return feed.page(
        request,
        "suppress.html",
        {
            "case": views.case(stored, unmasked),
            "scope": scope,
            "scopes": SCOPES,
            "until": until,
            "description": description,
            "specs": shown_specs,
            "preview": preview,
            "hidden": hidden,
            "reduced": reduced,
            "error": error,
            "needs_close": stored.state in ("acknowledged", "investigating"),
            "can_create": stored.state in ("acknowledged", "investigating", "closed_benign"),
        },
    )


@requires("suppress", csrf=True)
@_with_case
async def suppress(request: Request, feed: Feed, stored: StoredAlert, user: User) -> Response:
    aid = stored.alert_id
    form = await request.form()
    scope, until, description = _suppress_params(form)
    note = str(form.get("note") or "").strip()
    try:
        specs = await _specs(request, aid, scope, until, description)
        if stored.state == "closed_benign":
            for spec in specs:
                await db(feed.store.add_suppression, spec, user.username, aid)
        elif stored.state in ("acknowledged", "investigating"):
            if not note:
                raise InvalidTransition("Closing the case as benign needs a note.")
            if stored.state == "acknowledged":
                await db(feed.store.transition, aid, "investigating", user.username)
            await db(
                feed.store.transition, aid, "closed_benign", user.username, note, suppress=specs
            )
        else:
            raise InvalidTransition(
                "Acknowledge the case first: suppressions come with a benign verdict."
            )
    except ValueError as exc:  # InvalidTransition is one too
        flash(request, "error", str(exc))
        return _back(aid)
    feed.changes.notify()
    n = len(specs)
    flash(request, "info", f"{n} suppression{'s' if n != 1 else ''} created from this case.")
    return _back(aid)

"""The access report in the feed (:mod:`pipeline.access_report`), for supervisors.

``GET /access-report`` is the form (a patient and/or a user, a period, the purpose);
``POST /access-report`` runs the report (or the break-the-glass review: every emergency
access in the period) over ``feed.history_dir`` (an ``emrwatch history``
export, or any directory of context CSVs and an events file) and shows it, offers its CSV,
or prints the patient's copy. Each run is written to the audit log (``access_report``,
with who asked, on whom, for which period and why) before anything is computed or shown:
no audit entry, no report. One report runs at a time; the others wait their turn.
"""

from __future__ import annotations

import asyncio
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from emrwatch.timeutil import zone
from pipeline.access_report import (
    ACTION_WORDS,
    AccessReport,
    ReportError,
    access_report,
    parse_bound,
)
from pipeline.evaluate import EVENTS_FILES, find_events_file
from pipeline.web.app import _feed, db
from pipeline.web.auth import requires

PERMISSION = "access.report"
MIN_PURPOSE = 8  # characters the stated purpose needs at least
MAX_ROWS = 2000  # accesses shown on the page; the CSV has them all
_IDS = re.compile(r"[\s,;]+")
_LOCK: dict[int, asyncio.Lock] = {}  # one report at a time, per event loop


def routes() -> list[BaseRoute]:
    return [
        Route("/access-report", form_page, methods=["GET"]),
        Route("/access-report", run_report, methods=["POST"]),
        Route("/access-review", review_page, methods=["GET"]),
        Route("/reports/assessment", assessment_page, methods=["GET"]),
    ]


def history_events(history_dir: str) -> Path | None:
    """The events file of the history directory, or None."""
    try:
        return find_events_file(history_dir)
    except FileNotFoundError:
        return None


def history_freshness(history_dir: str, timezone: str) -> str:
    """What the history directory covers and when it was last written, from its
    ``manifest.json`` in the hospital's local time; "" without a readable manifest."""
    from pipeline.history import history_state

    h = history_state(history_dir)
    if h is None:
        return ""
    try:
        tz = zone(timezone)
    except ValueError:
        return ""

    def local(t: datetime) -> str:
        return t.astimezone(tz).strftime("%Y-%m-%d %H:%M")

    span = f"{local(h.start)} to {local(h.end)}" if h.start and h.end else "none yet"
    return f"{h.events:,} accesses, {span}; written {local(h.written)}"


def _ids(value: str) -> list[str]:
    return [x for x in _IDS.split(value.strip()) if x]


def _values(src: Any) -> dict[str, str]:
    return {
        k: str(src.get(k) or "").strip()
        for k in ("patient", "user", "from", "to", "purpose", "output", "btg")
    }


def _form(request: Request, values: dict[str, str], error: str = "", status: int = 200) -> Response:
    feed = _feed(request)
    hdir = feed.settings.history_dir
    events = history_events(hdir) if hdir else None
    return feed.page(
        request,
        "access_report.html",
        {
            "values": values,
            "error": error,
            "history_dir": hdir,
            "events_file": events.name if events else "",
            "freshness": history_freshness(hdir, feed.settings.timezone) if events else "",
            "timezone": feed.settings.timezone,
            "min_purpose": MIN_PURPOSE,
            "rep": None,
        },
        status=status,
    )


@requires(PERMISSION)
async def form_page(request: Request) -> Response:
    """The form, filled from the query (the case page links here with its user and days);
    no dates: the whole history."""
    return _form(request, _values(request.query_params))


def _run(
    history_dir: str,
    events: Path,
    timezone: str,
    detection: Any,
    patients: list[str],
    users: list[str],
    start: str,
    end: str,
    break_the_glass: bool,
) -> AccessReport:

    from detectors.config import DetectionConfig
    from emrwatch.context import Context

    ctx = Context.load(history_dir, timezone)
    cfg = DetectionConfig.in_zone(detection, timezone)
    return access_report(
        ctx,
        events,
        patients,
        users,
        parse_bound(start or None, ctx),
        parse_bound(end or None, ctx),
        cfg,
        break_the_glass=break_the_glass,
    )


@requires(PERMISSION, csrf=True)
async def run_report(request: Request) -> Response:
    feed = _feed(request)
    user = request.state.user
    values = _values(await request.form())
    patients, users = _ids(values["patient"]), _ids(values["user"])
    btg = bool(values["btg"])
    output = values["output"] or "page"
    hdir = feed.settings.history_dir
    events = history_events(hdir) if hdir else None
    error = ""
    if events is None:
        error = (
            "No history to report from: set feed.history_dir to an emrwatch history export "
            "(README: Access reports)."
            if not hdir
            else f"No events file ({', '.join(EVENTS_FILES[:3])}) in {hdir}."
        )
    elif not patients and not users and not btg:
        error = "Give a patient id or a user id (or both), or ask for break-the-glass accesses."
    elif output == "patient-copy" and not patients:
        error = "The patient's copy needs a patient id."
    elif len(values["purpose"]) < MIN_PURPOSE:
        error = f"State the purpose (at least {MIN_PURPOSE} characters): it goes to the audit log."
    elif output not in ("page", "csv", "patient-copy"):
        error = f"Unknown output {output!r}."
    if error:
        return _form(request, values, error, status=400)
    assert events is not None
    detail = {
        "patients": patients,
        "users": users,
        "period": [values["from"], values["to"]],
        "purpose": values["purpose"],
        "patient_copy": output == "patient-copy",
        "break_the_glass": btg,
        "output": output,
        "role": user.role,
        "via": "feed",
    }
    await db(feed.store.record_access, user.username, "access_report", None, detail)
    lock = _LOCK.setdefault(id(asyncio.get_running_loop()), asyncio.Lock())
    try:
        async with lock:
            rep = await run_in_threadpool(
                _run,
                hdir,
                events,
                feed.settings.timezone,
                request.app.state.detection,
                patients,
                users,
                values["from"],
                values["to"],
                btg,
            )
    except (ReportError, OSError, ValueError) as exc:
        return _form(request, values, str(exc), status=400)
    if output == "csv":
        ids = "-".join(patients or users or ["break-the-glass"])
        name = "access-report-" + re.sub(r"[^A-Za-z0-9._-]", "_", ids)[:60] + ".csv"
        return Response(
            rep.to_csv(),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )
    if output == "patient-copy":
        return feed.page(
            request,
            "access_copy.html",
            {
                "names": ", ".join(rep.names.get(p, p) for p in rep.patients),
                "rows": rep.patient_copy_rows(),
                "period": rep.period,
                "timezone": rep.timezone,
            },
        )
    alert_ids = [a["alert_id"] for a in rep.alerts]
    known = await db(lambda: {i for i in alert_ids if feed.store.get(i) is not None})
    return feed.page(
        request,
        "access_report.html",
        {
            "values": values,
            "error": "",
            "history_dir": hdir,
            "events_file": events.name,
            "freshness": history_freshness(hdir, feed.settings.timezone),
            "timezone": feed.settings.timezone,
            "min_purpose": MIN_PURPOSE,
            "rep": rep,
            "rows": rep.accesses[:MAX_ROWS],
            "cut": max(0, len(rep.accesses) - MAX_ROWS),
            "unexplained": sum(1 for a in rep.accesses if not a.explained),
            "known_alerts": known,
            "words": ACTION_WORDS,
        },
    )


def _review(history_dir: str, events: Path, timezone: str, as_of: str) -> Any:
    from datetime import date

    from emrwatch.context import Context
    from pipeline.access_review import access_review

    ctx = Context.load(history_dir, timezone)
    try:
        end = ctx.clock.day_end(date.fromisoformat(as_of)) - 1 if as_of else None
    except ValueError:
        raise ReportError(f"{as_of!r} is not a date (YYYY-MM-DD)") from None
    return access_review(ctx, events, end)


@requires(PERMISSION)
async def review_page(request: Request) -> Response:
    """The access review (:mod:`pipeline.access_review`) of the history: the accounts and
    grants to re-check. It names staff, no patient; reading it is audited (``access_review``)."""
    from pipeline.access_review import SECTIONS

    feed = _feed(request)
    user = request.state.user
    as_of = str(request.query_params.get("as_of") or "").strip()
    hdir = feed.settings.history_dir
    events = history_events(hdir) if hdir else None
    rev, error = None, ""
    if events is None:
        error = "No history to review: set feed.history_dir (README: Access reports)."
    else:
        await db(
            feed.store.record_access,
            user.username,
            "access_review",
            None,
            {"as_of": as_of, "role": user.role},
        )
        try:
            async with _LOCK.setdefault(id(asyncio.get_running_loop()), asyncio.Lock()):
                rev = await run_in_threadpool(_review, hdir, events, feed.settings.timezone, as_of)
        except (ReportError, OSError, ValueError) as exc:
            error = str(exc)
    return feed.page(
        request,
        "access_review.html",
        {
            "rev": rev,
            "error": error,
            "as_of": as_of,
            "sections": SECTIONS,
            "freshness": history_freshness(hdir, feed.settings.timezone) if events else "",
        },
        status=400 if error else 200,
    )


def _assess(
    hospital: str,
    history_dir: str,
    events: Path,
    timezone: str,
    detection: Any,
    store: Any,
    start: Any,
    end: Any,
) -> Any:

    from detectors.config import DetectionConfig
    from pipeline.assessment import assess

    cfg = DetectionConfig.in_zone(detection, timezone)
    return assess(hospital, history_dir, events, start, end, cfg, store)


@requires("report.read")
async def assessment_page(request: Request) -> Response:
    """The period's security assessment (:mod:`pipeline.assessment`) of this hospital, from
    the history and the alert store, as a page or as the JSON document a regulator's
    ``emrwatch assessment-compare`` reads. Supervisors and auditors; each reading is
    audited (``assessment``). It names no patient and no member of staff."""
    from datetime import date

    from pipeline.alerting.report import default_period
    from pipeline.assessment import AssessmentError, compare
    from pipeline.signing import sign_document

    feed = _feed(request)
    user = request.state.user
    zone = feed.settings.timezone
    hospital = feed.settings.hospital or feed.settings.title
    start, end = default_period(zone)
    q = request.query_params
    output = q.get("output") or "page"
    hdir = feed.settings.history_dir
    events = history_events(hdir) if hdir else None
    a, error = None, ""
    try:
        if q.get("from"):
            start = date.fromisoformat(q["from"])
        if q.get("to"):
            end = date.fromisoformat(q["to"])
    except ValueError as exc:
        error = f"Dates: {exc}"
    if events is None and not error:
        error = "No history to assess: set feed.history_dir (README: Access reports)."
    if not error:
        assert events is not None  # error says so otherwise
        detail = {"from": start.isoformat(), "to": end.isoformat(), "output": output,
                  "role": user.role}  # fmt: skip
        await db(feed.store.record_access, user.username, "assessment", None, detail)
        try:
            async with _LOCK.setdefault(id(asyncio.get_running_loop()), asyncio.Lock()):
                a = await run_in_threadpool(
                    _assess, hospital, hdir, events, zone, request.app.state.detection,
                    feed.store, start, end,
                )  # fmt: skip
        except (AssessmentError, OSError, ValueError) as exc:
            error = str(exc)
    if a is not None and output == "json":
        name = re.sub(r"[^A-Za-z0-9._-]", "_", f"assessment-{hospital}-{a.period_from}")[:80]
        doc = a.to_dict()
        signer = feed.settings.assessment_signer()
        if signer is not None:
            doc = sign_document(doc, signer)
        return Response(
            json.dumps(doc, indent=2, ensure_ascii=False) + "\n",
            media_type="application/json",
            headers={"Content-Disposition": f'attachment; filename="{name}.json"'},
        )
    table = compare([a.to_dict()]) if a is not None else None
    return feed.page(
        request,
        "assessment.html",
        {
            "a": a,
            "rows": [(r[0], r[1][0], r[3][0]) for r in table.rows] if table else [],
            "error": error,
            "start": start.isoformat(),
            "end": end.isoformat(),
            "timezone": zone,
            "hospital": hospital,
            "freshness": history_freshness(hdir, zone) if events else "",
        },
        status=400 if error else 200,
    )

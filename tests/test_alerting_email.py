"""E-mail escalation against a real SMTP server on loopback (aiosmtpd) that requires
STARTTLS (a throw-away CA) and AUTH: who gets mail, immediate vs digest, and an SMTP
outage during which nothing is lost and after which nothing is sent twice."""

from __future__ import annotations

import smtplib
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from emrwatch.context import Context
from pipeline.alerting import AlertingConfig, AlertingConfigError, AlertRouter
from pipeline.alerting.email import EmailSink, recipients_for
from pipeline.alerting.outbox import OutboxEntry, SinkError
from pipeline.alerting.store import AlertStore
from pipeline.alerting.testing import FakeClock, LoopbackSmtp, backend_url, sample_alert

FEED = "https://feed.hospital.example"


@pytest.fixture()
def smtp() -> Iterator[LoopbackSmtp]:
    with LoopbackSmtp() as s:
        yield s


@pytest.fixture()
def hospital() -> Context:
    ctx = Context()
    for d, head in (("ORTH", "h-orth"), ("ONC", "h-onc"), ("ED", "")):
        ctx.upsert_row(
            "departments", {"department_id": d, "name": d, "kind": "clinical", "head_user_id": head}
        )
    staff = [
        ("u1", "ORTH", "s1", "Zhang", "Wei"),
        ("u2", "ORTH", "s1", "Li", "Na"),
        ("u3", "ONC", "s2", "Wang", "Fang"),
        ("h-orth", "ORTH", "dir", "Chen", "Jie"),  # a head under suspicion
        ("u4", "ED", "", "Zhao", "Lei"),  # no supervisor, no head: nobody to tell
    ]
    for uid, dept, sup, fam, giv in staff:
        ctx.upsert_row(
            "staff",
            {
                "user_id": uid, "family_name": fam, "given_name": giv, "role": "nurse",
                "department_id": dept, "clearance": "2", "shift_start": "", "shift_end": "",
                "valid_from": "", "valid_until": "", "supervisor_id": sup, "address": "",
            },
        )  # fmt: skip
    return ctx


def make_router(
    url: str, smtp: LoopbackSmtp, ctx: Context, clock: FakeClock, tmp_path: Path, **over: Any
) -> AlertRouter:
    cfg = AlertingConfig.from_dict(
        {
            "store_url": url,
            "feed_url": FEED,
            "digest_interval_s": 3600,
            "smtp": {
                "host": "127.0.0.1",
                "port": smtp.port,
                "starttls": True,
                "username": smtp.user,
                "password": smtp.password,
                "from": "emrwatch@hospital.example",
                "ca_file": smtp.write_ca(tmp_path / "ca.pem"),
                "timeout_s": 5,
            },
            "email": {
                "address_template": "{user_id}@hospital.example",
                "addresses": {"s1": "ward.sister@hospital.example"},
                **over,
            },
            "delivery": {"retry_base_s": 5, "retry_max_s": 120},
        }
    )
    return AlertRouter(cfg, ctx, store=AlertStore(url, clock=clock))


def inbox(smtp: LoopbackSmtp) -> Counter[tuple[str, str]]:
    """(recipient, subject) of every accepted mail."""
    return Counter((r, m["message"]["Subject"]) for m in smtp.messages for r in m["rcpt_tos"])


def test_recipients_are_supervisor_and_head_never_the_user(hospital: Context) -> None:
    def addrs(alert: dict[str, Any], **kw: Any) -> list[tuple[str, str]]:
        return [
            (r.address, r.why)
            for r in recipients_for(alert, hospital, {"s1": "sister@h"}, "{user_id}@h", **kw)
        ]

    assert addrs(sample_alert(user_id="u1")) == [
        ("sister@h", "supervisor of u1"),
        ("h-orth@h", "head of ORTH"),
    ]
    # the head of the department is the suspect: their own supervisor is told, not them
    assert addrs(sample_alert(user_id="h-orth")) == [("dir@h", "supervisor of h-orth")]
    assert addrs(sample_alert(user_id="u4", department_id="ED"), always_to=["po@h"]) == [
        ("po@h", "privacy office")
    ]
    # unknown accounts fall back to the alert's department
    assert addrs(sample_alert(user_id="ghost", department_id="ONC")) == [("h-onc@h", "head of ONC")]
    missing: list[str] = []
    got = recipients_for(sample_alert(user_id="u3"), hospital, {}, "", on_missing=missing.append)
    assert got == [] and missing == ["s2", "h-onc"]


def test_high_alerts_mail_managers_at_once_over_starttls_with_auth(
    smtp: LoopbackSmtp, hospital: Context, tmp_path: Path
) -> None:
    clock = FakeClock()
    router = make_router(f"sqlite:///{tmp_path}/a.db", smtp, hospital, clock, tmp_path)
    router.handle(
        [sample_alert("ew-m1", severity="critical", user_id="u1", patient_ids=("p00077",))]
    )
    assert router.deliver().delivered == 2
    assert sorted(inbox(smtp)) == [
        ("h-orth@hospital.example", "[emrwatch] CRITICAL privacy alert: u1 (nurse, ORTH)"),
        ("ward.sister@hospital.example", "[emrwatch] CRITICAL privacy alert: u1 (nurse, ORTH)"),
    ]
    assert all(m["tls"] and m["auth"] for m in smtp.messages)
    assert smtp.auth_ok == 2
    mail = next(m for m in smtp.messages if m["rcpt_tos"] == ["ward.sister@hospital.example"])
    msg = mail["message"]
    body = msg.get_content()
    assert msg["From"] == "emrwatch@hospital.example"
    assert msg["X-Emrwatch-Alert"] == "ew-m1" and msg["Message-ID"].endswith("@emrwatch>")
    assert "supervisor of u1" in body and "Zhang Wei" in body  # staff name: fine for managers
    assert f"{FEED}/cases/ew-m1" in body
    assert "p00077" not in body and "p•••77" in body  # patients masked
    router.close()


def test_low_and_medium_alerts_are_batched_into_one_digest_per_recipient(
    smtp: LoopbackSmtp, hospital: Context, tmp_path: Path
) -> None:
    clock = FakeClock()
    router = make_router(f"sqlite:///{tmp_path}/a.db", smtp, hospital, clock, tmp_path)
    router.handle(
        [
            sample_alert("ew-d1", severity="low", user_id="u1"),
            sample_alert("ew-d2", severity="medium", user_id="u2"),
            sample_alert("ew-d3", severity="low", user_id="u3", department_id="ONC"),
        ]
    )
    assert router.deliver().delivered == 0  # digest lines wait
    clock.advance(1800)
    router.handle([sample_alert("ew-d4", severity="medium", user_id="u1")])
    assert router.deliver().delivered == 0  # the oldest line has waited 30 min of 60
    # a low alert that escalates is mailed at once and leaves the digest
    router.handle([sample_alert("ew-d2", version=2, severity="high", user_id="u2")])
    assert router.deliver().delivered == 2
    clock.advance(1801)
    report = router.deliver()
    assert report.digests == 4 and report.delivered == 4
    got = inbox(smtp)
    digests = {r: s for (r, s) in got if "Digest" in s}
    assert digests == {
        "ward.sister@hospital.example": "[emrwatch] Digest: 2 privacy alerts (1 medium, 1 low)",
        "h-orth@hospital.example": "[emrwatch] Digest: 2 privacy alerts (1 medium, 1 low)",
        "s2@hospital.example": "[emrwatch] Digest: 1 privacy alert (1 low)",
        "h-onc@hospital.example": "[emrwatch] Digest: 1 privacy alert (1 low)",
    }
    body = next(
        m["message"].get_content()
        for m in smtp.messages
        if m["rcpt_tos"] == ["ward.sister@hospital.example"] and "Digest" in m["message"]["Subject"]
    )
    assert "ew-d1" in body and "ew-d4" in body and "ew-d2" not in body
    assert body.index("MEDIUM") < body.index("LOW")
    # nothing left; an explicit flush with nothing waiting sends nothing
    assert router.flush_digest() == 0
    router.handle([sample_alert("ew-d5", severity="low", user_id="u1")])
    assert router.flush_digest() == 2  # flush_digest(now) does not wait for the interval
    assert sum(1 for (_, s) in inbox(smtp) if "Digest" in s) == 6
    router.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_smtp_outage_then_recovery_sends_every_mail_exactly_once(
    smtp: LoopbackSmtp, hospital: Context, tmp_path: Path, backend: str
) -> None:
    with backend_url(backend, tmp_path) as url:
        clock = FakeClock()
        router = make_router(url, smtp, hospital, clock, tmp_path)
        smtp.stop()  # the mail server is down
        high = [sample_alert(f"ew-o{i}", severity="high", user_id="u1") for i in range(8)]
        low = [
            sample_alert(f"ew-l{i}", severity="low", user_id="u3", department_id="ONC")
            for i in range(5)
        ]
        router.handle(high + low)
        r = router.deliver()
        assert (r.delivered, r.failed) == (0, 16)
        clock.advance(3600)  # digests fall due while the server is still down
        router.handle(high + low)  # redelivery: nothing new
        r = router.deliver()
        assert r.digests == 2 and r.delivered == 0
        assert router.counters["email"].failed >= 16 + 2
        # restart of the emrwatch process, then of the mail server
        router.close()
        router = make_router(url, smtp, hospital, clock, tmp_path)
        smtp.start()
        for _ in range(20):
            clock.advance(130)
            router.deliver()
            if not router.outbox.backlog()["email"].get("pending"):
                break
        by_id = Counter(
            (r, m["message"]["Message-ID"]) for m in smtp.messages for r in m["rcpt_tos"]
        )
        assert len(by_id) == 18 and set(by_id.values()) == {1}  # every mail exactly once
        got = inbox(smtp)
        per_alert = Counter(m["message"]["X-Emrwatch-Alert"] for m in smtp.messages)
        want: dict[str | None, int] = {f"ew-o{i}": 2 for i in range(8)}
        want[None] = 2  # the two digests are about several alerts
        assert per_alert == want
        assert sorted(r for (r, s) in got if "Digest" in s) == [
            "h-onc@hospital.example",
            "s2@hospital.example",
        ]
        digest = next(m for m in smtp.messages if "Digest" in m["message"]["Subject"])
        assert digest["message"]["Subject"] == "[emrwatch] Digest: 5 privacy alerts (5 low)"
        router.handle(high + low)
        clock.advance(7200)
        assert router.deliver().delivered == 0 and len(smtp.messages) == 18
        router.close()


def test_transient_rejection_and_bad_credentials_are_retried(
    smtp: LoopbackSmtp, hospital: Context, tmp_path: Path
) -> None:
    clock = FakeClock()
    router = make_router(f"sqlite:///{tmp_path}/a.db", smtp, hospital, clock, tmp_path)
    smtp.reject_next = 1
    router.handle([sample_alert("ew-451", severity="high", user_id="u3", department_id="ONC")])
    r = router.deliver()
    assert (r.delivered, r.failed) == (1, 1)
    (failed,) = [e for e in router.outbox.entries("ew-451") if e["state"] == "pending"]
    assert "451" in failed["last_error"]
    clock.advance(10)
    assert router.deliver().delivered == 1
    assert len(smtp.messages) == 2
    router.close()

    sink = EmailSink(
        "127.0.0.1", smtp.port, sender="e@h", feed_url=FEED, username="emrwatch",
        password="wrong", ssl_context=smtp.client_context(), timeout_s=5,
    )  # fmt: skip
    entry = OutboxEntry(
        9, "k", "email", "message", "x@h", "ew-x", "new",
        {"alert": {"alert_id": "ew-x", "version": 1, "severity": "high", "score": 0.5,
                   "user_id": "u", "role": "r", "department_id": "d", "detector": ["x"],
                   "reason": "r", "events": 1, "patients": 0, "patients_masked": [],
                   "first_seen": "", "last_seen": ""}},
        0, None,  # type: ignore[arg-type]
    )  # fmt: skip
    with pytest.raises(SinkError, match="535"):
        sink.send(entry)
    # a server certificate nobody vouches for is refused
    untrusted = EmailSink("127.0.0.1", smtp.port, sender="e@h", feed_url=FEED, timeout_s=5)
    with pytest.raises(SinkError, match="CERTIFICATE_VERIFY_FAILED"):
        untrusted.send(entry)
    # STARTTLS is required by the server: a client that skips it cannot AUTH
    plain = EmailSink(
        "127.0.0.1", smtp.port, sender="e@h", feed_url=FEED, starttls=False,
        username="emrwatch", password="s3cret", timeout_s=5,
    )  # fmt: skip
    with pytest.raises(SinkError):
        plain.send(entry)
    assert isinstance(smtplib.SMTP, type)


def test_the_monthly_privacy_report_is_mailed_once_when_the_month_is_over(
    smtp: LoopbackSmtp, hospital: Context, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path}/r.db"
    clock = FakeClock("2026-03-10T02:00:00+00:00")
    office = ["privacy-office@hospital.example", "ciso@hospital.example"]
    router = make_router(url, smtp, hospital, clock, tmp_path, report_to=office)
    router.handle([sample_alert("ew-r1", severity="low", user_id="u1", patient_ids=("p00078",))])
    router.store.transition("ew-r1", "acknowledged", "sam")
    router.deliver()
    assert not [m for m in smtp.messages if "privacy report" in m["message"]["Subject"]]
    # March is over (April 1st, 00:30 in Shanghai): one report per recipient, then never again
    clock.now = clock.now.replace(month=3, day=31, hour=16, minute=30)
    router.deliver()
    router.deliver()
    again = make_router(url, smtp, hospital, clock, tmp_path, report_to=office)
    again.deliver()  # a second router (or a restart) on the same store sends nothing more
    subject = "emrwatch privacy report 2026-03-01 to 2026-04-01"
    reports = [m for m in smtp.messages if m["message"]["Subject"] == subject]
    assert sorted(r for m in reports for r in m["rcpt_tos"]) == sorted(office)
    msg = reports[0]["message"]
    text = msg.get_body(preferencelist=("plain",)).get_content()
    assert "Cases raised: 1" in text and "low 1" in text
    assert f"{FEED}/reports?from=2026-03-01&to=2026-04-01" in text
    assert f"{FEED}/reports/assessment?from=2026-03-01&to=2026-04-01" in text
    body = msg.get_body(preferencelist=("html",)).get_content()
    assert "Cases raised: <strong>1</strong>" in body
    assert f"href='{FEED}/reports/assessment?from=2026-03-01&amp;to=2026-04-01'" in body
    assert "p00078" not in msg.as_string()  # no patient id in a report
    router.close()
    again.close()


# ---------------------------------------------------------------------------- reminders
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_case_left_untriaged_past_its_target_reminds_everyone_told_once(
    smtp: LoopbackSmtp, hospital: Context, tmp_path: Path, backend: str
) -> None:
    from pipeline.alerting.testing import FakeSlack

    with backend_url(backend, tmp_path) as url, FakeSlack() as slack:
        clock = FakeClock()

        def router() -> AlertRouter:
            r = make_router(url, smtp, hospital, clock, tmp_path)
            cfg = replace(
                r.config,
                slack=replace(
                    r.config.slack,
                    token=slack.token,
                    base_url=slack.base_url,
                    default_channel="#privacy",
                ),
            )
            return AlertRouter(cfg, hospital, store=r.store)

        first = router()
        first.handle(
            [
                sample_alert("ew-crit", severity="critical", user_id="u1"),
                sample_alert("ew-high", severity="high", user_id="u3", department_id="ONC"),
                sample_alert("ew-seen", severity="critical", user_id="u2"),
                sample_alert("ew-gone", severity="critical", user_id="u2"),
                sample_alert("ew-med", severity="medium", user_id="u1"),
            ]
        )
        first.deliver()
        told = len(smtp.messages), len(slack.messages)
        first.store.transition("ew-seen", "acknowledged", actor="ana")  # someone is on it
        first.handle([sample_alert("ew-gone", version=2, severity="critical", status="retracted")])
        first.deliver()
        clock.advance(3.9 * 3600)
        assert first.enqueue_overdue() == 0  # critical waits 4 h
        clock.advance(0.2 * 3600)
        # ew-crit only: its supervisor, its department head and #privacy
        assert first.enqueue_overdue() == 3
        assert first.enqueue_overdue() == 0  # once
        first.deliver()
        reminders = [m for m in smtp.messages if "untriaged" in m["message"]["Subject"]]
        assert sorted(r for m in reminders for r in m["rcpt_tos"]) == [
            "h-orth@hospital.example",
            "ward.sister@hospital.example",
        ]
        subject = reminders[0]["message"]["Subject"]
        assert subject == (
            "[emrwatch] Still untriaged after 4 h: CRITICAL privacy alert on u1 (nurse, ORTH)"
        )
        assert "/cases/ew-crit" in reminders[0]["message"].get_content()
        posts = [m for m in slack.messages if "untriaged" in m["text"]]
        assert [p["channel"] for p in posts] == ["#privacy"]
        later = Counter(
            m["message"]["Subject"].split(":")[0].removeprefix("[emrwatch] ")
            for m in smtp.messages[told[0] :]
        )
        assert later == {"Still untriaged after 4 h": 2, "Retracted": 2, "Digest": 2}
        first.close()

        # a restarted router does not remind again; the high case's turn comes at 24 h
        clock.advance(20 * 3600)
        second = router()
        assert second.enqueue_overdue() == 3  # ew-high: u3's supervisor, ONC's head, #privacy
        second.deliver()
        assert second.enqueue_overdue() == 0
        assert sum("untriaged" in m["message"]["Subject"] for m in smtp.messages) == 4
        assert not [m for m in smtp.messages if "ew-med" in m["message"].get_content()
                    and "untriaged" in m["message"]["Subject"]]  # fmt: skip
        second.close()


def test_overdue_settings_are_checked() -> None:
    assert AlertingConfig().overdue_after_h == {"critical": 4.0, "high": 24.0}
    assert AlertingConfig.from_dict({"overdue_after_h": {}}).overdue_after_h == {}
    cfg = AlertingConfig.from_dict({"overdue_after_h": {"medium": 72, "critical": 0}})
    assert cfg.overdue_after_h == {"medium": 72, "critical": 0}
    with pytest.raises(AlertingConfigError, match="unknown severity 'urgent'"):
        AlertingConfig.from_dict({"overdue_after_h": {"urgent": 1}})
    with pytest.raises(AlertingConfigError, match="overdue_after_h.high must be"):
        AlertingConfig.from_dict({"overdue_after_h": {"high": -1}})


def test_the_delivery_loop_sends_reminders_by_itself(
    smtp: LoopbackSmtp, hospital: Context, tmp_path: Path
) -> None:
    import time

    clock = FakeClock()
    router = make_router(f"sqlite:///{tmp_path}/a.db", smtp, hospital, clock, tmp_path)
    router.handle([sample_alert("ew-loop", severity="critical", user_id="u1")])
    router.deliver()
    clock.advance(5 * 3600)
    router.start()  # its first pass looks for overdue cases at once, then once a minute
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if sum("untriaged" in m["message"]["Subject"] for m in smtp.messages) == 2:
            break
        time.sleep(0.05)
    router.close()
    subjects = [
        m["message"]["Subject"] for m in smtp.messages if "untriaged" in m["message"]["Subject"]
    ]
    assert len(subjects) == 2 and "after 5 h" in subjects[0]

"""The periodic privacy report, computed from a store whose history we wrote with a clock."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from pipeline.alerting.report import last_full_month, privacy_report
from pipeline.alerting.store import AlertStore
from pipeline.alerting.testing import FakeClock, sample_alert

REPO = Path(__file__).resolve().parent.parent
TZ = "Asia/Shanghai"
H = 3600.0


def _id(i: int) -> str:
    return f"ew-{i:024d}"


@pytest.fixture()
def history(tmp_path: Path) -> tuple[AlertStore, FakeClock, str]:
    """March 2026 (Shanghai) in a store; UTC 2026-02-28T16:00 is local March 1st 00:00.

    - alert 1 (critical, ORTH u1): in Feb (local), acknowledged in March after 30 h,
      confirmed in March.
    - alert 2 (high, ORTH u1): March 2, acknowledged after 2 h, confirmed after 10 h.
    - alert 3 (medium, ICU u2): March 3, never touched (open at the end, 28+ days old).
    - alert 4 (low, ICU u3): March 20, acknowledged after 1 h, closed benign with a
      suppression 5 h later.
    - alert 5 (critical, ED u4): April 2: outside the period.
    - alert 6 (high): retracted by the detectors: not a case.
    """
    url = f"sqlite:///{tmp_path}/alerts.sqlite3"
    clock = FakeClock("2026-02-28T10:00:00+00:00")  # local Feb 28, 18:00
    store = AlertStore(url, clock=clock)

    def raise_(i: int, **kw: Any) -> None:
        store.upsert([sample_alert(alert_id=_id(i), **kw)])

    raise_(1, severity="critical", user_id="u1", detector=("sealed-record",))
    clock.advance(30 * H)  # 2026-03-01T16:00Z: local March 2, 00:00
    store.transition(_id(1), "acknowledged", "ana")
    raise_(2, severity="high", user_id="u1", detector=("vip-snooping", "coworker"))
    clock.advance(2 * H)
    store.transition(_id(2), "acknowledged", "ana")
    store.transition(_id(2), "investigating", "ana")
    store.record_access("ana", "case.view", _id(2), {"role": "analyst"})
    store.record_access("ana", "unmask", _id(2), {"reason": "need to call the ward"})
    clock.advance(8 * H)
    store.transition(_id(2), "closed_confirmed", "sam", "snooped on a VIP")
    store.transition(_id(1), "investigating", "sam")
    store.transition(_id(1), "closed_confirmed", "sam", "sealed chart opened")
    clock.advance(14 * H)  # local March 3
    raise_(3, severity="medium", user_id="u2", department_id="ICU", detector=("volume",))
    clock.advance(17 * 24 * H)  # local March 20
    raise_(4, severity="low", user_id="u3", department_id="ICU", detector=("off-hours",))
    raise_(6, severity="high", user_id="u5", status="retracted")
    clock.advance(1 * H)
    store.transition(_id(4), "acknowledged", "sam")
    store.transition(_id(4), "investigating", "sam")
    store.record_access("sam", "unmask", _id(4), {"reason": "checking the roster"})
    clock.advance(5 * H)
    specs = store.suppression_from_alert(_id(4), ("user_id",), "2026-06-30", "night audits")
    store.transition(_id(4), "closed_benign", "sam", "night audit", suppress=specs)
    clock.advance(14 * 24 * H)  # local April 3
    raise_(5, severity="critical", user_id="u4", department_id="ED")
    yield store, clock, url
    store.close()


def test_the_march_report_counts_what_happened_in_march(
    history: tuple[AlertStore, FakeClock, str],
) -> None:
    store, _clock, _url = history
    rep = privacy_report(store, date(2026, 3, 1), date(2026, 4, 1), TZ)
    assert rep.alerts == 3  # 2, 3, 4 (1 was raised in February, 5 in April, 6 retracted)
    assert rep.by_severity == {"high": 1, "medium": 1, "low": 1}
    assert rep.by_detector == {"coworker": 1, "off-hours": 1, "vip-snooping": 1, "volume": 1}
    assert rep.by_department == {"ICU": 2, "ORTH": 1}
    # decided in March: 1 and 2 confirmed, 4 benign
    assert (rep.decided, rep.confirmed, rep.benign) == (3, 2, 1)
    assert rep.confirmed_share == pytest.approx(2 / 3)
    # first step of the March cases: 2 after 2 h, 4 after 1 h; 3 never (and is late)
    assert (rep.to_first_step.n, rep.to_first_step.median_h) == (2, 1.5)
    assert rep.first_step_late == {"medium": 1}
    # verdicts: 1 after 40 h, 2 after 10 h, 4 after 6 h
    assert (rep.to_verdict.n, rep.to_verdict.median_h, rep.to_verdict.p90_h) == (3, 10.0, 40.0)
    # open at the end of March: alert 3 only (5 came later), 28 days old
    assert rep.open_at_end == 1
    assert rep.open_by_age == {"7–30 days": 1} and rep.open_by_severity == {"medium": 1}
    assert rep.repeat_users == [{"user_id": "u1", "department_id": "ORTH", "confirmed": 2}]
    assert (rep.case_views, rep.unmasks) == (1, 2)
    assert rep.unmasks_by_actor == {"ana": 1, "sam": 1}
    [sup] = rep.suppressions_created
    assert sup["created_by"] == "sam" and "user_id=u3" in sup["scope"]
    assert "until 2026-06-30" in sup["scope"]
    text = rep.to_text()
    assert "Cases raised: 3" in text and "u1 (ORTH): 2" in text
    assert "p00012" not in text + rep.to_json() + rep.to_html_fragment()  # no patient ids


def test_february_and_april_are_their_own(history: tuple[AlertStore, FakeClock, str]) -> None:
    store, _clock, _url = history
    feb = privacy_report(store, date(2026, 2, 1), date(2026, 3, 1), TZ)
    assert (feb.alerts, feb.decided, feb.by_severity) == (1, 0, {"critical": 1})
    assert feb.first_step_late == {"critical": 1}  # still untouched when February ended
    assert feb.open_at_end == 1 and feb.repeat_users == []
    apr = privacy_report(store, date(2026, 4, 1), date(2026, 5, 1), TZ)
    assert (apr.alerts, apr.decided, apr.open_at_end) == (1, 0, 2)
    with pytest.raises(ValueError, match="must end after"):
        privacy_report(store, date(2026, 4, 1), date(2026, 4, 1), TZ)


def test_last_full_month() -> None:
    assert last_full_month(date(2026, 3, 15)) == (date(2026, 2, 1), date(2026, 3, 1))
    assert last_full_month(date(2026, 1, 1)) == (date(2025, 12, 1), date(2026, 1, 1))


def test_emrwatch_report_command(
    history: tuple[AlertStore, FakeClock, str], tmp_path: Path
) -> None:
    _store, _clock, url = history
    base = [sys.executable, "-m", "pipeline.cli", "report", "--store", url]
    period = ["--from", "2026-03-01", "--to", "2026-04-01", "--timezone", TZ]
    out = subprocess.run(
        [*base, *period, "--format", "json"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    doc = json.loads(out)
    assert doc["alerts"] == 3 and doc["confirmed"] == 2 and doc["period_to"] == "2026-04-01"
    page = tmp_path / "march.html"
    subprocess.run([*base, *period, "--format", "html", "--out", str(page)], cwd=REPO, check=True)
    assert "<h1>emrwatch privacy report 2026-03-01 to 2026-04-01</h1>" in page.read_text()
    assert page.stat().st_mode & 0o077 == 0  # it names staff: owner-only
    bad = subprocess.run([*base, "--from", "2026-13-01"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "month must be in 1..12" in bad.stderr
    missing = subprocess.run(
        [*base[:-1], f"sqlite:///{tmp_path}/nothing.sqlite3"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "cannot read the alert store" in missing.stderr
    assert "Traceback" not in missing.stderr

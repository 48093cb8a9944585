"""``emrwatch access-review``: the accounts and grants to re-check, from the roster and the
log, on a hand-made hospital where each finding is put on purpose."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from emrwatch.context import Context
from pipeline.access_review import ReviewError, access_review
from tests.hospital import ev, write_hospital

EMRWATCH = [sys.executable, "-m", "pipeline.cli"]


@pytest.fixture
def site(tmp_path: Path) -> tuple[Path, Path]:
    ctx_dir = write_hospital(tmp_path / "ctx")
    events = [
        # p-card (clearance 4) works every day on sensitivity-1 patients only
        *(ev("p-card", "P1", at=f"2026-03-{d:02d}T10:00:00") for d in range(2, 21)),
        # n-card opens the sensitivity-4 psychiatric record: clearance 3 is not above use
        *(ev("n-card", "P-PSY", at=f"2026-03-{d:02d}T11:00:00") for d in range(2, 21)),
        # the leaver, whose account ended on 1 March, twice after that
        ev("leaver", "P1", at="2026-03-05T09:00:00"),
        ev("leaver", "P2", at="2026-03-06T09:00:00"),
        # an account nobody registered
        ev("ghost", "P1", at="2026-03-07T09:00:00"),
        # the vendor (valid 1-31 March, grant to 31 March) last on 3 March
        ev("v-it", "P1", at="2026-03-03T09:00:00"),
    ]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    return ctx_dir, path


def _ids(rev, section: str) -> list[str]:
    return [f.user_id for f in rev.section(section)]


def test_every_section_finds_what_was_put_there(site) -> None:
    ctx_dir, events = site
    ctx = Context.load(ctx_dir)
    # a trainee who never expires, added as a roster change
    ctx.upsert_row(
        "staff",
        {
            "user_id": "t-open",
            "family_name": "Lu",
            "given_name": "T",
            "role": "trainee",
            "department_id": "CARD",
            "clearance": "2",
            "valid_from": "2026-01-01",
            "valid_until": "",
            "supervisor_id": "d-card",
            "address": "",
        },
    )
    rev = access_review(ctx, events, idle_days=7, ending_days=14, min_days_used=10)
    assert rev.as_of == "2026-03-20"  # the log's last access
    assert _ids(rev, "open_ended") == ["t-open"]
    # the vendor's account and grant end on 31 March, within 14 days of the 20th
    ending = rev.section("ending_soon")
    assert [(f.user_id, f.what) for f in ending] == [
        ("v-it", "account ends 2026-03-31"),
        ("v-it", "grant 'PACS maintenance' (RAD) ends 2026-03-31"),
    ]
    # valid on the 20th, not used in the 7 days before: everyone but p-card and n-card
    dormant = _ids(rev, "dormant")
    assert "v-it" in dormant and "t-open" in dormant and "n-orth" in dormant
    assert "p-card" not in dormant and "n-card" not in dormant and "leaver" not in dormant
    (vit,) = [f for f in rev.section("dormant") if f.user_id == "v-it"]
    assert vit.what.startswith("last used 2026-03-03, 17 days before")
    outside = {f.user_id: f.what for f in rev.section("outside_validity")}
    assert outside == {
        "ghost": "not on the roster: 1 access(es), last 2026-03-07",
        "leaver": "used 2 after its end 2026-03-01; last 2026-03-06",
    }
    # p-card's clearance 4 against sensitivity 1 on 19 days; n-card opens what it is cleared for
    (over,) = rev.section("clearance_above_use")
    assert over.user_id == "p-card" and over.what.endswith("on 19 days of use: 1")
    assert over.supervisor == "d-card" and over.department == "Cardiology (CARD)"
    text = rev.to_text()
    assert "Clearance above use: 1" in text and "P1" not in text  # no patient named
    assert rev.notes == []  # 18 days of log cover the 7 idle days asked for


def test_a_short_log_says_what_dormant_means_and_the_command(site, tmp_path) -> None:
    ctx_dir, events = site
    rev = access_review(Context.load(ctx_dir), events)
    assert rev.notes and "The log covers 18 days" in rev.notes[0]
    with pytest.raises(ReviewError, match="no such events file"):
        access_review(Context.load(ctx_dir), tmp_path / "nope.jsonl")
    out = tmp_path / "review.json"
    base = [*EMRWATCH, "access-review", "--context", str(ctx_dir), "--events", str(events)]
    proc = subprocess.run(
        [*base, "--as-of", "2026-03-25", "--output", "json", "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["as_of"] == "2026-03-25"
    assert [f["user_id"] for f in doc["sections"]["outside_validity"]] == ["ghost", "leaver"]
    assert (out.stat().st_mode & 0o777) == 0o600
    proc = subprocess.run(
        [*base, "--as-of", "25 March"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2 and "is not a date" in proc.stderr

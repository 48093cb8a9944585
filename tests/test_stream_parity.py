"""``replay --stream`` raises exactly the alerts of in-process ``replay`` on a simulated hospital."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from pipeline.replay import replay_file
from pipeline.stream_replay import run_stream_replay


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.simulate import simulate

    out = tmp_path_factory.mktemp("sim")
    simulate(out, days=1, seed=20261126, scale=0.5)
    # a malformed line in the feed: skipped and reported by both paths, never fatal
    with (out / "events.ndjson").open("ab") as fh:
        fh.write(b'{"resourceType": "AuditEvent", "id": "broken"\n')
    return out


def test_stream_replay_matches_in_process_replay(hospital: Path) -> None:
    events = hospital / "events.ndjson"
    ref = replay_file(hospital, events)
    errors = io.StringIO()
    res = run_stream_replay(hospital, events, errors=errors, partitions=4)
    print(
        f"\nparity: {res.events} events, {len(ref.alerts)} alerts in replay, {len(res.alerts)} "
        f"through the stream ({res.alert_records} versions on the topic), {res.seconds:.1f}s"
    )
    assert ref.alerts, "the simulated hospital must raise alerts"
    assert res.events == ref.events and res.bad == ref.bad == 1
    assert "skipped" in errors.getvalue() and str(events) in errors.getvalue()
    assert [a["alert_id"] for a in res.alerts] == [a.alert_id for a in ref.alerts]
    for got, want in zip(res.alerts, ref.alerts, strict=True):
        assert got == want.to_dict()  # the whole alert, not only its id

"""The engine on a tiny hand-written hospital: explanations, each rule family, cases, ids, state."""

from __future__ import annotations

import pytest

from detectors.config import DetectionConfig, Exception_
from detectors.engine import Engine, UserState
from emrwatch.context import Context, write_context_csv
from emrwatch.events import AccessEvent
from pipeline.replay import collapse
from tests.hospital import ev, write_hospital


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return Context.load(write_hospital(tmp_path_factory.mktemp("hospital")))


def run(ctx, events, cfg=None):
    eng = Engine(ctx, cfg)
    alerts = {}
    for d in events:
        for a in eng.process(AccessEvent.from_dict(d)):
            alerts[a.alert_id] = a
    return eng, list(alerts.values())


def explanations(ctx, d):
    eng = Engine(ctx)
    return eng.facts(AccessEvent.from_dict(d), UserState())


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (ev("n-card", "P1"), {"care_department"}),
        (ev("p-card", "P1"), {"care_department", "attending"}),
        (ev("t-rad", "P2"), {"service_department"}),
        (ev("c-bill", "P-DIS", resource="Account", at="2026-03-02T10:00:00"), {"administrative"}),
        (ev("v-it", "P1"), set()),  # vendor: only a grant explains, and RAD has no encounter for P1
        (ev("n-ed", "P2", emergency=True, purpose="BTG"), {"emergency_department"}),
        (ev("n-card", "P2"), set()),
        (ev("n-card", "P2", action="create", resource="DocumentReference"), {"documented"}),
    ],
)
def test_explanations(ctx, event, expected):
    assert set(explanations(ctx, event)["explanations"]) == expected


def test_explained_work_raises_nothing(ctx):
    events = [ev("n-card", "P1", at=f"2026-03-02T09:{m:02d}:00") for m in range(50)]
    events += [
        ev("p-card", "P-SEAL", at="2026-03-02T10:00:00")
    ]  # authorised care team on a sealed record
    events += [ev("p-card", "P-VIP", at="2026-03-02T10:05:00")]
    eng, alerts = run(ctx, events)
    assert alerts == []
    assert eng.explained_share == 1.0


def test_sealed_record_alerts_at_once_with_reason(ctx):
    eng, alerts = run(ctx, [ev("n-card", "P-SEAL", at="2026-03-02T11:00:00", event_id="s1")])
    assert len(alerts) == 1
    a = alerts[0]
    assert a.severity == "critical" and a.detector == ["sealed-record-touch"]
    assert a.event_ids == ["s1"] and a.patient_ids == ["P-SEAL"]
    assert "medical dispute" in a.reason and "authorised" in a.reason


def test_before_the_seal_there_is_no_violation(ctx):
    _, alerts = run(ctx, [ev("n-card", "P-SEAL", at="2026-03-01T23:00:00")])
    assert alerts == []


def test_expired_account_and_unknown_account(ctx):
    _, alerts = run(ctx, [ev("leaver", "P1", at="2026-03-05T09:00:00"), ev("nobody", "P1")])
    assert {a.user_id for a in alerts} == {"leaver", "nobody"}
    assert all(
        a.detector[0] == "account-outside-validity" and a.severity == "critical" for a in alerts
    )
    leaver = next(a for a in alerts if a.user_id == "leaver")
    assert "2026-03-01" in leaver.reason


def test_snooping_accumulates_into_one_case(ctx):
    events = [
        ev("n-orth", f"X{i}", at=f"2026-03-02T10:{i:02d}:00", event_id=f"sn{i}") for i in range(12)
    ]
    _, alerts = run(ctx, events)
    assert len(alerts) == 1
    a = alerts[0]
    assert a.detector == ["no-care-relationship"]
    assert a.event_ids == [f"sn{i}" for i in range(12)]  # the whole burst, not just the tail
    assert "12 patient record" in a.reason and "ORTH" in a.reason


def test_a_few_unexplained_looks_do_not_alert(ctx):
    events = [ev("n-orth", f"X{i}", at=f"2026-03-02T1{i}:00:00") for i in range(3)]
    _, alerts = run(ctx, events)
    assert alerts == []


def test_documentation_retracts_consult_reads(ctx):
    # a physician reads 7 unrelated patients, then writes consult notes for each: all explained
    events = []
    for i in range(7):
        events.append(ev("p-orth", f"X{i}", at=f"2026-03-02T10:{i * 2:02d}:00"))
        events.append(ev("p-orth", f"X{i}", at=f"2026-03-02T10:{i * 2:02d}:30"))
    events += [
        ev(
            "p-orth",
            f"X{i}",
            action="create",
            resource="DocumentReference",
            at=f"2026-03-02T11:{i:02d}:00",
        )
        for i in range(7)
    ]
    eng = Engine(ctx)
    emitted = [a for d in events for a in eng.process(AccessEvent.from_dict(d))]
    # the reads alone made a case; the notes explained them and the alert was retracted
    assert emitted and emitted[-1].status == "retracted"
    assert not eng.users["p-orth"].case.evidence
    assert collapse(emitted) == []


def test_coworker_vip_family_self(ctx):
    events = [
        ev("n-card", "P-EMP", at="2026-03-02T09:00:00", event_id="cw1"),
        ev("n-card", "P-EMP", at="2026-03-02T09:01:00", event_id="cw2"),
        ev("n-orth", "P-VIP", at="2026-03-02T09:00:00", event_id="vip1"),
        ev("n-orth", "P-VIP", at="2026-03-02T09:02:00", event_id="vip2"),
        ev("n-card", "P-REL", at="2026-03-03T09:00:00", event_id="fam1"),
        ev("n-card", "P-REL", at="2026-03-03T09:01:00", event_id="fam2"),
        ev("n-orth", "P-EMP", at="2026-03-04T09:00:00", event_id="self1"),
    ]
    _, alerts = run(ctx, events)
    by_first = {a.event_ids[0]: a for a in alerts}
    assert "coworker-snooping" in by_first["cw1"].detector
    assert "vip-snooping" in by_first["vip1"].detector
    assert "family-snooping" in by_first["fam1"].detector
    assert "self-access" in by_first["self1"].detector
    assert by_first["self1"].severity == "medium"
    # the coworker and no-care findings share a patient and a why: the alert says it once,
    # each finding keeps its own whole reason
    cw = by_first["cw1"]
    assert cw.detector == ["coworker-snooping", "no-care-relationship"]
    why = "not attending, not under care of CARD"
    assert cw.reason.count(why) == 1 and not cw.reason.endswith(";")
    assert "opened 1 patient record(s) with no care relationship" in cw.reason
    assert all(why in f["reason"] for f in cw.findings)


def test_bulk_export_evidence_is_the_whole_burst(ctx):
    events = [
        ev(
            "n-card",
            "P1",
            action="export",
            resource="DocumentReference",
            at=f"2026-03-02T03:{i:02d}:00",
            event_id=f"x{i}",
        )
        for i in range(30)
    ]
    _, alerts = run(ctx, events)
    assert len(alerts) == 1
    assert alerts[0].event_ids == [f"x{i}" for i in range(30)]
    assert "bulk-export" in alerts[0].detector


def test_credential_sharing_and_denied_probing(ctx):
    share = [
        ev("n-card", "P1", workstation="ws-a" if i % 2 else "ws-b", at=f"2026-03-02T09:0{i}:00")
        for i in range(6)
    ]
    probe = [
        ev("n-orth", f"X{i}", outcome="failure", at=f"2026-03-02T09:00:{i * 5:02d}")
        for i in range(6)
    ]
    _, alerts = run(ctx, share + probe)
    dets = {a.user_id: a.detector for a in alerts}
    assert "credential-sharing" in dets["n-card"]
    assert "denied-probing" in dets["n-orth"]


def test_sensitivity_above_clearance_says_both(ctx):
    _, alerts = run(ctx, [ev("c-bill", "P-PSY", at="2026-03-02T10:00:00", event_id="psy1")])
    (a,) = alerts
    assert a.detector[0] == "sensitivity-above-clearance" and a.event_ids == ["psy1"]
    assert a.reason.startswith(
        "Opened 1 record(s) of sensitivity 4, above the user's clearance of 1, 1 time(s) "
    )


def test_vendor_out_of_grant_and_clerk_reading_notes(ctx):
    events = [ev("v-it", "P1", action="export", at="2026-03-02T10:00:00")]
    events += [
        ev("c-bill", p, resource="DocumentReference", at=f"2026-03-02T10:0{i}:00")
        for i, p in enumerate(["P-DIS", "P1", "P2"])
    ]
    _, alerts = run(ctx, events)
    dets = {a.user_id: a.detector for a in alerts}
    assert "grant-out-of-scope" in dets["v-it"]
    assert "role-resource-mismatch" in dets["c-bill"]


def test_alert_ids_are_stable_and_updates_keep_the_id(ctx):
    events = [
        ev("n-orth", f"X{i}", at=f"2026-03-02T10:{i:02d}:00", event_id=f"st{i}") for i in range(15)
    ]
    eng = Engine(ctx)
    emitted = [a for d in events for a in eng.process(AccessEvent.from_dict(d))]
    assert len({a.alert_id for a in emitted}) == 1 and len(emitted) > 1
    versions = [a.version for a in emitted]
    assert versions == sorted(set(versions)), "each update carries a higher version"
    _, again = run(ctx, events)
    assert again[0].alert_id == emitted[0].alert_id


def test_snapshot_restore_continues_identically(ctx):
    events = [
        ev("n-orth", f"X{i}", at=f"2026-03-02T10:{i:02d}:00", event_id=f"sr{i}") for i in range(20)
    ]
    events += [
        ev("n-card", "P1", action="export", at=f"2026-03-02T03:{i:02d}:00") for i in range(20)
    ]
    _, whole = run(ctx, events)
    eng = Engine(ctx)
    for d in events[:9]:
        eng.process(AccessEvent.from_dict(d))
    restored = Engine.restore(ctx, None, eng.snapshot())
    alerts = {}
    for d in events[9:]:
        for a in restored.process(AccessEvent.from_dict(d)):
            alerts[a.alert_id] = a
    assert {a.alert_id: a.event_ids for a in whole} == {k: a.event_ids for k, a in alerts.items()}


def _worked_days(user, patient, days, unexplained_per_day=0):
    """``user`` works ``days`` (March 2, 3, …): explained reads of ``patient`` at 09:00, plus
    ``unexplained_per_day`` reads of far patients (X30…)."""
    out = []
    for d in range(days):
        out.append(ev(user, patient, at=f"2026-03-{2 + d:02d}T09:00:00"))
        out += [
            ev(user, f"X{30 + k}", at=f"2026-03-{2 + d:02d}T10:{k:02d}:00")
            for k in range(unexplained_per_day)
        ]
    return out


def _surge_day(user, n, day="2026-03-07"):
    """``n`` reads of distinct unrelated patients 40 minutes apart: too slow and too few for the
    no-care risk alone (0.15 a patient) or any windowed rule."""
    return [
        ev(
            user,
            f"X{i}",
            at=f"{day}T{8 + (40 * i) // 60:02d}:{(40 * i) % 60:02d}:00",
            event_id=f"su{i}",
        )
        for i in range(n)
    ]


RULES_ONLY = DetectionConfig(model_registry="none")


def test_unexplained_surge_against_the_users_own_days(ctx):
    # five fully explained days: a history of 0 unexplained patients a day (days with none
    # count; without them there would be no history and no finding)
    history = _worked_days("n-orth", "P2", 5)
    _, alerts = run(ctx, history + _surge_day("n-orth", 6), RULES_ONLY)
    assert len(alerts) == 1
    a = alerts[0]
    assert "unexplained-surge" in a.detector
    assert a.event_ids == [f"su{i}" for i in range(6)]
    assert a.reason.startswith(
        "6 patients with no care relationship in one working day, "
        "against 0 on a usual day of their own; "
    )
    # five is below the rule's floor, and no other rule adds up to a case
    _, alerts = run(ctx, history + _surge_day("n-orth", 5), RULES_ONLY)
    assert alerts == []
    # four days are too short a history to call a day unusual (a working week is needed)
    short = _worked_days("n-orth", "P2", 4)
    _, alerts = run(ctx, short + _surge_day("n-orth", 6, day="2026-03-06"), RULES_ONLY)
    assert alerts == []


def test_unexplained_surge_is_relative_to_the_users_habit(ctx):
    # someone with 2 unexplained look-ups on a usual day needs 4 x 2 = 8
    history = _worked_days("n-orth", "P2", 5, unexplained_per_day=2)
    eng, alerts = run(ctx, history + _surge_day("n-orth", 7), RULES_ONLY)
    assert not any("unexplained-surge" in a.detector for a in alerts)
    assert list(eng.users["n-orth"].days["unexplained-surge"].history) == [2] * 5
    eng, alerts = run(ctx, history + _surge_day("n-orth", 8), RULES_ONLY)
    assert any("unexplained-surge" in a.detector for a in alerts)


def test_documentation_takes_back_an_unexplained_surge(ctx):
    # the sixth chart was a consult: a note on it within the grace period explains it, today's
    # count falls back to five and the surge no longer holds
    note = ev(
        "n-orth", "X5", action="create", resource="DocumentReference", at="2026-03-07T12:30:00"
    )
    events = _worked_days("n-orth", "P2", 5) + _surge_day("n-orth", 6) + [note]
    eng = Engine(ctx, RULES_ONLY)
    emitted = [a for d in events for a in eng.process(AccessEvent.from_dict(d))]
    assert emitted[0].detector[0] == "unexplained-surge"
    assert emitted[-1].status == "retracted"
    assert collapse(emitted) == []
    dc = eng.users["n-orth"].days["unexplained-surge"]
    assert dc.unexplained_patients == {f"X{i}" for i in range(5)}
    # tomorrow's history counts the day as five unexplained patients, not six
    eng.process(AccessEvent.from_dict(ev("n-orth", "P2", at="2026-03-08T09:00:00")))
    assert list(dc.history) == [0] * 5 + [5]


def test_a_night_shift_is_one_working_day(tmp_path):
    # a night nurse (23:00-07:00): six unexplained charts in one night, three before midnight
    # and three after, are one day's six, not two calendar days' three
    from tests.hospital import STAFF, _staff

    directory = write_hospital(tmp_path / "h")
    night = _staff("n-night", "nurse", "ORTH", shift=("23:00", "07:00"), family="Lu")
    write_context_csv(directory / "staff.csv", "staff", [*STAFF, night])
    nctx = Context.load(directory)
    events = []
    for d in range(2, 7):  # five nights of explained work
        events.append(ev("n-night", "P2", at=f"2026-03-{d:02d}T23:30:00"))
        events.append(ev("n-night", "P2", at=f"2026-03-{d + 1:02d}T05:00:00"))
    times = ["07T23:10", "07T23:30", "07T23:50", "08T00:20", "08T00:40", "08T01:00"]
    events += [
        ev("n-night", f"X{i}", at=f"2026-03-{t}:00", event_id=f"nn{i}") for i, t in enumerate(times)
    ]
    eng, alerts = run(nctx, events, RULES_ONLY)
    assert [a.detector[0] for a in alerts] == ["unexplained-surge"]
    assert alerts[0].event_ids == [f"nn{i}" for i in range(6)]
    assert list(eng.users["n-night"].days["unexplained-surge"].history) == [0] * 5


def test_unexplained_surge_counts_survive_a_restore(ctx):
    history = _worked_days("n-orth", "P2", 5)
    eng = Engine(ctx, RULES_ONLY)
    for d in history:
        eng.process(AccessEvent.from_dict(d))
    restored = Engine.restore(ctx, RULES_ONLY, eng.snapshot())
    assert restored.users["n-orth"].days["unexplained-surge"].unexplained_only
    # five unexplained and one explained patient: six in all, but five of the kind counted
    day = _surge_day("n-orth", 5) + [ev("n-orth", "P2", at="2026-03-07T12:00:00")]
    out = []
    for d in day:
        out += restored.process(AccessEvent.from_dict(d))
    out += restored.flush()
    assert out == []


def test_exceptions_suppress_and_are_counted(ctx):
    cfg = DetectionConfig(exceptions=[Exception_(id="ex-1", rule="bulk-export", user_id="n-card")])
    events = [
        ev("n-card", "P1", action="export", at=f"2026-03-02T03:{i:02d}:00") for i in range(30)
    ]
    eng, alerts = run(ctx, events, cfg)
    assert alerts == []
    assert len(eng.suppressed["ex-1"]) >= 1


def test_mid_stream_seal_takes_effect_at_once(tmp_path):
    c2 = Context.load(write_hospital(tmp_path))
    eng = Engine(c2)
    assert eng.process(AccessEvent.from_dict(ev("n-card", "P1", at="2026-03-02T09:00:00"))) == []
    c2.upsert_row(
        "sealed",
        {
            "patient_id": "P1",
            "sealed_at": "2026-03-02T09:30:00+08:00",
            "reason": "dispute",
            "authorized_user_ids": "p-card",
        },
    )
    alerts = eng.process(AccessEvent.from_dict(ev("n-card", "P1", at="2026-03-02T09:45:00")))
    assert alerts and alerts[0].detector == ["sealed-record-touch"]


@pytest.mark.parametrize(
    ("at", "grace_s", "off"),
    [
        ("2026-03-02T06:50:00", 30 * 60, False),  # ten minutes early for a 07:00 shift
        ("2026-03-02T06:20:00", 30 * 60, True),  # forty minutes early
        ("2026-03-02T15:25:00", 30 * 60, False),  # charting after a 15:00 end
        ("2026-03-02T15:35:00", 30 * 60, True),
        ("2026-03-02T06:50:00", 0, True),  # no grace: the shift's own hours only
        ("2026-03-02T14:59:00", 0, False),
    ],
)
def test_off_shift_allows_a_grace_either_side_of_the_shift(ctx, at, grace_s, off):
    eng = Engine(ctx, DetectionConfig(shift_grace_s=grace_s))
    assert (
        eng.facts(AccessEvent.from_dict(ev("n-card", "P1", at=at)), UserState())["off_shift"] is off
    )


def test_a_grace_longer_than_the_hours_off_means_always_on_duty(tmp_path):
    from tests.hospital import STAFF, _staff

    directory = write_hospital(tmp_path / "h")
    long = _staff("n-long", "nurse", "ORTH", shift=("20:00", "18:00"), family="Ma")
    write_context_csv(directory / "staff.csv", "staff", [*STAFF, long])
    lctx = Context.load(directory)
    at = ev("n-long", "P1", at="2026-03-02T19:00:00")
    assert Engine(lctx, DetectionConfig(shift_grace_s=1800)).facts(
        AccessEvent.from_dict(at), UserState()
    )["off_shift"]
    assert not Engine(lctx, DetectionConfig(shift_grace_s=3600)).facts(
        AccessEvent.from_dict(at), UserState()
    )["off_shift"]


@pytest.mark.parametrize("value", [-60, 13 * 3600])
def test_shift_grace_out_of_range_is_a_config_error(value):
    from detectors.config import ConfigError

    with pytest.raises(ConfigError, match="shift_grace_s"):
        DetectionConfig.from_dict({"shift_grace_s": value})


# ------------------------------------------------------------------ accesses that arrive late
def _window_in_order(kept, span):
    """What a window holds when the accesses it took come in time order."""
    if not kept:
        return [], 0, 0
    kept = sorted(kept, key=lambda x: x[0])  # stable: equal times stay in arrival order
    inside = [x for x in kept if x[0] >= kept[-1][0] - span]
    switches = sum(1 for a, b in zip(inside, inside[1:], strict=False) if a[1] != b[1])
    return [x[0] for x in inside], switches, len({x[1] for x in inside})


def test_a_window_fed_late_accesses_equals_one_fed_in_time_order():
    import random

    from detectors.engine import Window

    rng = random.Random(20261127)
    late_seen = dropped = 0
    for _ in range(2000):
        span = rng.choice([60, 300, 600])
        accesses, t = [], 0
        for k in range(rng.randint(1, 30)):
            t += rng.choice([0, 5, 20, 60, 200])
            accesses.append((t, rng.choice("ABC"), f"e{k}"))
        # a third arrive up to 1.5 spans late: some in the window, some too late for it
        arrival = sorted(
            accesses, key=lambda a: a[0] + (rng.uniform(0, 1.5 * span) if rng.random() < 0.3 else 0)
        )
        late_seen += arrival != accesses
        w, kept = Window(True), []
        for a in arrival:
            if w.push(a[0], a[1], True, (a[2], a[0]), span):
                kept.append(a)
        dropped += len(arrival) - len(kept)
        times, switches, distinct = _window_in_order(kept, span)
        assert [x[0] for x in w.entries] == times
        assert (w.switches, len(w.distinct)) == (switches, distinct)
        assert not w.entries[0][2]  # the head's predecessor is outside: never a switch
    assert late_seen > 500 and dropped > 0  # the late paths ran


def _best_window(seen: list, t: float, span: float, switches: bool) -> tuple[int, list]:
    """Brute force: of every span-long window holding time ``t``, the one that counts most
    (switches between consecutive accesses, or distinct keys) over ``seen`` in time order."""
    seen = sorted(seen, key=lambda x: x[0])  # stable: equal times stay in arrival order
    best: tuple[int, list] = (0, [])
    for start in sorted({x[0] for x in seen if t - span <= x[0] <= t}):
        inside = [x for x in seen if start <= x[0] <= start + span]
        if switches:
            n = sum(1 for a, b in zip(inside, inside[1:], strict=False) if a[1] != b[1])
        else:
            n = len({x[1] for x in inside})
        if n > best[0]:
            best = (n, inside)
    return best


@pytest.mark.parametrize("switches", [True, False], ids=["switches", "distinct"])
def test_a_window_with_grace_correlates_an_access_older_than_its_span(switches: bool):
    """While the input arrives late (a log written in batches), a window keeps its accesses
    ``grace`` longer than its span: an access older than the span behind the newest one is
    correlated with those around it, as the best span-long window holding it."""
    import random

    from detectors.engine import Window

    rng = random.Random(7 + switches)
    old_paths = fired = 0
    for _ in range(600):
        span, grace, gte = rng.choice([60, 300, 600]), 3600.0, rng.randint(1, 4)
        accesses, t = [], 0
        for k in range(rng.randint(2, 40)):
            t += rng.choice([0, 5, 20, 60, 200, 900])
            accesses.append((t, rng.choice("ABC"), f"e{k}"))
        arrival = sorted(
            accesses, key=lambda a: a[0] + (rng.uniform(0, 3000) if rng.random() < 0.4 else 0)
        )
        w, seen = Window(not switches), []
        for a in arrival:
            newest = w.entries[-1][0] if w.entries else a[0]
            got = w.push(a[0], a[1], True, (a[2], a[0]), span, grace, gte)
            if a[0] >= newest - span:
                assert got is True
                seen.append(a)
                continue
            if a[0] < newest - span - grace:
                assert got is False
                continue
            old_paths += 1
            seen.append(a)
            keep = [x for x in seen if x[0] >= w.entries[-1][0] - span - grace]
            n, inside = _best_window(keep, a[0], span, switches)
            if n >= gte:
                fired += 1
                assert isinstance(got, list)
                assert [x[0] for x in got][0] == inside[0][0] and got[-1][0] == inside[-1][0]
                assert a[2] in {x[4][0] for x in got}  # the late access is in its window
            else:
                assert got is False
    assert old_paths > 500 and fired > 100  # the path ran, both ways


def test_no_grace_leaves_an_access_older_than_the_span_out():
    from detectors.engine import Window

    w = Window(False)
    for i, k in enumerate("ABABAB"):
        assert w.push(3000.0 + i, k, True, (f"e{i}", 3000.0 + i), 600.0) is True
    assert w.push(100.0, "B", True, ("late", 100.0), 600.0, 0.0, 1) is False
    assert not w.old


def test_an_account_at_two_workstations_logged_in_hourly_batches_correlates_across_a_restart(
    ctx,
):
    """One account at ws-a and ws-b by turns, a minute apart, for two hours; the log is
    written one workstation's hour at a time, so ws-b's hour arrives after ws-a's, up to an
    hour behind. The first hour shows the engine the delay; in the second, ws-b's accesses
    are correlated with the ws-a accesses its windows kept for them, also in an engine
    restored from a snapshot taken between the two batches."""
    docs = [
        ev(
            "n-card",
            f"P{m % 3 + 1}",
            at=f"2026-03-02T{9 + m // 60:02d}:{m % 60:02d}:00",
            workstation="ws-a" if m % 2 == 0 else "ws-b",
            event_id=f"m{m}",
        )
        for m in range(120)
    ]
    batched = sorted(docs, key=lambda d: (d["ts"][:13], d["workstation"]))
    cut = next(
        i
        for i, d in enumerate(batched)
        if d["ts"][:13].endswith("10") and d["workstation"] == "ws-b"
    )

    def shared(alerts) -> set[str]:
        return {
            ev["event_id"]
            for a in alerts
            for ev in a.to_dict()["evidence"]
            if "credential-sharing" in ev["rules"]
        }

    in_order = shared(run(ctx, docs, RULES_ONLY)[1])
    eng, alerts = run(ctx, batched, RULES_ONLY)
    found = shared(alerts)
    assert eng.late_allowance == 3600.0
    assert {f"m{m}" for m in range(60, 70)} <= found  # the second hour's first 10 minutes
    assert found <= in_order
    # a worker stops between ws-a's and ws-b's second hour and another takes over
    first, before = run(ctx, batched[:cut], RULES_ONLY)
    second = Engine.restore(ctx, RULES_ONLY, first.snapshot())
    got = {a.alert_id: a for a in before}
    for d in batched[cut:]:
        got.update((a.alert_id, a) for a in second.process(AccessEvent.from_dict(d)))
    assert [a.to_dict() for a in collapse(got.values())] == [a.to_dict() for a in collapse(alerts)]


def test_a_late_access_at_another_workstation_is_not_a_switch_back_and_forth(ctx):
    # the user moves from ws-a to ws-b once; three ws-a accesses made before the move reach
    # the monitor late, among the ws-b ones: in arrival order that is switching four times
    at = [("09:00", "ws-a"), ("09:01", "ws-a"), ("09:02", "ws-b"), ("09:03", "ws-b")]
    late = [("09:01:30", "ws-a"), ("09:01:40", "ws-a"), ("09:01:50", "ws-a")]
    events = [ev("n-card", "P1", at=f"2026-03-02T{h}:00", workstation=w) for h, w in at[:3]]
    events += [ev("n-card", "P1", at=f"2026-03-02T{h}", workstation=w) for h, w in late]
    events += [ev("n-card", "P1", at=f"2026-03-02T{h}:00", workstation=w) for h, w in at[3:]]
    for i, d in enumerate(events):
        d["event_id"] = f"late{i}"
    eng, alerts = run(ctx, events, RULES_ONLY)
    assert alerts == []
    assert eng.users["n-card"].windows["credential-sharing"].switches == 1


def test_a_late_access_from_a_closed_day_leaves_the_day_history_alone(ctx):
    eng = Engine(ctx, RULES_ONLY)
    for d in _worked_days("n-orth", "P2", 5, unexplained_per_day=1):
        eng.process(AccessEvent.from_dict(d))
    dc = eng.users["n-orth"].days["unexplained-surge"]
    history, today = list(dc.history), dc.day
    late = ev("n-orth", "X39", at="2026-03-05T11:00:00", event_id="late-day")  # day 4, after day 5
    eng.process(AccessEvent.from_dict(late))
    assert (list(dc.history), dc.day) == (history, today)
    assert dc.unexplained_patients == {"X30"}


def test_a_named_misuse_days_after_a_quiet_learned_case_opens_its_own(ctx):
    from detectors.cases import new_case

    eng = Engine(ctx, RULES_ONLY)
    st = eng.users["n-card"] = UserState()
    t0 = AccessEvent.from_dict(ev("n-card", "P1", at="2026-03-02T09:00:00")).t
    learned = st.case = new_case("n-card", "learned:v1", t0)
    learned.add_learned([("v1", t0, "P1", "view", "Observation", "ws-1", 1)], "P1", 3.5, {}, 3.0)
    # a day later (past case_gap_s, within model_case_gap_s): a relative's chart
    fam = [
        a
        for m in ("00", "01")
        for a in eng.process(
            AccessEvent.from_dict(ev("n-card", "P-REL", at=f"2026-03-03T09:{m}:00"))
        )
    ]
    assert st.case is not learned and learned.learned_only()
    assert {a.alert_id for a in fam} == {st.case.alert_id}
    assert fam[-1].detector == ["family-snooping", "no-care-relationship"]
    # a no-care access alone is weak evidence: it joins the learned case it finds
    st.case = learned
    eng.process(AccessEvent.from_dict(ev("n-card", "P2", at="2026-03-03T10:00:00")))
    assert st.case is learned and not learned.learned_only()


def test_learned_evidence_joins_the_browsing_case_the_rules_gap_closed(ctx):
    from detectors.cases import new_case

    eng = Engine(ctx, RULES_ONLY)
    cfg = eng.cfg
    st = eng.users["n-card"] = UserState()

    def at(stamp: str) -> float:
        return AccessEvent.from_dict(ev("n-card", "P1", at=stamp)).t

    t0 = at("2026-03-02T09:00:00")
    browsing = st.case = new_case("n-card", "learned:v1", t0)
    browsing.add_learned([("v1", t0, "P1", "view", "Observation", "ws-1", 1)], "P1", 3.5, {}, 3.0)
    eng.process(AccessEvent.from_dict(ev("n-card", "P2", at="2026-03-02T10:00:00")))
    assert st.case is browsing and "no-care-relationship" in browsing.evidence
    assert browsing.browsing(eng.low_rules)
    # under the alert threshold it is followed up by nothing: it closes after the rules' gap
    assert not eng._raises_alert(browsing)
    quiet = st.case
    after_gap = browsing.touched_t + cfg.case_gap_s + 60
    assert eng._case_for_learned(st, after_gap) is None and st.browse is None
    st.case = quiet
    # an alert: more unusual visits of the first day make it one
    for k, p in enumerate(("P3", "P4")):
        visit = [(f"v{k + 2}", t0 + 600 * (k + 1), p, "view", "Note", "ws-1", 1)]
        browsing.add_learned(visit, p, 4.5, {}, 3.0)
    assert eng._raises_alert(browsing)
    # the next morning, past case_gap_s: the rules' findings open a case of their own...
    eng.process(AccessEvent.from_dict(ev("n-card", "P2", at="2026-03-03T09:00:00")))
    assert st.case is not None and st.case is not browsing and st.browse is browsing
    kept = Engine.restore(ctx, RULES_ONLY, eng.snapshot()).users["n-card"].browse
    assert kept is not None and kept.alert_id == browsing.alert_id  # in the snapshot
    # ...and the user's learned evidence still joins the browsing case (a day's more
    # browsing belongs to the alert the first day raised), until model_case_gap_s of quiet
    assert eng._case_for_learned(st, at("2026-03-03T10:00:00")) is browsing
    later = browsing.touched_t + cfg.model_case_gap_s + 60
    assert eng._case_for_learned(st, later) is not browsing and st.browse is None
    # a case with a named misuse is no browsing case: closed to everything after its gap
    named = st.case = new_case("n-card", "sealed", t0)
    named.add(eng.rule_by_id["sealed-record-touch"], ("s1", t0, "P-SEAL", "view", "Note", "", 5))
    named.add_learned([("v2", t0, "P1", "view", "Observation", "ws-1", 1)], "P1", 3.5, {}, 3.0)
    assert not named.browsing(eng.low_rules)
    assert eng._case_for_learned(st, t0 + cfg.case_gap_s + 60) is None and st.browse is None


def test_a_browsing_cases_other_somewhat_unusual_visits_join_its_evidence_not_its_risk(ctx):
    """``model_follow_level``: the rest of a browsing burst is shown with the case, and
    cannot make or unmake an alert."""
    from types import SimpleNamespace

    from detectors.cases import LEARNED_RULE_ID, new_case

    eng = Engine(ctx, RULES_ONLY)
    st = eng.users["n-card"] = UserState()
    t0 = AccessEvent.from_dict(ev("n-card", "P1", at="2026-03-02T09:00:00")).t
    case = st.case = new_case("n-card", "learned:v1", t0)
    for k, p in enumerate(("P1", "P3", "P4")):
        case.add_learned([(f"v{k}", t0 + 600 * k, p, "view", "Note", "ws-1", 1)], p, 4.5, {}, 3.0)
    risk = case.risk(eng.rule_by_id, eng.cfg)

    def visit(eid: str, patient: str, level: float, explained: bool = True) -> SimpleNamespace:
        evs = [(eid, t0 + 3000, patient, "view", "Observation", "ws-1", 1)]
        v = SimpleNamespace(patient_id=patient, evidence=evs)
        return SimpleNamespace(visit=v, level=level, explained=explained, attribution={},
                               extrapolated_from=0)  # fmt: skip

    eng._learned(st, "n-card", visit("f1", "P5", 2.9), case, t0 + 3000)  # somewhat unusual
    eng._learned(st, "n-card", visit("f2", "P6", 2.5), case, t0 + 3000)  # ordinary enough
    eng._learned(st, "n-card", visit("f3", "P7", 2.9, explained=False), case, t0 + 3000)
    assert list(case.followups) == ["f1"]
    assert case.risk(eng.rule_by_id, eng.cfg) == risk and "P5" not in case.levels
    alert = eng.builder.build("n-card", case)
    assert "f1" in alert.event_ids and "P5" in alert.patient_ids
    assert next(e for e in alert.evidence if e["event_id"] == "f1")["rules"] == [LEARNED_RULE_ID]
    assert alert.risk == round(risk, 4)
    restored = Engine.restore(ctx, RULES_ONLY, eng.snapshot()).users["n-card"].case
    assert restored is not None and list(restored.followups) == ["f1"]
    # a case with no learned evidence follows nothing; and 0 turns it off
    named = st.case = new_case("n-card", "sealed", t0)
    named.add(eng.rule_by_id["sealed-record-touch"], ("s1", t0, "P-SEAL", "view", "Note", "", 5))
    eng._learned(st, "n-card", visit("f4", "P8", 2.9), named, t0 + 3000)
    assert not named.followups
    off = Engine(ctx, DetectionConfig(model_registry="none", model_follow_level=0))
    off_st = off.users["n-card"] = UserState()
    off_case = off_st.case = new_case("n-card", "learned:v9", t0)
    off_case.add_learned([("v9", t0, "P1", "view", "Note", "ws-1", 1)], "P1", 4.5, {}, 3.0)
    off._learned(off_st, "n-card", visit("f5", "P5", 2.9), off_case, t0 + 3000)
    assert not off_case.followups


def test_a_record_delivered_twice_is_one_access_for_the_counting_rules(ctx):
    # ten exports (under bulk-export's 15 an hour), which a connector re-sends after a crash
    exports = [
        ev("n-card", "P1", action="export", at=f"2026-03-02T10:{i:02d}:00", event_id=f"x{i}")
        for i in range(10)
    ]
    eng, alerts = run(ctx, exports + exports, RULES_ONLY)
    assert not any("bulk-export" in a.detector for a in alerts)
    assert eng.users["n-card"].windows["bulk-export"].count("events") == 10
    # five more, new ones, make fifteen accesses: now it is bulk
    more = [
        ev("n-card", "P1", action="export", at=f"2026-03-02T10:{20 + i:02d}:00", event_id=f"y{i}")
        for i in range(5)
    ]
    _, alerts = run(ctx, exports + exports + more, RULES_ONLY)
    (bulk,) = [a for a in alerts if "bulk-export" in a.detector]
    assert len(bulk.event_ids) == 15

"""``emrwatch history``: the stream's own history as a directory that replay, evaluate,
``rules simulate``, the notebooks and training read.

In production the access log lives on the access topic and the context on the compacted
context topics, not in files. This exports both to ``--out``:

- ``events.jsonl``: every access event on the access topic (canonical JSONL, CONTRACTS
  §3), optionally only ``--from``/``--to`` (event time, half-open). Each partition's
  events keep the order the stream received them (so every user's events are in the order
  the workers processed them) and partitions are interleaved by event time; the export
  spools per partition to disk, so memory does not grow with the length of the history.
  Context markers are skipped; records the workers dead-lettered (not canonical JSON) are
  counted, not written.
- ``<kind>.csv`` for every context kind (CONTRACTS §2): the latest row under each key,
  without the rows a tombstone deleted, i.e. the context the workers hold now.
- ``manifest.json``: what was read (topics, offset ranges per partition, counts, the
  events' period) so a model trained on it records its provenance.

The export reads each partition up to the end it saw when it started (records produced
while it runs are left for the next export) and the topics from their first retained
offset: retention bounds how far back history goes. The directory holds patient data: it
is created readable by its owner only.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import fcntl
import hashlib
import heapq
import hmac
import io
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from emrwatch.context import CONTEXT_FILES, normal_address, normal_name
from emrwatch.events import CANONICAL_FIELDS, AccessEvent, parse_ts
from pipeline.periodic import Periodic
from pipeline.topics import CONTROL_HEADER, TopicLayout, context_key, context_key_values

EVENTS_FILE = "events.jsonl"
MANIFEST_FILE = "manifest.json"
MANIFEST_NEXT = ".manifest.json.next"  # written first when the export changes (_commit)
MANIFEST_KIND = "emrwatch history export"
MAX_UPDATES = 100  # updates the manifest lists (the latest)
DAY_S = 86400.0


class HistoryError(RuntimeError):
    """The history cannot be exported (a topic is missing, the broker does not answer)."""


def _consumer(bootstrap: str, client_config: dict[str, Any] | None, client_id: str) -> Any:
    from kafka import KafkaConsumer

    return KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        group_id=None,
        fetch_max_wait_ms=50,
        client_id=client_id,
        **dict(client_config or {}),
    )


def _partitions(consumer: Any, topic: str, wait_s: float = 15.0) -> list[Any]:
    from kafka import TopicPartition

    deadline = time.monotonic() + wait_s
    parts = consumer.partitions_for_topic(topic)
    while not parts and time.monotonic() < deadline:
        time.sleep(0.1)
        parts = consumer.partitions_for_topic(topic)
    if not parts:
        raise HistoryError(f"topic {topic} does not exist (is --prefix right?)")
    return [TopicPartition(topic, p) for p in sorted(parts)]


def read_topics(
    bootstrap: str,
    topics: list[str],
    handle: Callable[[Any], None],
    client_config: dict[str, Any] | None = None,
    timeout: float = 300.0,
    resume: dict[str, dict[str, int]] | None = None,
    gaps: list[dict[str, Any]] | None = None,
) -> dict[str, dict[str, list[int]]]:
    """Hand every record of ``topics`` (all partitions, from the first retained offset) to
    ``handle``, up to the end each partition had when the read began. The end is learnt
    from fetches (the high-water mark), not ListOffsets, which some brokers under-report.
    Returns topic → partition → [first offset read, end offset].

    ``resume`` (topic → partition → offset) starts those partitions at that offset instead,
    continuing an earlier read that ended there. If retention has deleted records from
    there on, the read starts at the first retained offset and each such hole is added to
    ``gaps`` (topic, partition, the offsets lost); an offset beyond a partition's end (the
    topic was recreated, or this is another cluster) is a :class:`HistoryError`."""
    c = _consumer(bootstrap, client_config, "emrwatch-history")
    try:
        tps = [tp for t in topics for tp in _partitions(c, t, min(15.0, timeout))]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        first: dict[Any, int] = {tp: c.position(tp) for tp in tps}
        wanted: dict[Any, int] = {}
        for tp in tps:
            at = (resume or {}).get(tp.topic, {}).get(str(tp.partition))
            if at is None:
                continue
            wanted[tp] = at
            lost = resume_gap(at, first[tp])
            if lost is not None:
                if gaps is not None:
                    gaps.append({"topic": tp.topic, "partition": tp.partition, "offsets": lost})
            elif at > first[tp]:
                c.seek(tp, at)
                first[tp] = at
        stop: dict[Any, int] = {}
        deadline = time.monotonic() + timeout
        while True:
            batch = c.poll(timeout_ms=200, max_records=10000)
            for tp in tps:
                if tp not in stop and (hw := c.highwater(tp)) is not None:
                    stop[tp] = hw  # the end as of the first fetch that answered
                    if wanted.get(tp, 0) > hw:
                        raise HistoryError(
                            f"{tp.topic}:{tp.partition} ends at offset {hw}, but the export "
                            f"already holds it up to {wanted[tp]}: the topic was recreated "
                            "or this is another cluster; export into a new directory"
                        )
            for tp, recs in batch.items():
                end = stop.get(tp)
                for rec in recs:
                    if end is not None and rec.offset >= end:
                        break
                    handle(rec)
            if len(stop) == len(tps) and all(c.position(tp) >= stop[tp] for tp in tps):
                break
            if time.monotonic() > deadline:
                behind = {
                    f"{tp.topic}:{tp.partition}": [c.position(tp), stop.get(tp)]
                    for tp in tps
                    if tp not in stop or c.position(tp) < stop[tp]
                }
                raise HistoryError(f"not read to the end within {timeout:.0f}s: {behind}")
        out: dict[str, dict[str, list[int]]] = {}
        for tp in tps:
            out.setdefault(tp.topic, {})[str(tp.partition)] = [first[tp], stop[tp]]
        return out
    finally:
        c.close()


def resume_gap(resume_at: int, first_retained: int) -> list[int] | None:
    """The offsets [from, to) that retention deleted between the end of an earlier read
    (``resume_at``) and a partition's first retained offset, or None if nothing is lost."""
    if resume_at < first_retained:
        return [resume_at, first_retained]
    return None


def export_history(
    bootstrap: str,
    layout: TopicLayout,
    out: str | Path,
    start: datetime | None = None,
    end: datetime | None = None,
    client_config: dict[str, Any] | None = None,
    timeout: float = 300.0,
    pseudonymizer: Pseudonymizer | None = None,
    timezone: str | None = None,
    update: bool = False,
    keep_days: float | None = None,
) -> dict[str, Any]:
    """Write the access and context topics of ``layout`` to ``out``; returns the manifest.
    With ``pseudonymizer``, patient identifiers, names and addresses are replaced by keyed
    tokens (see :class:`Pseudonymizer`). ``timezone``, the hospital's, goes into the
    manifest, where replay, evaluate and training take it as their default.

    With ``update``, an earlier export in ``out`` is continued: only the access records
    after the offsets its manifest records are read and appended to the events file (the
    context topics are continued the same way, and read whole again now and then:
    :func:`_context_base`), under the same window and
    pseudonymization key. Without an earlier export there, it is a full export. The events
    are appended in place, and readers stop at the length the manifest commits
    (:func:`committed_length`); every other file is replaced atomically. So a report reading
    the directory meanwhile sees the old export or the new one, never half of one; two
    updates of one directory do not run at once.

    ``keep_days`` keeps only the events of the last so many days before the newest one (a
    rolling history for the feed's reports; an update keeps the export's value unless
    given another). Older events are dropped when an export is written whole, and by an
    update once the oldest kept event is a day past the limit (which rereads the file)."""
    if keep_days is not None and keep_days <= 0:
        raise HistoryError(f"keep_days must be positive, not {keep_days}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    with _locked(out):
        _recover(out)
        prev = _previous(out, layout, start, end, pseudonymizer) if update else None
        if prev is not None:
            w = prev.get("window") or {}
            start = datetime.fromisoformat(w["from"]) if w.get("from") else None
            end = datetime.fromisoformat(w["to"]) if w.get("to") else None
            timezone = timezone or prev.get("timezone")
            if keep_days is None:
                keep_days = prev.get("keep_days")
        return _export(
            bootstrap, layout, out, start, end, client_config, timeout, pseudonymizer, timezone,
            prev, keep_days,
        )  # fmt: skip


def _previous(
    out: Path,
    layout: TopicLayout,
    start: datetime | None,
    end: datetime | None,
    pseudonymizer: Pseudonymizer | None,
) -> dict[str, Any] | None:
    """The manifest of the export in ``out`` that an update continues, checked against what
    the update is asked to do; None when there is none (the update is a full export)."""
    path = out / MANIFEST_FILE
    if not path.is_file():
        if (out / EVENTS_FILE).exists():
            raise HistoryError(f"{out} holds {EVENTS_FILE} but no {MANIFEST_FILE}: not an export")
        return None
    try:
        prev = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise HistoryError(f"{path}: unreadable ({exc})") from None
    if not isinstance(prev, dict) or prev.get("kind") != MANIFEST_KIND:
        raise HistoryError(f"{path} is not the manifest of an emrwatch history export")
    if layout.access not in (prev.get("offsets") or {}):
        held = sorted(prev.get("offsets") or {})
        raise HistoryError(f"{out} is an export of {held}, not of {layout.access}")
    if not (out / EVENTS_FILE).is_file():
        raise HistoryError(f"{out}: {EVENTS_FILE} is missing; export into a new directory")
    st = (out / EVENTS_FILE).stat()
    committed = committed_length(out, st.st_ino)
    if committed is not None and st.st_size < committed:
        raise HistoryError(
            f"{out}: {EVENTS_FILE} is shorter than its manifest says ({st.st_size} < "
            f"{committed} bytes): it was cut; export into a new directory"
        )
    had = (prev.get("pseudonymized") or {}).get("key_fingerprint")
    now = pseudonymizer.describe()["key_fingerprint"] if pseudonymizer else None
    if had != now:
        if had and now:
            why = "it was pseudonymized under another key"
        elif had:
            why = "it is pseudonymized: give the same --pseudonymize-key-env"
        else:
            why = "it holds real identifiers: it cannot continue pseudonymized"
        raise HistoryError(f"{out} cannot be updated so: {why}")
    w = prev.get("window") or {}
    for flag, given, fixed in (("--from", start, w.get("from")), ("--to", end, w.get("to"))):
        if given is not None and given.isoformat() != fixed:
            raise HistoryError(
                f"{flag} {given.isoformat()}: the export's window is fixed when it is first "
                f"written ({fixed or 'open'}); export into a new directory for another"
            )
    return prev


def _export(
    bootstrap: str,
    layout: TopicLayout,
    out: Path,
    start: datetime | None,
    end: datetime | None,
    client_config: dict[str, Any] | None,
    timeout: float,
    pseudonymizer: Pseudonymizer | None,
    timezone: str | None,
    prev: dict[str, Any] | None,
    keep_days: float | None = None,
) -> dict[str, Any]:
    t_from = start.timestamp() if start else float("-inf")
    t_to = end.timestamp() if end else float("inf")

    # context: latest row per key, tombstones applied. An update continues from the rows
    # the export holds and the offsets it read them to (see _context_base); a full read
    # now and then catches deletions compaction may have dropped the tombstones of
    kinds = layout.context_topics  # topic → kind
    rows, ctx_resume = _context_base(out, kinds, prev, pseudonymizer is not None)
    bad_context: list[str] = []
    ctx_read = [0]
    # every key is context_key of its row, as _context_base needs to continue a read (an
    # export it continues had them all so: the new records decide)
    keyed = [True]

    def rows_of(kind: str) -> dict[str, dict[str, str]]:
        got = rows[kind]
        if got is None:  # an update's first record of this kind: the rows it continues
            got = rows[kind] = _context_file(out, kind)
        return got

    def on_context(rec: Any) -> None:
        ctx_read[0] += 1
        kind = kinds[rec.topic]
        key = rec.key.decode() if rec.key is not None else ""
        if rec.value is None:
            rows_of(kind).pop(key, None)
            return
        try:
            row = orjson.loads(rec.value)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
            context_key_values(kind, key)
        except ValueError as exc:
            bad_context.append(f"{rec.topic}:{rec.partition}@{rec.offset}: {exc}")
            return
        kind_rows = rows_of(kind)
        kind_rows.pop(key, None)  # an update moves the row to the end, as it was written
        kind_rows[key] = kept = {str(k): "" if v is None else str(v) for k, v in row.items()}
        if keyed[0] and context_key(kind, kept) != key:
            keyed[0] = False  # the next update cannot find this row by its key: reads whole

    ctx_gaps: list[dict[str, Any]] = []
    ctx_offsets = read_topics(
        bootstrap, list(kinds), on_context, client_config, timeout, ctx_resume, ctx_gaps
    )
    if ctx_gaps:  # records went from where the export read to: read it all again
        rows, ctx_resume, keyed[0], ctx_read[0] = {k: {} for k in kinds.values()}, None, True, 0
        ctx_offsets = read_topics(bootstrap, list(kinds), on_context, client_config, timeout)

    # access events: one spool file per partition, in offset order (what a worker saw),
    # then merged by event time; memory stays flat however long the history is
    spools: dict[int, tuple[Path, Any]] = {}
    counts = {"read": 0, "markers": 0, "unreadable": 0, "outside_window": 0}
    unreadable: list[str] = []
    first_t, last_t, kept = float("inf"), float("-inf"), 0

    def on_access(rec: Any) -> None:
        nonlocal first_t, last_t, kept
        counts["read"] += 1
        if rec.headers and any(k == CONTROL_HEADER for k, _ in rec.headers):
            counts["markers"] += 1
            return
        try:
            d = orjson.loads(rec.value)
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
            e = AccessEvent.from_dict(d)
        except ValueError as exc:  # EventError and JSON errors are ValueErrors
            counts["unreadable"] += 1
            if len(unreadable) < 20:
                unreadable.append(f"{rec.partition}:{rec.offset}: {exc}")
            return
        if not t_from <= e.t < t_to:
            counts["outside_window"] += 1
            return
        spool = spools.get(rec.partition)
        if spool is None:
            path = out / f".partition-{rec.partition}.tmp"
            spool = spools[rec.partition] = (path, _private(path, "wb"))
        d = e.to_dict() if pseudonymizer is None else pseudonymizer.event(e.to_dict())
        spool[1].write(b"%r\t" % e.t + orjson.dumps(d) + b"\n")
        first_t, last_t, kept = min(first_t, e.t), max(last_t, e.t), kept + 1

    old_summary: dict[str, Any] = (prev or {}).get("summary") or {}
    resume = None
    if prev is not None:
        ends = prev["offsets"][layout.access]
        resume = {layout.access: {p: int(hi) for p, (_, hi) in ends.items()}}
    gaps: list[dict[str, Any]] = []
    events_tmp = out / f".{EVENTS_FILE}.tmp"
    appending = False
    try:
        acc_offsets = read_topics(
            bootstrap, [layout.access], on_access, client_config, timeout, resume, gaps
        )
        for _, fh in spools.values():
            fh.close()
        # the context first, then the events, then the manifest: a reader in between
        # sees newer context with older events at worst, never a torn file
        context_counts: dict[str, int] = {}
        was_rows = old_summary.get("context_rows") or {}
        for kind in CONTEXT_FILES:
            if kind not in rows:
                continue
            kind_rows = rows[kind]
            if kind_rows is None:  # no record of it since: the export's file stands
                context_counts[kind] = int(was_rows.get(kind, 0))
                continue
            kept_rows = list(kind_rows.values())
            if pseudonymizer is not None:
                kept_rows = [pseudonymizer.context_row(kind, r) for r in kept_rows]
            context_counts[kind] = _write_csv(out / f"{kind}.csv", kind, kept_rows)
        # what the export held: its events and their period (an update's earlier part)
        held = _Held()
        if prev is not None:
            period = old_summary.get("period") or {}
            held = _Held(
                int(old_summary.get("events", 0)),
                parse_ts(period["start"]) if period else math.inf,
                parse_ts(period["end"]) if period else -math.inf,
                int(old_summary.get("trimmed", 0)),
            )
        cutoff = -math.inf
        if keep_days:
            cutoff = max(held.last, last_t) - keep_days * DAY_S
        new_parts = [path for path, _ in spools.values()]
        # An update appends to the events file in place, behind the length its manifest
        # commits (readers stop there; a crash leaves a tail _recover cuts off). An export
        # written whole, or one that drops what keep_days no longer keeps (a day past the
        # limit), writes a new file beside the old one, which replaces it together with
        # its manifest (see _commit).
        appending = prev is not None and held.first >= cutoff - DAY_S
        with _appending(out / EVENTS_FILE) if appending else _private(events_tmp, "wb") as fh:
            if prev is not None and not appending:
                with (out / EVENTS_FILE).open("rb") as old:
                    held = _copy_since(old, fh, cutoff, held)
            written, first_new = _merge(new_parts, fh, cutoff)
            fh.flush()
            os.fsync(fh.fileno())
            events_file = {"bytes": fh.tell(), "inode": os.fstat(fh.fileno()).st_ino}
    except BaseException:
        events_tmp.unlink(missing_ok=True)
        if appending:
            _recover(out)  # cut off what was appended (the next update would too)
        raise
    finally:
        for path, fh in spools.values():
            fh.close()
            path.unlink(missing_ok=True)

    now = datetime.now(UTC).isoformat(timespec="seconds")
    summary: dict[str, Any] = {
        "period": {},
        "events": held.events + written,
        "records": counts,
        "unreadable_examples": unreadable,
        "context_rows": context_counts,
        "context_rejected": bad_context[:20],
        "trimmed": held.trimmed + kept - written,
    }
    first_t, last_t = min(held.first, first_new), max(held.last, last_t)
    if prev is not None:
        summary["records"] = {
            k: int((old_summary.get("records") or {}).get(k, 0)) + v for k, v in counts.items()
        }
        summary["unreadable_examples"] = [
            *(old_summary.get("unreadable_examples") or []),
            *unreadable,
        ][:20]
        for topic in (layout.access, *(kinds if ctx_resume is not None else ())):
            topic_offsets = ctx_offsets if topic in kinds else acc_offsets
            for p, (lo, hi) in topic_offsets[topic].items():
                was = prev["offsets"].get(topic, {}).get(p)
                topic_offsets[topic][p] = [int(was[0]) if was else lo, hi]
        gaps = [*(prev.get("gaps") or []), *gaps]
    if summary["events"]:
        summary["period"] = {
            "start": datetime.fromtimestamp(first_t, UTC).isoformat(),
            "end": datetime.fromtimestamp(last_t, UTC).isoformat(),
        }
    manifest: dict[str, Any] = {
        "kind": MANIFEST_KIND,
        "exported_at": prev["exported_at"] if prev is not None else now,
        "updated_at": now,
        "bootstrap": bootstrap,
        "window": {
            "from": start.isoformat() if start else None,
            "to": end.isoformat() if end else None,
        },
        "offsets": {**acc_offsets, **ctx_offsets},
        "summary": summary,
        "pseudonymized": pseudonymizer.describe() if pseudonymizer is not None else None,
        "gaps": gaps,
        "updates": [
            *(prev.get("updates") or [] if prev is not None else [])[-(MAX_UPDATES - 1) :],
            {
                "at": now,
                "events": kept,
                "records": counts["read"],
                "context_records": ctx_read[0],
                "context_whole": ctx_resume is None,
            },
        ],  # fmt: skip
        "context_read_whole_at": (
            now if ctx_resume is None else (prev or {}).get("context_read_whole_at", now)
        ),
        "context_keyed": keyed[0],
    }
    if timezone:
        manifest["timezone"] = timezone
    if keep_days:
        manifest["keep_days"] = keep_days
    manifest["events_file"] = events_file
    if appending:
        with _replacing(out / MANIFEST_FILE) as fh:  # this commits what was appended
            fh.write(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    else:
        _commit(out, events_tmp, manifest)
    return manifest


def _appending(path: Path) -> Any:
    """The events file of an export, opened at its end to append to it (``_recover`` has
    cut off what no manifest commits)."""
    fh = path.open("r+b")
    fh.seek(0, os.SEEK_END)
    return fh


def committed_length(out: str | Path, inode: int) -> int | None:
    """How many bytes of the events file with ``inode`` the manifest of the export in
    ``out`` commits (None: no such manifest, or it is about another file). An update
    appends to that file in place, so a reader stops there: it reads the export as of
    its last complete update, never a part-written line."""
    try:
        m = orjson.loads((Path(out) / MANIFEST_FILE).read_bytes())
        ef = m["events_file"]
        if m.get("kind") == MANIFEST_KIND and int(ef["inode"]) == inode:
            return int(ef["bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _commit(out: Path, events_tmp: Path, manifest: dict[str, Any]) -> None:
    """Put a new events file and its manifest in place as one step, as far as a crash is
    concerned: the manifest goes to ``manifest.json.next`` first, naming the new events
    file's inode; then the events file, then the manifest are moved into place. A crash in
    between is settled by :func:`_recover` at the next export: the pair is finished if
    the events file was moved, else dropped, so an update never appends the same records
    twice nor skips any."""
    nxt = out / MANIFEST_NEXT
    try:
        with _replacing(nxt) as fh:
            fh.write(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
        os.replace(events_tmp, out / EVENTS_FILE)
    finally:
        events_tmp.unlink(missing_ok=True)
    os.replace(nxt, out / MANIFEST_FILE)


def _recover(out: Path) -> None:
    """Settle an export that stopped inside :func:`_commit` (see there), or an update that
    stopped after appending to the events file and before its manifest: the events
    beyond the length the manifest commits are cut off (their records are read again)."""
    nxt = out / MANIFEST_NEXT
    if nxt.exists():
        _recover_commit(out, nxt)
    events = out / EVENTS_FILE
    try:
        st = events.stat()
    except FileNotFoundError:
        return
    committed = committed_length(out, st.st_ino)
    if committed is not None and st.st_size > committed:
        with events.open("r+b") as fh:
            fh.truncate(committed)
            os.fsync(fh.fileno())


def _recover_commit(out: Path, nxt: Path) -> None:
    try:
        want = orjson.loads(nxt.read_bytes())["events_file"]["inode"]
        moved = (out / EVENTS_FILE).stat().st_ino == want
    except (OSError, ValueError, KeyError, TypeError):
        moved = False
    if moved:
        os.replace(nxt, out / MANIFEST_FILE)
    else:
        nxt.unlink()


@dataclass(frozen=True)
class _Held:
    """What an export's events file holds: how many events, their first and last time,
    and how many older ones ``keep_days`` has dropped so far."""

    events: int = 0
    first: float = math.inf
    last: float = -math.inf
    trimmed: int = 0


def _copy_since(src: Any, dst: Any, cutoff: float, held: _Held) -> _Held:
    """Copy the lines of ``src`` whose event time is ``cutoff`` or later to ``dst``;
    returns what is held then."""
    events, first, last = 0, math.inf, -math.inf
    for line in src:
        t = parse_ts(orjson.loads(line)["ts"])
        if t < cutoff:
            continue
        dst.write(line)
        events, first, last = events + 1, min(first, t), max(last, t)
    return _Held(events, first, last, held.trimmed + held.events - events)


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold ``out`` for one export or update at a time (an advisory lock on the directory)."""
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise HistoryError(f"another export is writing {out} now") from None
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[Any]:
    """A new ``path`` (binary, owner-only) written beside it and moved over it when
    complete: readers see the old file or the new one, never a part of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    fh = _private(tmp, "wb")
    try:
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class HistoryKeeper(Periodic):
    """Keeps a history directory current while a service runs: an update
    (:func:`export_history` with ``update``) at start and then every ``every_s`` seconds,
    in a background thread. A failed update (broker away, disk full) is logged and tried
    again at the next turn; the directory keeps the last complete export meanwhile, and
    its manifest's ``updated_at`` says how fresh it is."""

    def __init__(
        self,
        bootstrap: str,
        layout: TopicLayout,
        out: str | Path,
        every_s: float,
        client_config: dict[str, Any] | None = None,
        timezone: str | None = None,
        log: Callable[[str], None] | None = None,
        timeout: float = 300.0,
        keep_days: float | None = None,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.bootstrap, self.layout, self.out = bootstrap, layout, Path(out)
        self.timeout = timeout
        self.keep_days = keep_days
        self.on_update = on_update  # after each update, with its manifest
        self.client_config = client_config
        self.timezone = timezone
        self.log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.updates = 0  # completed since start
        self.failures = 0
        self.last_update = 0.0  # wall time of the last completed update (0: none yet)
        self.events = 0  # events the history holds after it
        self.last_error = ""
        self._holes_told = 0
        super().__init__(every_s)

    thread_name = "emrwatch-history"

    def start(self) -> HistoryKeeper:
        super().start()
        return self

    def update_once(self) -> dict[str, Any] | None:
        """One update; None (and the error logged) if it failed."""
        try:
            m = export_history(
                self.bootstrap, self.layout, self.out, client_config=self.client_config,
                timeout=self.timeout, timezone=self.timezone, update=True,
                keep_days=self.keep_days,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - the loop must outlive any one failure
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.log(f"history: update of {self.out} failed ({self.last_error}); next try in "
                     f"{self.every_s:g} s")  # fmt: skip
            return None
        self.updates += 1
        self.last_update = time.time()
        self.events = int(m["summary"]["events"])
        self.last_error = ""
        holes = retention_warnings(m)
        for line in holes[self._holes_told :]:
            self.log(f"history: {line}")
        self._holes_told = len(holes)
        if self.on_update is not None:
            try:
                self.on_update(m)
            except Exception as exc:  # noqa: BLE001 - nor by what follows an update
                self.log(f"history: after the update of {self.out}: {type(exc).__name__}: {exc}")
        return m

    def run_once(self) -> dict[str, Any] | None:
        return self.update_once()


class Pseudonymizer:
    """Keyed tokens for what identifies a patient (and staff's names and addresses), so a
    data science team can replay, evaluate and train on history without seeing them.

    A token is HMAC-SHA256 of the value under a secret key, namespaced by kind: the same
    value always gives the same token under one key, so everything the detectors compare
    for equality still compares equal (a patient across events, encounters and seals;
    surname and address, normalised as :func:`emrwatch.context.family_key` does, between
    staff and patients), and replaying the export raises the same alerts on the same
    events. Without the key a token cannot be reversed or recomputed from a guessed value.
    Staff user ids, departments, times and actions stay as they are (they are what the
    detectors judge); a seal's free-text reason is dropped, and so are non-canonical event
    fields a connector may have added."""

    #: kind → (field, token namespace); names and addresses are normalised first
    CONTEXT_FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
        "patients": (
            ("patient_id", "patient"),
            ("family_name", "name"),
            ("given_name", "name"),
            ("address", "address"),
        ),
        "staff": (("family_name", "name"), ("given_name", "name"), ("address", "address")),
        "encounters": (("encounter_id", "encounter"), ("patient_id", "patient")),
        "sealed": (("patient_id", "patient"),),
    }
    EVENT_FIELDS = (("patient_id", "patient"), ("encounter_id", "encounter"))

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the pseudonymization key must be at least 16 bytes")
        self._key = key

    def token(self, namespace: str, value: str) -> str:
        if namespace == "name":
            value = normal_name(value)
        elif namespace == "address":
            value = normal_address(value)
        if not value:
            return ""
        digest = hmac.new(self._key, f"{namespace}\0{value}".encode(), hashlib.sha256).digest()
        return f"{namespace[0]}-{base64.b32encode(digest[:10]).decode().lower()}"

    def context_row(self, kind: str, row: dict[str, str]) -> dict[str, str]:
        out = dict(row)
        for name, namespace in self.CONTEXT_FIELDS.get(kind, ()):
            if name in out:
                out[name] = self.token(namespace, out[name])
        if kind == "sealed" and "reason" in out:
            out["reason"] = ""
        return {k: v for k, v in out.items() if k in CONTEXT_FILES[kind]}

    def event(self, d: dict[str, Any]) -> dict[str, Any]:
        out = {k: d[k] for k in (*CANONICAL_FIELDS, "encounter_id", "event_category") if k in d}
        for name, namespace in self.EVENT_FIELDS:
            if out.get(name):
                out[name] = self.token(namespace, str(out[name]))
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "method": "HMAC-SHA256, namespaced, 80-bit base32 tokens",
            "key_fingerprint": key_fingerprint(self._key),
            "context_fields": {k: [f for f, _ in v] for k, v in self.CONTEXT_FIELDS.items()},
            "event_fields": [f for f, _ in self.EVENT_FIELDS],
            "dropped": ["sealed.reason", "non-canonical event fields"],
        }


def key_fingerprint(key: bytes) -> str:
    """What names a secret key in a document without revealing it (12 hex digits)."""
    return hashlib.sha256(b"fingerprint\0" + key).hexdigest()[:12]


def _merge(paths: list[Path], target: Any, since: float = -math.inf) -> tuple[int, float]:
    """Interleave per-partition spools (``t<TAB>json`` lines) by event time into the open
    binary file ``target``, leaving out events before ``since``; returns how many were
    written and the first one's time.
    Each partition keeps its own order, so every user's events stay in the order the stream
    received them, exactly as a worker processed them."""
    files = [open(p, "rb") for p in paths]  # noqa: SIM115 - closed below, all of them
    try:
        streams = [((float(line[: line.index(b"\t")]), line) for line in f) for f in files]
        written, first = 0, math.inf
        for t, line in heapq.merge(*streams, key=lambda x: x[0]):
            if t < since:
                continue
            target.write(line[line.index(b"\t") + 1 :])
            written, first = written + 1, min(first, t)
        return written, first
    finally:
        for f in files:
            f.close()


def _private(path: Path, mode: str) -> Any:
    """``path`` opened for writing, readable by its owner only (it holds patient data)."""
    if path.exists():
        path.unlink()  # a file left by an earlier export keeps its mode otherwise
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    if "b" in mode:
        return os.fdopen(fd, mode)
    return os.fdopen(fd, mode, newline="", encoding="utf-8")


#: an update reads the context topics whole again after this long (compaction drops a
#: deleted row's tombstone after the topic's delete.retention.ms, 1 day by default)
CONTEXT_WHOLE_EVERY_S = 6 * 3600.0


def _context_base(
    out: Path, kinds: dict[str, str], prev: dict[str, Any] | None, pseudonymized: bool
) -> tuple[dict[str, dict[str, dict[str, str]] | None], dict[str, dict[str, int]] | None]:
    """Where the context read starts. To continue: None for every kind (its rows are the
    export's file, read only if a record of that kind comes: :func:`_context_file`) and
    the offsets the export read the topics to. To read the topics whole: no rows and
    None, for a new export, a pseudonymized one (its files hold tokens, not the rows),
    one read whole more than :data:`CONTEXT_WHOLE_EVERY_S` ago, or files not all there."""
    empty: dict[str, dict[str, dict[str, str]] | None] = {k: {} for k in kinds.values()}
    if prev is None or pseudonymized:
        return empty, None
    whole_at = prev.get("context_read_whole_at")
    if not whole_at or not prev.get("context_keyed"):
        return empty, None
    age = datetime.now(UTC) - datetime.fromisoformat(whole_at)
    offsets = prev.get("offsets") or {}
    if age.total_seconds() > CONTEXT_WHOLE_EVERY_S or not all(t in offsets for t in kinds):
        return empty, None
    if not all((out / f"{kind}.csv").is_file() for kind in kinds.values()):
        return empty, None
    resume = {t: {p: int(hi) for p, (_, hi) in offsets[t].items()} for t in kinds}
    return {k: None for k in kinds.values()}, resume


def _context_file(out: Path, kind: str) -> dict[str, dict[str, str]]:
    """The rows of the export's ``kind`` file, keyed as on the context topic."""
    contract = set(CONTEXT_FILES[kind])
    rows: dict[str, dict[str, str]] = {}
    with (out / f"{kind}.csv").open(newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            row = {k: v for k, v in r.items() if k in contract or v}
            rows[context_key(kind, row)] = row
    return rows


def _write_csv(path: Path, kind: str, rows: list[dict[str, str]]) -> int:
    """A context CSV with the CONTRACTS §2 columns first, then any others the rows carry."""
    cols = list(CONTEXT_FILES[kind])
    for r in rows:
        cols += [k for k in r if k not in cols]
    with _replacing(path) as raw:
        fh = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        w = csv.DictWriter(fh, fieldnames=cols, restval="")
        w.writeheader()
        w.writerows(rows)
        fh.flush()
        fh.detach()  # the file stays open for _replacing to sync and move
    return len(rows)


def _when(text: str | None, flag: str, parser: argparse.ArgumentParser) -> datetime | None:
    if not text:
        return None
    try:
        if len(text) == 10:  # a date: midnight UTC
            return datetime.fromisoformat(text).replace(tzinfo=UTC)
        return datetime.fromtimestamp(parse_ts(text), UTC)
    except ValueError:
        parser.error(f"{flag} {text!r}: give YYYY-MM-DD or an ISO timestamp with its UTC offset")


def add_history_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", help="the YAML file of emrwatch run (Kafka and topics)")
    where.add_argument("--bootstrap", help="HOST:PORT of a broker (plaintext)")
    parser.add_argument("--prefix", default=None, help="topic prefix (default: emrwatch)")
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--from", dest="start", help="first event time (YYYY-MM-DD: UTC midnight)")
    parser.add_argument("--to", dest="end", help="end of the window (exclusive)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to read the topics")
    parser.add_argument(
        "--pseudonymize-key-env",
        metavar="NAME",
        help="replace patient ids, encounter ids, names and addresses by keyed tokens; the "
        "key (16+ bytes) is read from this environment variable",
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="continue the export already in --out: append only the access records after "
        "the offsets its manifest.json records and refresh the context (with no export "
        "there yet: a full export); run it from a timer to keep a history directory current",
    )
    parser.add_argument(
        "--keep-days",
        type=float,
        default=None,
        help="keep only the events of the last N days before the newest (a rolling history; "
        "an update keeps the export's value unless given)",
    )


def cmd_history(args: argparse.Namespace) -> int:
    parser = argparse.ArgumentParser(prog="emrwatch history")
    start = _when(args.start, "--from", parser)
    end = _when(args.end, "--to", parser)
    client: dict[str, Any] = {}
    timezone = None
    if args.config:
        from pipeline.stream_config import StreamConfigError, load_settings

        try:
            settings = load_settings(args.config)
        except StreamConfigError as exc:
            print(f"emrwatch history: {exc}", file=sys.stderr)
            return 2
        bootstrap = settings.kafka.bootstrap_servers
        layout = settings.topics
        client = settings.kafka.kafka_python()
        timezone = settings.timezone
    else:
        bootstrap, layout = args.bootstrap, TopicLayout()
    if args.prefix:
        from dataclasses import replace

        layout = replace(layout, prefix=args.prefix)
    pseudonymizer = None
    if args.pseudonymize_key_env:
        key = os.environ.get(args.pseudonymize_key_env, "")
        if not key:
            parser.error(f"--pseudonymize-key-env: ${args.pseudonymize_key_env} is not set")
        try:
            pseudonymizer = Pseudonymizer(key.encode())
        except ValueError as exc:
            parser.error(f"--pseudonymize-key-env: {exc}")
    try:
        m = export_history(
            bootstrap, layout, args.out, start, end, client, args.timeout, pseudonymizer,
            timezone, update=args.update, keep_days=args.keep_days,
        )  # fmt: skip
    except HistoryError as exc:
        print(f"emrwatch history: {exc}", file=sys.stderr)
        return 1
    print(describe_export(m, Path(args.out)), file=sys.stderr)
    return 0


def describe_export(m: dict[str, Any], out: Path) -> str:
    """One paragraph on what an export or update wrote, and on what retention lost."""
    s = m["summary"]
    r = s["records"]
    ctx = ", ".join(f"{n} {k}" for k, n in s["context_rows"].items())
    added = ""
    if len(m.get("updates") or []) > 1:
        added = f"{m['updates'][-1]['events']} new, "
    kept = ""
    if m.get("keep_days"):
        kept = f"the last {m['keep_days']:g} days kept, {s.get('trimmed', 0)} older dropped; "
    text = (
        f"{added}{s['events']} events → {out / EVENTS_FILE} "
        f"({r['unreadable']} unreadable and {r['outside_window']} outside the window skipped; "
        f"{kept}context: {ctx})"
    )
    return "\n".join([text, *retention_warnings(m)])


def retention_warnings(m: dict[str, Any]) -> list[str]:
    """One line per hole retention left in the export of manifest ``m``."""
    return [
        f"WARNING: {g['topic']}:{g['partition']} offsets {g['offsets'][0]}–"
        f"{g['offsets'][1] - 1} were deleted by retention before this export read them: "
        "the history has a hole there"
        for g in m.get("gaps") or []
    ]


@dataclass(frozen=True)
class HistoryState:
    """What an export holds and when it was last written (from its manifest)."""

    events: int
    start: datetime | None  # the first event's time; None: no event yet
    end: datetime | None
    written: datetime


def history_state(out: str | Path) -> HistoryState | None:
    """The state of the export in ``out``; None without a readable manifest."""
    try:
        m = orjson.loads((Path(out) / MANIFEST_FILE).read_bytes())
        s = m.get("summary") or {}
        period = s.get("period") or {}
        return HistoryState(
            int(s.get("events", 0)),
            datetime.fromisoformat(period["start"]) if period else None,
            datetime.fromisoformat(period["end"]) if period else None,
            datetime.fromisoformat(m.get("updated_at") or m["exported_at"]),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None

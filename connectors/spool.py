"""Spools: what a push source received, in order, until the broker has it.

A push source without acknowledgements (syslog) cannot ask its senders to send again, so
whatever it received must survive a crash of the connector on its own. The listener
threads :meth:`Spool.append` each message; the runner's thread reads them back in the same
order with :meth:`Spool.read` and, once the broker acknowledged a batch and the runner
saved the checkpoint, tells the source :meth:`Spool.committed`.

* :class:`FileSpool` writes every message to an append-only segment file before the
  listener reads the next one (``os.write``: a killed process loses nothing; ``fsync`` at
  most every ``fsync_s`` seconds bounds what a power cut can take). Each record carries its
  sequence number, which is the source's checkpoint: after a restart the spool is read from
  the checkpoint on, so what was received but not yet on the broker is sent then. Segments
  whose every record is committed are deleted. A torn record at the end of the last
  segment (a crash in the middle of a write) is cut off with a warning; a damaged record
  anywhere else stops the spool from opening (nothing is skipped silently).
* :class:`MemorySpool` keeps them in a bounded queue: for tests and ad-hoc runs, where
  losing what is queued in a crash is acceptable.

Both block :meth:`append` while they are full, so TCP senders feel back-pressure.

>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> s = FileSpool(d)
>>> s.append(b"one", "peer #1", "10.0.0.5", {"transport": "tcp"})
1
>>> s.append(b"two", "peer #2", "10.0.0.5", {"transport": "tcp"})
2
>>> s.close()
>>> again = FileSpool(d)  # a restart: what the broker has not acknowledged is still there
>>> [(r.payload, r.checkpoint) for r in again.pending(after={"spool_seq": 1})]
[(b'two', {'spool_seq': 2})]
>>> again.close()
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson

from connectors.base import RawRecord

__all__ = ["FileSpool", "MemorySpool", "Spool", "SpoolError"]

log = logging.getLogger(__name__)

#: record header: magic, sequence number, meta length, payload length, CRC-32 of the rest
_HEADER = struct.Struct(">4sQIII")
_MAGIC = b"EWS1"
_SUFFIX = ".spool"


class SpoolError(RuntimeError):
    """The spool on disk is damaged somewhere other than its very end."""


class Spool:
    """The interface the listener and the runner's thread use."""

    def append(self, payload: bytes, position: str, peer: str, meta: Mapping[str, Any]) -> int:
        """Keep one received message; its sequence number (0: the spool was closed)."""
        raise NotImplementedError

    def read(self, after: Any, stop: threading.Event) -> Iterator[RawRecord | None]:
        """The messages after checkpoint ``after``, in order, then new ones as they come;
        ``None`` when nothing came for half a second. Ends once the spool is closed and read
        to the end, or when ``stop`` is set."""
        raise NotImplementedError

    def pending(self, after: Any = None) -> Iterator[RawRecord]:
        """The messages after ``after`` that are here now, without waiting."""
        raise NotImplementedError

    def committed(self, checkpoint: Any) -> None:
        """The broker has everything up to ``checkpoint``: its space may be reused."""

    def close(self) -> None:
        """No more appends (they return 0); readers finish what is there."""

    def describe(self) -> dict[str, Any]:
        return {}


# ------------------------------------------------------------------------------ in memory
class MemorySpool(Spool):
    def __init__(self, max_records: int = 10000) -> None:
        self.max_records = max_records
        self._q: deque[RawRecord] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._seq = 0

    def append(self, payload: bytes, position: str, peer: str, meta: Mapping[str, Any]) -> int:
        with self._cond:
            while len(self._q) >= self.max_records and not self._closed:
                self._cond.wait(0.25)
            if self._closed:
                return 0
            self._seq += 1
            self._q.append(RawRecord(payload, position, None, peer=peer, meta=meta))
            self._cond.notify_all()
            return self._seq

    def read(self, after: Any, stop: threading.Event) -> Iterator[RawRecord | None]:
        while not stop.is_set():
            with self._cond:
                if not self._q:
                    if self._closed:
                        return
                    self._cond.wait(0.5)
                raw = self._q.popleft() if self._q else None
                if raw is not None:
                    self._cond.notify_all()
            yield raw

    def pending(self, after: Any = None) -> Iterator[RawRecord]:
        while True:
            with self._cond:
                if not self._q:
                    return
                raw = self._q.popleft()
                self._cond.notify_all()
            yield raw

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def describe(self) -> dict[str, Any]:
        return {"spool": "memory", "queued": len(self._q)}


# ------------------------------------------------------------------------------ on disk
def _seq_of(checkpoint: Any) -> int:
    if isinstance(checkpoint, Mapping):
        return int(checkpoint.get("spool_seq") or 0)
    return 0


class _Segment:
    __slots__ = ("path", "first", "last", "size")

    def __init__(self, path: Path, first: int, last: int, size: int) -> None:
        self.path, self.first, self.last, self.size = path, first, last, size


class FileSpool(Spool):
    """An append-only, segmented, checksummed journal in ``directory``."""

    def __init__(
        self,
        directory: str | Path,
        *,
        segment_bytes: int = 64 << 20,
        max_bytes: int = 1 << 30,
        fsync_s: float = 0.2,
    ) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self.fsync_s = fsync_s
        self._cond = threading.Condition()
        self._closed = False
        self._committed = 0
        self._segments: list[_Segment] = self._recover()
        self._seq = self._segments[-1].last if self._segments else 0
        self._fd = -1
        self._synced = time.monotonic()
        self._dirty = False

    # -------------------------------------------------------------- opening
    def _recover(self) -> list[_Segment]:
        paths = sorted(self.dir.glob(f"*{_SUFFIX}"))
        segments: list[_Segment] = []
        for i, path in enumerate(paths):
            first = int(path.stem)
            last, good, size = first - 1, 0, path.stat().st_size
            with open(path, "rb") as fh:
                for seq, _hlen, body, intact in _frames(fh):
                    if not intact:
                        break
                    if seq != last + 1:
                        raise SpoolError(f"{path}: record {seq} follows {last}")
                    last, good = seq, good + _HEADER.size + len(body)
            if good < size:
                if i != len(paths) - 1:
                    raise SpoolError(f"{path}: damaged record at byte {good} (not the last file)")
                log.warning(
                    "spool %s: cut off %d byte(s) of a record torn by a crash", path, size - good
                )
                with open(path, "r+b") as fh:
                    fh.truncate(good)
            if last < first:  # empty
                path.unlink()
                continue
            if segments and first != segments[-1].last + 1:
                raise SpoolError(f"{path}: starts at {first}, after {segments[-1].last}")
            segments.append(_Segment(path, first, last, good))
        return segments

    # -------------------------------------------------------------- writing
    def _open_segment(self) -> None:
        path = self.dir / f"{self._seq + 1:020d}{_SUFFIX}"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._segments.append(_Segment(path, self._seq + 1, self._seq, 0))
        with contextlib.suppress(OSError):  # the new name itself survives a power cut
            dfd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def _unacked_bytes(self) -> int:
        return sum(s.size for s in self._segments if s.last > self._committed)

    def append(self, payload: bytes, position: str, peer: str, meta: Mapping[str, Any]) -> int:
        head = orjson.dumps({"position": position, "peer": peer, "meta": dict(meta)})
        with self._cond:
            while self._unacked_bytes() >= self.max_bytes and not self._closed:
                self._cond.wait(0.25)  # full: the sender waits (TCP back-pressure)
            if self._closed:
                return 0
            if self._fd < 0 or self._segments[-1].size >= self.segment_bytes:
                self._close_fd()
                self._open_segment()
            seq = self._seq + 1
            body = head + payload
            record = _HEADER.pack(_MAGIC, seq, len(head), len(payload), _crc(seq, body)) + body
            os.write(self._fd, record)  # in the kernel now: a killed process loses nothing
            self._seq = seq
            seg = self._segments[-1]
            seg.last, seg.size = seq, seg.size + len(record)
            self._dirty = True
            if time.monotonic() - self._synced >= self.fsync_s:
                self._sync()
            self._cond.notify_all()
            return seq

    def _sync(self) -> None:
        if self._fd >= 0 and self._dirty:
            os.fsync(self._fd)
            self._dirty = False
        self._synced = time.monotonic()

    def _close_fd(self) -> None:
        if self._fd >= 0:
            self._sync()
            os.close(self._fd)
            self._fd = -1

    # -------------------------------------------------------------- reading
    def read(self, after: Any, stop: threading.Event) -> Iterator[RawRecord | None]:
        cursor = _Cursor(self, _seq_of(after))
        try:
            while not stop.is_set():
                got = False
                for raw in cursor.available():
                    got = True
                    yield raw
                    if stop.is_set():
                        return
                if got:
                    continue
                with self._cond:
                    if self._seq <= cursor.seq:
                        if self._closed:
                            return
                        self._cond.wait(0.5)
                        if self._dirty and time.monotonic() - self._synced >= self.fsync_s:
                            self._sync()  # a quiet spool is synced too, not only the next append
                    idle = self._seq <= cursor.seq
                if idle:
                    yield None
        finally:
            cursor.close()

    def pending(self, after: Any = None) -> Iterator[RawRecord]:
        cursor = _Cursor(self, _seq_of(after))
        try:
            yield from cursor.available()
        finally:
            cursor.close()

    def committed(self, checkpoint: Any) -> None:
        seq = _seq_of(checkpoint)
        with self._cond:
            if seq <= self._committed:
                return
            self._committed = seq
            keep = []
            for s in self._segments:
                if s.last <= seq and s is not self._segments[-1]:
                    with contextlib.suppress(FileNotFoundError):
                        s.path.unlink()
                else:
                    keep.append(s)
            self._segments = keep
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._close_fd()
            self._cond.notify_all()

    def describe(self) -> dict[str, Any]:
        with self._cond:
            return {
                "spool": str(self.dir),
                "spool_seq": self._seq,
                "spool_committed": self._committed,
                "spool_segments": len(self._segments),
                "spool_unacked_bytes": self._unacked_bytes(),
            }


def _crc(seq: int, body: bytes) -> int:
    """The checksum of one record: its sequence number and its body."""
    return zlib.crc32(body, zlib.crc32(struct.pack(">Q", seq)))


def _frames(fh: Any) -> Iterator[tuple[int, int, bytes, bool]]:
    """(sequence number, head length, body, checksum holds) of each whole record from the
    file's position on, until the end of what is written or bytes that are not a record."""
    while True:
        header = fh.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return  # the end, or a record still being written (appends are whole writes)
        magic, seq, hlen, plen, crc = _HEADER.unpack(header)
        if magic != _MAGIC:
            return
        body = fh.read(hlen + plen)
        if len(body) < hlen + plen:
            return
        yield seq, hlen, body, _crc(seq, body) == crc


class _Cursor:
    """A reader's place in the spool: the open segment file, just after record ``seq``."""

    def __init__(self, spool: FileSpool, seq: int) -> None:
        self.spool, self.seq = spool, seq
        self.fh: Any = None
        self.path: Path | None = None

    def available(self) -> Iterator[RawRecord]:
        """The records after ``seq`` written by now (each is whole: appends are one write
        under the lock, and ``top`` is read under it)."""
        sp = self.spool
        with sp._cond:
            top = sp._seq
            segments = list(sp._segments)
        while self.seq < top:
            want = self.seq + 1
            seg = next((s for s in segments if s.first <= want <= s.last), None)
            if seg is None:  # committed and deleted before this reader got to it
                raise SpoolError(f"{sp.dir}: record {want} is no longer in the spool")
            if self.path != seg.path:
                self.close()
                self.fh, self.path = open(seg.path, "rb"), seg.path  # noqa: SIM115
            for rseq, raw in _records(self.fh, seg.path):
                if rseq < want:
                    continue  # a segment opened at its start: skip what was read before
                self.seq = rseq
                yield raw
                if rseq >= min(top, seg.last):
                    break
            else:
                if self.seq < min(top, seg.last):
                    raise SpoolError(f"{seg.path}: ends before record {self.seq + 1}")

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh, self.path = None, None


def _records(fh: Any, path: Path) -> Iterator[tuple[int, RawRecord]]:
    for seq, hlen, body, intact in _frames(fh):
        if not intact:
            raise SpoolError(f"{path}: record {seq} fails its checksum")
        head = orjson.loads(body[:hlen])
        yield (
            seq,
            RawRecord(
                body[hlen:],
                f"{head['position']} spool#{seq}",  # unique in the source, as the runner needs
                {"spool_seq": seq},
                peer=head["peer"],
                meta=head["meta"],
            ),
        )

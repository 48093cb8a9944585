"""Hospital-local time, cached: shift checks run per event and must cost a dict lookup."""

from __future__ import annotations

import json
from datetime import date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DEFAULT_TIMEZONE = "Asia/Shanghai"


def zone(name: str) -> ZoneInfo:
    """The IANA zone ``name``; ``ValueError("unknown zone ...")`` for anything else (the one
    check every config with a timezone uses).

    >>> zone("Mars/Olympus")
    Traceback (most recent call last):
    ...
    ValueError: unknown zone 'Mars/Olympus'
    """
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown zone {name!r}") from None


def recorded_timezone(directory: str | Path) -> str | None:
    """The hospital timezone a data directory records in its ``manifest.json``
    (``emrwatch simulate`` writes ``parameters.timezone``; a top-level ``timezone`` is read
    too), or None when it records none. A zone the manifest names but this machine does not
    know is a ``ValueError``: guessing another would misplace every shift."""
    path = Path(directory) / "manifest.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    params = doc.get("parameters")
    name = doc.get("timezone") or (params.get("timezone") if isinstance(params, dict) else None)
    if not isinstance(name, str) or not name:
        return None
    try:
        zone(name)
    except ValueError:
        raise ValueError(f"{path}: unknown zone {name!r}") from None
    return name


class LocalClock:
    """Converts POSIX seconds to hospital-local minute-of-day and local dates.

    The UTC offset is cached per hour, so DST zones stay right and lookups stay cheap.

    >>> c = LocalClock("Asia/Shanghai")
    >>> c.minute_of_day(0.0)  # 1970-01-01T08:00+08:00
    480
    """

    __slots__ = ("tz", "name", "_offsets")

    def __init__(self, timezone: str = DEFAULT_TIMEZONE) -> None:
        self.name = timezone
        self.tz = ZoneInfo(timezone)
        self._offsets: dict[int, int] = {}

    def offset(self, t: float) -> int:
        hour = int(t // 3600)
        off = self._offsets.get(hour)
        if off is None:
            dt = datetime.fromtimestamp(hour * 3600, self.tz)
            off = int(dt.utcoffset().total_seconds())  # type: ignore[union-attr]
            self._offsets[hour] = off
        return off

    def minute_of_day(self, t: float) -> int:
        return int(((t + self.offset(t)) % 86400) // 60)

    def local_day(self, t: float) -> int:
        """Days since the epoch in local time: a cheap key for 'today'."""
        return int((t + self.offset(t)) // 86400)

    def local_iso(self, t: float) -> str:
        return datetime.fromtimestamp(t, self.tz).isoformat(timespec="seconds")

    def hhmm(self, t: float) -> str:
        m = self.minute_of_day(t)
        return f"{m // 60:02d}:{m % 60:02d}"

    def day_start(self, d: date) -> float:
        return datetime.combine(d, time(0, 0), self.tz).timestamp()

    def day_end(self, d: date) -> float:
        """The first instant after local day ``d``: an inclusive 'valid until' bound."""
        return datetime.combine(d + timedelta(days=1), time(0, 0), self.tz).timestamp()


def parse_hhmm(value: str) -> int | None:
    """'07:30' → 450 minutes; '' → None."""
    value = (value or "").strip()
    if not value:
        return None
    hh, _, mm = value.partition(":")
    h, m = int(hh), int(mm or 0)
    if not (0 <= h <= 24 and 0 <= m < 60):
        raise ValueError(f"bad shift time {value!r}")
    return (h * 60 + m) % 1440


def in_shift(minute: int, start: int | None, end: int | None) -> bool:
    """Is local ``minute`` inside the shift? Shifts may wrap midnight (23:00→07:00).
    No shift set means always on duty.

    >>> in_shift(60, 23 * 60, 7 * 60), in_shift(12 * 60, 23 * 60, 7 * 60)
    (True, False)
    """
    if start is None or end is None or start == end:
        return True
    if start < end:
        return start <= minute < end
    return minute >= start or minute < end

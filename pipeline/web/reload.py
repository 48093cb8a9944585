"""Who may sign in, reloaded from the config file while the feed runs.

Hospital IT adds a user, removes one, changes a role or resets a second factor by
editing the ``feed:`` section of the config file; the feed (:func:`keep_reloading`, a
task of its lifespan) notices the change within :data:`CHECK_EVERY_S` and applies it
without a restart. A removed user, or one whose
password, second factor or role changed, is signed out at their next click (each request
looks the user up in the current settings; see :mod:`pipeline.web.auth`), so this is also
how a lost laptop's session is ended at once.

Only :data:`RELOADABLE` settings change this way (the users, and the sign-in policy
and limits); a change to any other (the port, the session secret, TLS files, the
sessions' maximum age…) is logged as needing a restart. A file that does not load
or validate changes nothing: the feed keeps the users it has and logs why. Every applied
change goes to the audit log (``users.reload``: who was added, removed or changed).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from pipeline.web.settings import FeedConfigError, FeedSettings

log = logging.getLogger(__name__)

CHECK_EVERY_S = 2.0
#: what a reload applies; the rest needs a restart
RELOADABLE = (
    "users",
    "require_totp",
    "directory",
    # the sign-in policy and the pages' limits, read per request (or reconfigured)
    "idle_timeout_s",
    "unmask_ttl_s",
    "page_size",
    "login_max_failures",
    "login_lockout_s",
    "login_max_failures_per_address",
    "login_address_lockout_s",
    "trusted_proxies",
)
_USERS_PART = ("users", "require_totp", "directory")


@dataclass(frozen=True)
class UsersChange:
    """What a reload changed: usernames added, removed, and changed (role, password,
    second factor, directory sign-in or display name)."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    #: other :data:`RELOADABLE` settings that changed (the sign-in policy, limits)
    settings: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, list[str]]:
        d = {"added": list(self.added), "removed": list(self.removed),
             "changed": list(self.changed)}  # fmt: skip
        if self.settings:
            d["settings"] = list(self.settings)
        return d


def users_change(old: FeedSettings, new: FeedSettings) -> UsersChange:
    """How the users of ``new`` differ from those of ``old``.

    >>> from pipeline.web.settings import User
    >>> a, b = User("ana", "h1", "analyst"), User("sam", "h2", "analyst")
    >>> users_change(FeedSettings(users=(a, b)), FeedSettings(users=(
    ...     User("ana", "h1", "supervisor"), User("li", "h3", "auditor"))))
    UsersChange(added=('li',), removed=('sam',), changed=('ana',), settings=())
    """
    was = {u.username: u for u in old.users}
    now = {u.username: u for u in new.users}
    return UsersChange(
        added=tuple(sorted(now.keys() - was.keys())),
        removed=tuple(sorted(was.keys() - now.keys())),
        changed=tuple(sorted(n for n in now.keys() & was.keys() if now[n] != was[n])),
        settings=tuple(
            name
            for name in RELOADABLE
            if name not in _USERS_PART and getattr(old, name) != getattr(new, name)
        ),
    )


class SettingsReloader:
    """Watches ``path`` (the config file the feed's settings came from) and, when it
    changes and loads, gives the current settings with the new :data:`RELOADABLE` ones."""

    def __init__(
        self,
        path: str | Path,
        settings: FeedSettings,
        check_every_s: float | None = None,
    ) -> None:
        self.path = Path(path)
        self.settings = settings
        self.check_every_s = CHECK_EVERY_S if check_every_s is None else check_every_s
        self._seen = self._stamp()
        self.loads = 0  # changed files read
        self.reloads = 0  # ... of which applied a change of users
        self.failures = 0  # ... that did not load

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def check(self) -> tuple[FeedSettings, UsersChange] | None:
        """The new settings and what changed, if the file changed and loads; else None.
        Blocking (reads the file when its time stamp, size or inode moved); one caller at
        a time (:func:`keep_reloading`)."""
        stamp = self._stamp()
        if stamp is None or stamp == self._seen:
            return None
        self._seen = stamp
        self.loads += 1
        try:
            new = FeedSettings.load(self.path)
        except (FeedConfigError, OSError, yaml.YAMLError, TypeError, ValueError) as exc:
            self.failures += 1
            log.error("feed: %s changed but was not applied (the users stay as they were): %s",
                      self.path, exc)  # fmt: skip
            return None
        old = self.settings
        restart = [
            f.name
            for f in fields(FeedSettings)
            if not f.name.startswith("_")
            and f.name not in RELOADABLE
            and getattr(new, f.name) != getattr(old, f.name)
        ]
        if restart:
            log.warning("feed: %s changed %s: restart the feed to apply", self.path,
                        ", ".join(restart))  # fmt: skip
        merged = replace(old, **{name: getattr(new, name) for name in RELOADABLE})
        if merged == old:
            return None
        change = users_change(old, merged)
        self.settings = merged
        self.reloads += 1
        log.info("feed: reloaded from %s: %s", self.path, change.as_dict())
        return merged, change


async def keep_reloading(app: Any, reloader: SettingsReloader, record: Callable[..., Any]) -> None:
    """Until cancelled (the feed's lifespan runs it): every ``check_every_s`` the file is
    checked in a worker thread, and a change is applied to the app's settings and the
    feed's and written to the audit log with ``record(actor, action, alert_id, detail)``.
    It runs whether or not requests come, so an open live stream of a removed user is
    told it is signed out at its next heartbeat."""
    import asyncio

    from starlette.concurrency import run_in_threadpool

    while True:
        await asyncio.sleep(reloader.check_every_s)
        try:
            await run_in_threadpool(_apply, app, reloader, record)
        except Exception as exc:  # noqa: BLE001 - the next turn tries again
            log.error("feed: checking %s failed: %s", reloader.path, exc)


def _apply(app: Any, reloader: SettingsReloader, record: Callable[..., Any]) -> None:
    got = reloader.check()
    if got is None:
        return
    settings, change = got
    old = app.state.settings
    app.state.settings = settings
    app.state.feed_app.reconfigure(settings)
    _end_sessions(app, old, settings, change)
    detail = {"file": str(reloader.path), **change.as_dict()}
    try:
        record("(config)", "users.reload", None, detail)
    except Exception as exc:  # noqa: BLE001 - applied all the same; say so
        log.error("feed: the users' reload could not be written to the audit log: %s", exc)


#: why the sessions of a user changed in the config file end (``feed_sessions.end_reason``)
USER_REMOVED = "user removed"
CREDENTIALS_CHANGED = "credentials changed"


def _end_sessions(app: Any, old: FeedSettings, new: FeedSettings, change: UsersChange) -> None:
    """End, in the store, the sessions of users removed or whose password, second factor
    or sign-in changed: they are refused already (each request checks the settings), and
    now stay ended if the user comes back as they were. A changed role keeps them."""
    from pipeline.web.sessions import fingerprint

    ending = [(name, USER_REMOVED) for name in change.removed]
    for name in change.changed:
        was, now = old.user(name), new.user(name)
        if was is not None and now is not None and fingerprint(was) != fingerprint(now):
            ending.append((name, CREDENTIALS_CHANGED))
    for name, why in ending:
        try:
            n = app.state.store.sessions_end_user(name, "(config)", why)
        except Exception as exc:  # noqa: BLE001 - refused all the same; say so
            log.error("feed: %s's sessions could not be ended in the store: %s", name, exc)
            continue
        if n:
            log.info("feed: ended %d session(s) of %s (%s)", n, name, why)

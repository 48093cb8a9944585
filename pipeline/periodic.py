"""A job run now and then in a daemon thread (the alert service's kept history, its
audit-log verification)."""

from __future__ import annotations

import threading
from typing import Any


class Periodic:
    """Calls :meth:`run_once` in a daemon thread ``first_s`` seconds after :meth:`start`,
    then every ``every_s`` seconds, until :meth:`stop`. ``run_once`` must not raise: a
    failure is its own to log and count, and the next turn tries again."""

    thread_name = "emrwatch-periodic"

    def __init__(self, every_s: float, first_s: float = 0.0) -> None:
        self.every_s = float(every_s)
        self.first_s = float(first_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)

    def start(self) -> Any:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def run_once(self) -> Any:
        raise NotImplementedError

    def _loop(self) -> None:
        wait = self.first_s
        while not self._stop.wait(wait):
            self.run_once()
            wait = self.every_s

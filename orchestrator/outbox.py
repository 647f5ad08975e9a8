"""Calls to a remote service (MLflow, the results store) that must not stop a study.

An Outbox makes its calls in order on one background thread, so a stalled
server never blocks the caller (Tune's event loop, a Train worker's relay). A
call that fails is retried with growing waits until it succeeds or has failed
for `give_up_after_s`; a call given up, or still waiting when `drain` runs out
of time, is counted and named in `lost`, so the caller can say so: nothing is
dropped silently.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

logger = logging.getLogger(__name__)


class Outbox:
    def __init__(self, name: str, give_up_after_s: float = 900.0, first_wait_s: float = 1.0,
                 max_wait_s: float = 30.0):
        self.name = name
        self.lost: list[str] = []  # descriptions of calls that were never made
        self._give_up_after_s, self._first_wait_s, self._max_wait_s = give_up_after_s, first_wait_s, max_wait_s
        self._queue: queue.Queue = queue.Queue()
        self._pending = 0
        self._idle = threading.Condition()
        self._closed = False
        self._current: str | None = None  # the call being made or retried now
        threading.Thread(target=self._work, name=f"outbox-{name}", daemon=True).start()

    def put(self, what: str, call: Callable[[], object]) -> threading.Event:
        """Queue a call; the event returned is set once it was made or given up."""
        done = threading.Event()
        with self._idle:
            self._pending += 1
        self._queue.put((what, call, done))
        return done

    def drain(self, timeout_s: float) -> list[str]:
        """Wait up to `timeout_s` for every call put so far; then stop taking calls.
        Returns the descriptions of the calls that were never made."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._pending and time.monotonic() < deadline:
                self._idle.wait(max(0.0, min(1.0, deadline - time.monotonic())))
            self._closed = True
            unsent = ([self._current] if self._current else []) + self._snapshot_queue()
        return self.lost + unsent

    def _snapshot_queue(self) -> list[str]:
        with self._queue.mutex:
            return [what for what, _, _ in self._queue.queue]

    def _work(self) -> None:
        while True:
            what, call, done = self._queue.get()
            if not self._closed:
                self._current = what
                self._call(what, call)
            with self._idle:
                self._current = None
                self._pending -= 1
                self._idle.notify_all()
            done.set()

    def _call(self, what: str, call: Callable[[], object]) -> None:
        started, wait = time.monotonic(), self._first_wait_s
        while not self._closed:
            try:
                call()
                return
            except Exception as err:  # any failure of the service: try again later
                if time.monotonic() - started >= self._give_up_after_s:
                    logger.error("%s: gave up on %s after %.0f s: %s", self.name, what,
                                 time.monotonic() - started, err)
                    self.lost.append(what)
                    return
                logger.warning("%s: %s failed (%s: %s); retrying in %.0f s", self.name, what,
                               type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "", wait)
                time.sleep(wait)
                wait = min(self._max_wait_s, wait * 2)

"""The one thread that calls a librdkafka consumer (worker.intake.rdkafka_consumer), in the order the calls
were queued.

confluent-kafka lets one caller at a time into a Consumer: a call from another thread waits, with no
timeout, until the one in progress returns, and that may be a ``consume()`` running a rebalance callback
that waits for the event loop. So every call is queued here and run on this thread. Inside a rebalance
callback (on this thread too) the hook's own calls, commit and pauses, are re-entrant and run at once
(``serve_until``); the others wait for the callback to return.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any


class _Call:
    """One queued call: its future, the call, and whether it may run inside a rebalance callback."""

    __slots__ = ("future", "call", "reentrant")

    def __init__(self, call: Callable[[], Any], reentrant: bool) -> None:
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.call = call
        self.reentrant = reentrant

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return  # its waiter gave up (a timed-out commit): do not send it late
        try:
            self.future.set_result(self.call())
        except BaseException as exc:  # noqa: BLE001 - handed to the waiter
            self.future.set_exception(exc)


_WAKE = object()  # a rebalance hook ended: ``serve_until`` looks again


class Owner:
    """The one daemon thread that calls the consumer, in the order the calls were queued (a daemon: a
    close that hangs on a dead broker cannot hold the process's exit; a ThreadPoolExecutor's threads are
    joined at exit)."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._deferred: collections.deque[Any] = collections.deque()  # held back during a callback: not re-entrant
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, call: Callable[[], Any], reentrant: bool = True) -> asyncio.Future:
        """Queue ``call``; its result as an asyncio future. ``reentrant=False`` (consume, close): never run
        inside a rebalance callback, but after it."""
        item = _Call(call, reentrant)
        self._calls.put(item)
        return asyncio.wrap_future(item.future)

    def post(self, call: Callable[[], Any], on_error: Callable[[BaseException], None]) -> None:
        """Queue ``call`` without waiting for it; what it raises goes to ``on_error`` (on this thread)."""
        item = _Call(call, True)
        item.future.add_done_callback(lambda f: f.exception() is not None and on_error(f.exception()))
        self._calls.put(item)

    def close(self) -> None:
        self._calls.put(None)

    def serve_until(self, done: concurrent.futures.Future) -> None:
        """On this thread, inside a rebalance callback: run the queued re-entrant calls (the hook's commit
        and pauses) until ``done``; the others wait for the callback to return."""
        done.add_done_callback(lambda _: self._calls.put(_WAKE))
        while not done.done():
            item = self._calls.get()
            if item is _WAKE:
                continue
            if item is None or not item.reentrant:
                self._deferred.append(item)
                continue
            item.run()

    def _run(self) -> None:
        while True:
            item = self._deferred.popleft() if self._deferred else self._calls.get()
            if item is None:
                return
            if item is not _WAKE:
                item.run()

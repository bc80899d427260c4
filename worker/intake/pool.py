"""The intake's decode pool: its threads (at a lower priority where asked), and handing work to it in
chunks: one submission per decode thread instead of one per record (a pool round trip is a concurrent
future, an asyncio future and a wake-up of the event loop: ~25 us of loop CPU, against a few us of work
per record to hand over)."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from worker import log

T = TypeVar("T")


def decode_pool(threads: int, nice: int = 0) -> ThreadPoolExecutor:
    """The decode threads of one intake; with ``nice`` > 0 each lowers its own priority to that nice value
    as it starts, so that when decoding fills every core the GPU process's thread (whose kernel launches
    keep the card busy) and the event loops (Kafka I/O, heartbeats) are scheduled first."""
    return ThreadPoolExecutor(threads, thread_name_prefix="decode", initializer=lower_thread_priority,
                              initargs=(nice,))


def lower_thread_priority(nice: int) -> None:
    """Raise the calling thread's nice value to ``nice`` (never lowers it: that needs privileges). Linux
    keeps a nice value per thread (setpriority on the thread id); elsewhere that call would change the
    whole process, event loop included, so nothing is done there."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid)))
    except OSError as exc:  # a pool initializer that raises breaks the pool: decoding matters more than a hint
        log.get("worker").warning("decode thread priority unchanged", decode_nice=nice, error=str(exc))


def chunks(items: Sequence[T], n: int) -> list[Sequence[T]]:
    """``items`` split into at most ``n`` contiguous, non-empty parts of near-equal length, in order
    (contiguous, so the first part, and the oldest offsets, reach the GPU first)."""
    n = max(1, min(n, len(items)))
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def run_each(fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]]) -> list[Any]:
    """``fn(*args)`` for each, in a pool thread: the result or the exception of each call, so that one
    bad record does not take the others of its chunk with it."""
    out: list[Any] = []
    for args in calls:
        try:
            out.append(fn(*args))
        except Exception as exc:  # noqa: BLE001 - the caller judges each (poison, retriable, a bug)
            out.append(exc)
    return out

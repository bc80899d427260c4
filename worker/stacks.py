"""Stack dumps on demand: ``kill -USR1 <pid>`` logs where every thread and every asyncio task of the
process waits, a JSON line (event ``stack dump``) each, and the process goes on.

For a worker that is stuck without an error (a shutdown that does not end, a partition that stops
moving): the dump shows the await it sits in, without a debugger, and without the restart that would
lose the state. The supervisor passes the signal on to its children (GPU processes, intakes) that have
installed the handler, so ``kubectl exec <pod> -- kill -USR1 1`` dumps the whole pod.

A plain ``signal.signal`` handler, not ``loop.add_signal_handler``: it runs in the main thread between
two bytecodes even where the event loop is blocked in a call (a loop's handler would wait for the loop).
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType
from typing import Any

from worker import log

DUMP_SIGNAL = signal.SIGUSR1


def snapshot(interrupted: FrameType | None = None) -> dict[str, Any]:
    """{"threads": {"name (ident)": stack}, "tasks": {"name coroutine": stack}} of this process now (the
    tasks of the calling thread's running loop, if any). ``interrupted``: the frame a signal handler was
    called in, shown as the calling thread's stack (rather than the handler's own frames)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    frames = sys._current_frames()
    if interrupted is not None:
        frames[threading.get_ident()] = interrupted
    threads = {f"{names.get(ident, 'unknown')} ({ident})": "".join(traceback.format_stack(frame))
               for ident, frame in frames.items()}
    tasks: dict[str, str] = {}
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is not None:
        for task in asyncio.all_tasks(loop):
            out = io.StringIO()
            task.print_stack(file=out)
            coro = getattr(task.get_coro(), "__qualname__", "")  # aiokafka's tasks are only Task-<n> by name
            tasks[f"{task.get_name()} {coro}".strip()] = out.getvalue()
    return {"threads": threads, "tasks": tasks}


def catches(pid: int, sig: int = DUMP_SIGNAL) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (Linux: /proc/<pid>/status, SigCgt). A child that
    has not installed one yet would die of the signal (its default action), so it is not sent one."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


def install(children: Callable[[], Iterable[int]] | None = None) -> Any:
    """Log a ``snapshot`` on SIGUSR1; then send the signal on to each of ``children()`` (pids) that
    catches it. Main thread only (Python's rule for signal handlers). Returns the handler it replaced."""
    def on_signal(_signum: int, frame: FrameType | None) -> None:
        snap, logger = snapshot(frame), log.for_signal_handler()
        # A line per thread and per task, not one for all: each readable (and greppable) alone.
        for name, stack in snap["threads"].items():
            logger.warning("stack dump", signal="SIGUSR1", thread=name, stack=stack)
        for name, stack in snap["tasks"].items():
            logger.warning("stack dump", signal="SIGUSR1", task=name, stack=stack)
        for pid in children() if children is not None else ():
            if catches(pid):
                try:
                    os.kill(pid, DUMP_SIGNAL)
                except OSError:
                    pass

    return signal.signal(DUMP_SIGNAL, on_signal)

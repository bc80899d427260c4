"""CPU time per thread of this process (and of another process), from /proc: a stage timer that needs no
hooks in the worker. A thread whose CPU time is close to the wall time of a run is what bounds it (for
the event loop: it is single-threaded by design).

Python threads are grouped by name (``MainThread`` is the event loop, ``decode_*`` the decode pool,
``gpu`` the GPU thread); threads that Python did not start (ONNX Runtime's pools, CUDA's, aiokafka's
compression) are "native". Linux only; elsewhere the numbers are empty.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _group(name: str) -> str:
    if name == "MainThread":
        return "event_loop"
    return re.sub(r"[_-]?\d+$", "", name) or name


def _stat_seconds(path: Path) -> float:
    try:
        fields = path.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


def thread_cpu() -> dict[str, float]:
    """CPU seconds so far of each thread group of this process (threads that ended are not counted)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    task_dir = Path("/proc/self/task")
    if not task_dir.is_dir():
        return out
    for entry in task_dir.iterdir():
        group = _group(names.get(int(entry.name), "native"))
        out[group] = out.get(group, 0.0) + _stat_seconds(entry / "stat")
    return out


def process_cpu(pid: int) -> float:
    return _stat_seconds(Path(f"/proc/{pid}/stat"))


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Per group, CPU seconds spent between two readings (groups of new threads count from zero)."""
    return {k: round(after[k] - before.get(k, 0.0), 3) for k in sorted(after) if after[k] - before.get(k, 0.0) > 0}

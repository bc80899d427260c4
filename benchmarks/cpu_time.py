"""CPU time per thread of this process (and of another process), from /proc: a stage timer that needs no
hooks in the worker. A thread whose CPU time is close to the wall time of a run is what bounds it (for
the event loop: it is single-threaded by design).

Python threads are grouped by name (``MainThread`` is the event loop, ``decode_*`` the decode pool,
``gpu`` the GPU thread); threads that Python did not start (ONNX Runtime's pools, CUDA's, aiokafka's
compression) are "native". Linux only; elsewhere the numbers are empty.

Across processes a run's CPU is counted from its first message, never from a moment that depends on
how fast the processes started: an intake process from its own first consumed message
(``FirstMessageCpu``, a hook inside it, since the others may still be importing and joining while it
works through the backlog), the GPU and broker processes from the first message any intake consumed
(``value_at`` over samples taken all along: they idle until then, the models already loaded).
"""

from __future__ import annotations

import asyncio
import bisect
import os
import re
import threading
import time
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _group(name: str) -> str:
    if name == "MainThread":
        return "event_loop"
    return re.sub(r"[_-]?\d+$", "", name) or name


def _seconds(stat: bytes) -> float:
    try:
        fields = stat.rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime
    except (IndexError, ValueError):
        return 0.0


def _stat_seconds(path: Path | str) -> float:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return 0.0
    try:
        return _seconds(os.read(fd, 1024))
    except OSError:
        return 0.0
    finally:
        os.close(fd)


class ThreadStats:
    """This process's threads' CPU seconds, read through descriptors kept open (``os.pread`` of a
    /proc stat file: ~3 us, against ~18 us for opening it by path each time). The bench's hook reads
    them on the intake's event loop while it works, so its own cost counts in the loop's CPU per message:
    it must stay small. ``close`` when done."""

    def __init__(self) -> None:
        self._fds: dict[int, int] = {}

    def seconds(self, tid: int) -> float:
        fd = self._fds.get(tid)
        if fd is None:
            try:
                fd = self._fds[tid] = os.open(f"/proc/self/task/{tid}/stat", os.O_RDONLY)
            except OSError:
                return 0.0
        try:
            return _seconds(os.pread(fd, 1024, 0))
        except OSError:  # the thread ended
            os.close(self._fds.pop(tid))
            return 0.0

    def groups(self) -> dict[str, float]:
        """CPU seconds so far of each thread group (threads that ended are not counted)."""
        names = {t.native_id: t.name for t in threading.enumerate()}
        try:
            tids = [int(t) for t in os.listdir("/proc/self/task")]
        except OSError:
            return {}
        for gone in set(self._fds) - set(tids):
            os.close(self._fds.pop(gone))
        out: dict[str, float] = {}
        for tid in tids:
            group = _group(names.get(tid, "native"))
            out[group] = out.get(group, 0.0) + self.seconds(tid)
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def thread_cpu() -> dict[str, float]:
    """CPU seconds so far of each thread group of this process (threads that ended are not counted)."""
    stats = ThreadStats()
    try:
        return stats.groups()
    finally:
        stats.close()


def process_cpu(pid: int) -> float:
    return _stat_seconds(Path(f"/proc/{pid}/stat"))


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Per group, CPU seconds spent between two readings (groups of new threads count from zero)."""
    return {k: round(after[k] - before.get(k, 0.0), 3) for k in sorted(after) if after[k] - before.get(k, 0.0) > 0}


def value_at(samples: list[tuple[float, float]], t: float) -> float | None:
    """The reading of (time, value) ``samples`` (in time order) last taken at or before ``t``."""
    i = bisect.bisect_right([s[0] for s in samples], t)
    return samples[i - 1][1] if i else None


class FirstMessageCpu:
    """IntakeHooks (worker.intake.process) of the bench: the intake process's CPU seconds when it had
    consumed its first message, and at its end. Pickled into the intake; plain values only.

    It looks every ``poll_s`` until the first message: what the intake spent on that first poll before
    the look (a few milliseconds at most) is left out, against thousands of messages. From then on it
    also reads the event loop's own CPU (the main thread: the decode pool's threads left out) every
    ``loop_every_s`` while messages finish, so ``loop_ms_per_message`` is the loop's share alone, counted
    to the last finished message (issue 11's bound is on that share). Every ``groups_every_s`` it also
    reads each thread group's CPU (``thread_cpu``: the loop, the decode pool, a Kafka client's threads),
    so the intake's CPU per message can be told apart from its decoding: with kafka_consumer=librdkafka
    the fetch path runs on native threads, off the loop."""

    def __init__(self, poll_s: float = 0.002, loop_every_s: float = 0.02, groups_every_s: float = 0.25) -> None:
        self.poll_s = poll_s
        self.loop_every_s = loop_every_s
        self.groups_every_s = groups_every_s
        self.groups_at_first: dict[str, float] | None = None
        self.groups_at_last: dict[str, float] | None = None
        self.groups_finished = 0
        self.at_first: float | None = None
        self.loop_at_first: float | None = None
        self.loop_at_last: float | None = None
        self.finished_at_last = 0
        self.t_first: float | None = None  # time.monotonic() (one clock for every process) at the first message
        self.t_last: float | None = None  # ... and when the last finished count was seen

    async def during(self, worker) -> None:
        counts = getattr(worker, "counts", {})
        while not counts.get("consumed"):
            await asyncio.sleep(self.poll_s)
        self.at_first = process_cpu(os.getpid())
        self.t_first = time.monotonic()
        stats, main = ThreadStats(), os.getpid()
        try:
            self.loop_at_first = stats.seconds(main)
            self.groups_at_first = stats.groups()
            groups_due = self.t_first + self.groups_every_s
            while True:
                await asyncio.sleep(self.loop_every_s)
                finished = counts.get("published", 0) + counts.get("dead_lettered", 0)
                if finished != self.finished_at_last:
                    self.finished_at_last = finished
                    self.loop_at_last = stats.seconds(main)
                    self.t_last = time.monotonic()
                    if self.t_last >= groups_due:
                        self.groups_at_last, self.groups_finished = stats.groups(), finished
                        groups_due = self.t_last + self.groups_every_s
        finally:
            stats.close()

    def report(self, worker, code: int) -> dict:
        return {"pid": os.getpid(), "cpu_at_first_message_s": self.at_first,
                "consumed": int(getattr(worker, "counts", {}).get("consumed", 0)), "exit_code": code,
                "loop_cpu_s": (None if self.loop_at_last is None or self.loop_at_first is None
                               else self.loop_at_last - self.loop_at_first),
                "loop_finished": self.finished_at_last, "t_first": self.t_first, "t_last": self.t_last,
                "groups_cpu_s": (delta(self.groups_at_first, self.groups_at_last)
                                 if self.groups_at_first is not None and self.groups_at_last is not None else None),
                "groups_finished": self.groups_finished}


def intake_cpu(end_cpu: dict[int, float], reports: list[dict]) -> dict:
    """The intake processes' CPU from each one's first message to ``end_cpu`` (pid -> CPU seconds, read
    when the run's last result arrived). An intake that consumed nothing adds 0 and is counted apart."""
    procs, idle = [], 0
    group_s: dict[str, float] = {}
    group_n = 0
    for r in reports:
        first, pid = r.get("cpu_at_first_message_s"), r.get("pid")
        if first is None or pid not in end_cpu:
            idle += 1
            continue
        cpu = max(0.0, end_cpu[pid] - first)
        n = r.get("consumed") or 0
        loop_s, finished = r.get("loop_cpu_s"), r.get("loop_finished") or 0
        groups, counted = r.get("groups_cpu_s") or {}, r.get("groups_finished") or 0
        if groups and counted:
            group_n += counted
            for g, v in groups.items():
                group_s[g] = group_s.get(g, 0.0) + v
        procs.append({"pid": pid, "cpu_s": round(cpu, 3), "consumed": n,
                      "ms_per_message": round(cpu * 1000 / n, 4) if n else None,
                      "loop_ms_per_message": round(loop_s * 1000 / finished, 4) if loop_s and finished else None,
                      # per thread group (event_loop, decode, rdkafka-poll, native: librdkafka's own threads)
                      "groups_ms_per_message": ({g: round(v * 1000 / counted, 4) for g, v in groups.items()}
                                                if groups and counted else None)})
    return {"cpu_s": round(sum(p["cpu_s"] for p in procs), 3), "processes": procs, "without_messages": idle,
            # all intakes together: each thread group's CPU over the messages finished while it was read
            "groups_ms_per_message": {g: round(v * 1000 / group_n, 4) for g, v in sorted(group_s.items())}
            if group_n else None,
            "counted_from": "each intake's first consumed message"}

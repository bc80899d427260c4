"""A worker run that stops making progress ends early, with evidence.

On the H200 a 7-intake run once sat for minutes with no result arriving and left nothing to say why;
the device time it burned could not be had back. ``watch`` follows the collector's count of results
and DLQ records; when it has not moved for ``stall_s`` before the run is complete, it writes what each
worker process is doing (``py-spy dump`` of every intake and GPU process, where py-spy is installed),
the supervisor's merged metrics and health, and returns a one-line description; the run then fails
with it instead of waiting out its time-out.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

STALL_S = float(os.environ.get("BENCH_STALL_S", "60"))  # 0: no watch
PY_SPY = shutil.which("py-spy") or next((p for p in ("/tmp/site/bin/py-spy",) if os.access(p, os.X_OK)), None)


def stalled(changed_at: float, now: float, count: int, expected: int, stall_s: float) -> bool:
    """Pure: the count, last changed at ``changed_at``, has stood still for ``stall_s`` short of ``expected``."""
    return 0 < stall_s <= now - changed_at and count < expected


def _dump(pid: int) -> str:
    if PY_SPY is None:
        return "(py-spy not installed)"
    try:
        done = subprocess.run([PY_SPY, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30)
        return done.stdout + done.stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(py-spy failed: {exc})"


def stacks(pids: dict[str, int]) -> str:
    """Every worker process's stacks (blocking: py-spy runs once per process; call off the loop)."""
    return "".join(f"===== {name} pid {pid}\n{_dump(pid)}\n" for name, pid in pids.items())


def evidence(sups: list[Any], dumped: str, path: Path) -> None:
    """The processes' stacks, then each supervisor's health and merged metrics (read here, on the loop
    that owns the supervisors), into ``path``."""
    with path.open("w") as out:
        out.write(dumped)
        for i, sup in enumerate(sups):
            out.write(f"===== supervisor {i} liveness\n{json.dumps(sup.health.liveness()[1], default=str)}\n")
            out.write(f"===== supervisor {i} readiness\n{json.dumps(sup.health.readiness()[1], default=str)}\n")
            out.write(f"===== supervisor {i} metrics\n{sup.metrics.exposition().decode('utf-8', 'replace')}\n")


async def census(bootstrap: str, topics: Sequence[str], expected: int) -> str:
    """What the topics hold, read afresh from the start by a consumer of its own: records, distinct
    keys, duplicate keys, each partition's record count against its end offset, and the missing keys
    (of 0..expected-1). Tells a record the broker lost from one the collector did not see."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    lines = []
    try:
        keys: dict[bytes, int] = {}
        for topic in topics:
            await consumer.topics()  # a metadata refresh: partitions_for_topic knows the topic then
            tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
            if not tps:
                lines.append(f"{topic}: no partitions known")
                continue
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            counts = {tp.partition: 0 for tp in tps}
            last = {tp.partition: -1 for tp in tps}
            deadline = time.monotonic() + 20
            idle = 0  # read past the end offsets until quiet: tansu's can trail the records it serves
            while time.monotonic() < deadline and idle < 5:
                got = await consumer.getmany(timeout_ms=200)
                idle = 0 if got else idle + 1
                for tp, records in got.items():
                    for r in records:
                        counts[tp.partition] += 1
                        last[tp.partition] = max(last[tp.partition], r.offset)
                        keys[r.key or b""] = keys.get(r.key or b"", 0) + 1
            for tp in tps:
                lines.append(f"{topic}[{tp.partition}]: {counts[tp.partition]} records, end offset {ends[tp]}, "
                             f"last offset read {last[tp.partition]}")
        dups = sum(n - 1 for n in keys.values() if n > 1)
        missing = [k for k in range(expected) if str(k).encode() not in keys]
        lines.append(f"all: {sum(keys.values())} records, {len(keys)} distinct keys, {dups} duplicates, "
                     f"{len(missing)} of 0..{expected - 1} missing: {missing[:40]}")
    except Exception as exc:  # noqa: BLE001 - evidence, best effort
        lines.append(f"census failed: {type(exc).__name__}: {exc}")
    finally:
        await consumer.stop()
    return "\n".join(lines)


async def watch(progress: Any, expected: int, sups: list[Any], pids: Callable[[], dict[str, int]], label: str,
                stall_s: float = STALL_S, every_s: float = 1.0, bootstrap: str = "",
                topics: Sequence[str] = ()) -> str:
    """Returns (a description of the stall) once the count stands still for ``stall_s``; never returns
    otherwise (cancel it when the run ends)."""
    if stall_s <= 0:
        await asyncio.Event().wait()
    count, changed_at = progress.value, time.monotonic()
    while True:
        await asyncio.sleep(every_s)
        now = time.monotonic()
        if progress.value != count:
            count, changed_at = progress.value, now
        if stalled(changed_at, now, count, expected, stall_s):
            path = Path(os.environ.get("OUT", "/tmp")) / f"stall-{label}-{int(time.time())}.txt"
            dumped = await asyncio.get_running_loop().run_in_executor(None, stacks, pids())
            evidence(sups, dumped, path)
            if bootstrap and topics:
                with path.open("a") as out:
                    out.write(f"===== census of {', '.join(topics)}\n{await census(bootstrap, topics, expected)}\n")
            return (f"no result or DLQ record for {stall_s:.0f} s at {count} of {expected}; "
                    f"stacks, health and metrics in {path}")

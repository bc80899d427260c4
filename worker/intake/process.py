"""The intake process: one consumer-group member and everything it owns, talking to the GPU process.

It runs the same ``Worker`` as a single-process worker, with a ``GpuClient`` in the GPU thread's
place, so every delivery guarantee is the same code: commit only after the ack, the contiguous
prefix, drain on revoke and on SIGTERM. Exit codes: the worker's (0 after a drain, 1 after a fatal
error, such as the GPU process going away). Its counters go to ``counts-<n>.json`` in the run folder
for the supervisor's summary.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from typing import Any, Protocol

from worker import log, stacks
from worker.ipc.board import Row, intake_row, intake_rows
from worker.ipc.lifetime import die_with_parent
from worker.metrics import Metrics, write_snapshot
from worker.settings import Settings

REPORT_EVERY_S = 0.5
SNAPSHOT_EVERY = 4  # reports
JOIN_TOGETHER_S = 5.0  # the longest an intake waits for the pod's other intakes before it joins anyway


class IntakeHooks(Protocol):
    """What a mode adds to an intake (worker replay: its progress and its summary). Pickled into the
    intake process, so a plain object of plain values."""

    async def during(self, worker: Any) -> None:
        """Runs beside the worker until it stops (cancelled then)."""

    def report(self, worker: Any, code: int) -> dict[str, Any]:
        """A JSON document for the supervisor's ``Outcome.reports``, made after the worker stopped."""


async def join_together(own: Row, others: list[Row], bound_s: float = JOIN_TOGETHER_S,
                        poll_s: float = 0.005) -> bool:
    """Say this intake is connected, then wait (at most ``bound_s``) until every intake of the pod is, so
    that they join the consumer group together; True if they all were in time.

    Spawned one after another, the intakes are ready to join up to ~0.7 s apart (H100 host, 7 intakes:
    imports and connections on a loaded machine). Joins that far apart cost: a broker that times the
    first rebalance per member (the local tansu) hands out the assignments as far apart, so the first
    intakes work through the backlog alone while the last still wait; on Kafka, a member that joins a
    group that is not empty starts a rebalance of its own, each revoking (draining) what the members
    before it had taken. Joined together, they get one generation, at once."""
    own.set(connected=True)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound_s
    while not all(row.get("connected") for row in others):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(poll_s)
    return True


def main(index: int, settings: Settings, plan: Any, conns: list[Any], link_name: str, slots: int,
         slot_bytes: int, decodes_on_device: bool, board: Any, run_dir: str, parent_pid: int,
         hooks: IntakeHooks | None = None, gpus: tuple[str, ...] = ("0",)) -> None:
    die_with_parent(parent_pid)
    stacks.install()  # first: the supervisor passes SIGUSR1 on only once this process catches it
    # A SIGTERM before the worker installs its handlers (the supervisor stopping during our first
    # second) must still mean "drain and exit 0", not death by signal: noted here, honoured at start.
    early: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: early.append(signum))
    log.configure(settings.log_format, settings.log_level)
    log.bind_process(f"intake-{index}")
    log.lock_lines(os.path.join(run_dir, log.LINE_LOCK_FILE))
    code = asyncio.run(_run(index, settings, plan, conns, link_name, slots, slot_bytes, decodes_on_device,
                            board, run_dir, hooks, early, gpus))
    sys.exit(code)


async def _run(index: int, settings: Settings, plan: Any, conns: list[Any], link_name: str, slots: int,
               slot_bytes: int, decodes_on_device: bool, board: Any, run_dir: str,
               hooks: IntakeHooks | None, early_signals: list[int], gpus: tuple[str, ...] = ("0",)) -> int:
    from worker.app import Worker
    from worker.health import HealthState
    from worker.ipc.client import GpuClient
    from worker.ipc.shm import Segment
    from worker.service import pipeline_for, tune_process

    tune_process(settings)
    row = Row(board, intake_row(index, len(gpus)))
    gpu_rows = [Row(board, g) for g in range(len(gpus))]
    segment = Segment.attach(link_name)
    metrics = Metrics()
    # one pipe per GPU process (the same ring); the stalest GPU's beat is the one that matters
    client = GpuClient(conns, segment, slots, slot_bytes, decodes_on_device,
                       heartbeat=lambda: min(r.get("beat") for r in gpu_rows), devices=gpus,
                       on_sent=[metrics.gpu_requests.labels(gpu=d).inc for d in gpus])
    metrics.gpu_decoding.set(1 if decodes_on_device else 0)
    health = HealthState(models_ready=True)
    others = [Row(board, r) for r in intake_rows(board, len(gpus)) if r != intake_row(index, len(gpus))]
    intake_log = log.get("intake")

    async def before_join() -> None:
        if not await join_together(row, others):
            intake_log.warning("joining the consumer group without every intake of the pod: not all connected "
                               "in time", waited_s=JOIN_TOGETHER_S)

    worker = Worker(settings, pipeline_for(settings), client, metrics=metrics, plan=plan, health=health,
                    intake_index=index, before_join=before_join)
    client.on_fatal = worker.fail
    await client.start()
    snapshot = os.path.join(run_dir, f"metrics-intake-{index}.prom")

    async def report() -> None:
        n = 0
        while True:
            row.set(beat=health.loop_heartbeat, joined=health.joined,
                    broker_ok=health.broker_ok and getattr(health, "publishing", True))
            if n % SNAPSHOT_EVERY == 0:
                write_snapshot(metrics, snapshot)
            n += 1
            await asyncio.sleep(REPORT_EVERY_S)

    reporter = asyncio.create_task(report())
    if early_signals:  # stopped before the worker's own handlers existed: it stops at once, cleanly
        worker.request_stop()
    extra = asyncio.create_task(hooks.during(worker)) if hooks is not None else None
    code = 1
    try:
        code = await worker.run()
    finally:
        reporter.cancel()
        if extra is not None:
            extra.cancel()
            await asyncio.gather(extra, return_exceptions=True)
            with open(os.path.join(run_dir, f"report-{index}.json"), "w") as f:
                json.dump(hooks.report(worker, code), f)
        row.set(joined=False)
        write_snapshot(metrics, snapshot)
        with open(os.path.join(run_dir, f"counts-{index}.json"), "w") as f:
            json.dump(worker.counts, f)
    return code

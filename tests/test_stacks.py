"""``kill -USR1`` logs every thread's and task's stack, in every process of the worker, which goes on
(worker.stacks)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.procs import PacedProducer, TopicReader, WorkerProc, source_coords, worker_env
from tests.test_faults import create_test_topics, small_pngs
from worker import log, stacks


async def _parked(event: asyncio.Event) -> None:
    await event.wait()


async def test_a_snapshot_names_the_running_tasks_and_where_they_wait():
    event = asyncio.Event()
    task = asyncio.create_task(_parked(event), name="parked-here")
    await asyncio.sleep(0)
    try:
        snap = stacks.snapshot()
    finally:
        event.set()
        await task
    stack = snap["tasks"]["parked-here _parked"]
    assert "event.wait()" in stack
    main = [stack for name, stack in snap["threads"].items() if name.startswith("MainThread")]
    assert main and "test_a_snapshot_names_the_running_tasks" in main[0]


def test_a_snapshot_outside_a_loop_has_threads_and_no_tasks():
    snap = stacks.snapshot()
    assert snap["tasks"] == {} and any(name.startswith("MainThread") for name in snap["threads"])


def test_the_signal_logs_a_dump_and_the_process_goes_on():
    out = io.StringIO()
    log.configure("json", "info", stream=out)
    old = signal.getsignal(stacks.DUMP_SIGNAL)
    try:
        stacks.install()
        os.kill(os.getpid(), stacks.DUMP_SIGNAL)
        time.sleep(0.05)  # the handler runs in this (main) thread at the next bytecode
    finally:
        signal.signal(stacks.DUMP_SIGNAL, old)
        log.configure("json", "info")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    dump = [e for e in lines if e["event"] == "stack dump"]
    assert dump and all(e["signal"] == "SIGUSR1" and "thread" in e for e in dump)  # no loop here: no tasks
    (main,) = [e["stack"] for e in dump if e["thread"].startswith("MainThread")]
    assert "test_the_signal_logs_a_dump" in main and "on_signal" not in main  # where it was, not the handler


def test_only_a_process_that_catches_the_signal_is_sent_one():
    old = signal.getsignal(stacks.DUMP_SIGNAL)
    try:
        stacks.install()
        assert stacks.catches(os.getpid())
    finally:
        signal.signal(stacks.DUMP_SIGNAL, old)
    plain = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert not stacks.catches(plain.pid)  # SIGUSR1 would kill it: the supervisor sends it nothing
    finally:
        plain.kill()
        plain.wait()
    assert not stacks.catches(plain.pid)  # gone: no /proc entry


@pytest.mark.timeout(180)
async def test_sigusr1_dumps_every_process_of_a_running_worker_which_goes_on(broker, topics, tmp_path):
    await create_test_topics(broker.bootstrap, topics, 2)
    worker = WorkerProc(worker_env(broker.bootstrap, topics, intake_processes=2), tmp_path / "worker.log").start()
    try:
        await worker.wait_ready()
        worker.signal(stacks.DUMP_SIGNAL)
        deadline = time.monotonic() + 20
        want = {None, "gpu", "intake-1", "intake-2"}  # the supervisor's lines carry no process field
        while {e.get("process") for e in worker.events() if e.get("event") == "stack dump"} != want:
            assert time.monotonic() < deadline, worker.log_tail()
            await asyncio.sleep(0.2)
        dumps = [e for e in worker.events() if e.get("event") == "stack dump"]
        tasks = {e["task"]: e["stack"] for e in dumps if e.get("process") == "intake-1" and "task" in e}
        consume = tasks["consume Worker._consume_loop"]  # the worker's stages, by name and coroutine
        assert "getmany" in consume and any(name.startswith("commit ") for name in tasks)
        gpu_threads = {e["thread"].split(" ")[0] for e in dumps if e.get("process") == "gpu"}
        assert {"MainThread", "gpu"} <= gpu_threads
        # It goes on: new images are answered, and SIGTERM still stops it cleanly.
        values, _ = small_pngs(10)
        coords = await PacedProducer(broker.bootstrap, topics["input"], values, 2, rate=1000.0).run()
        async with TopicReader(broker.bootstrap, topics["output"]) as out:
            await out.until(lambda r: {source_coords(x) for x in r} >= set(coords), timeout_s=60,
                            alive=worker.alive)
        assert worker.stop(60) == 0, worker.log_tail()
    finally:
        worker.kill()


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_an_intake_stuck_on_stop_logs_where_before_the_supervisor_kills_it(broker, topics, tmp_path):
    """Intakes whose event loop blocks once told to stop (tests.procs.StuckOnStop): the supervisor waits its
    bound (drain + rebalance timeout + 30 s), asks each for its stacks a second before the end, kills them,
    and exits 1. The dump names the blocking call."""
    await create_test_topics(broker.bootstrap, topics, 2)
    env = worker_env(broker.bootstrap, topics, intake_processes=2, drain_timeout_s=1, rebalance_timeout_s=1)
    worker = WorkerProc(env, tmp_path / "worker.log", args=("-m", "tests.procs", "stuck-on-stop")).start()
    try:
        await worker.wait_ready()
        assert worker.stop(90) == 1, worker.log_tail()
    finally:
        worker.kill()
    events = worker.events()
    for intake in ("intake-1", "intake-2"):
        dumped = [i for i, e in enumerate(events) if e.get("event") == "stack dump" and e.get("process") == intake
                  and e.get("thread", "").startswith("MainThread") and "time.sleep(600)" in e["stack"]]
        killed = [i for i, e in enumerate(events) if e.get("event", "").startswith("intake did not stop in time")
                  and e.get("child") == intake and "process" not in e  # the supervisor's line
                  and e.get("stacks") == "logged just before"]
        assert dumped and killed and dumped[0] < killed[0], worker.log_tail(40)
    stopped = [e for e in events if e.get("event") == "stopped" and "process" not in e]
    assert stopped and stopped[0]["exit_code"] == 1

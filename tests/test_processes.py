"""The process model against the real broker: K intakes + one GPU process (CPU runtime here).

Each test starts ``python -m worker run`` (the supervisor) in a subprocess with ``intake_processes=2``
and checks outcomes on the topics: every input offset has exactly one result whose values are the
bundled models applied to that input alone, kills of the GPU process or of one intake lose nothing,
SIGTERM drains with no duplicates, and no shared-memory segment is left under /dev/shm.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import check_demo_result, kafka_clients
from tests.procs import (PacedProducer, TopicReader, WorkerProc, committed_offsets, duplicates,  # noqa: F401
                         no_leftover_workers, source_coords, worker_env)
from tests.kafka_broker import both_brokers
from worker.broker import create_topics
from worker.ipc import shm
from worker.samples import encode, synth_image

pytestmark = pytest.mark.slow
K = 2


def pngs(n: int, seed: int = 5) -> tuple[list[bytes], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    pixels = [synth_image(rng, 64, 64, 3) for _ in range(48)]
    blobs = [encode(p, "png") for p in pixels]
    return [blobs[i % 48] for i in range(n)], [pixels[i % 48] for i in range(n)]


def segments_of(proc: WorkerProc) -> list[str]:
    token = shm.creator_token(proc.pid)
    return [p.name for p in shm.SHM_DIR.glob(f"{shm.PREFIX}{token.split('.')[0]}.*")]


def child_pid(proc: WorkerProc, event: str, key: str = "pid") -> int | list[int]:
    for e in proc.events():
        if e.get("event") == event:
            return e[key]
    raise AssertionError(f"no '{event}' in the log:\n{proc.log_tail()}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


async def setup(broker, topics, partitions: int = 4) -> None:
    await create_topics(broker.bootstrap, [(topics["input"], partitions), (topics["output"], partitions),
                                           (topics["dlq"], 1)])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kafka_consumer", ["aiokafka", "librdkafka"])
async def test_two_intakes_every_result_exact_one_view_and_nothing_left_in_shm(broker, topics, tmp_path, kafka_consumer):
    n = 600
    await setup(broker, topics)
    values, pixels = pngs(n)
    env = worker_env(broker.bootstrap, topics, intake_processes=K, max_batch_size=32, **kafka_clients(kafka_consumer))
    async with TopicReader(broker.bootstrap, topics["output"]) as out:
        worker = WorkerProc(env, tmp_path / "w.log").start()
        await worker.wait_ready(90)
        status, ready = worker.probe("/readyz")
        assert ready["intakes_joined"] == K and ready["models_ready"]
        coords = await PacedProducer(broker.bootstrap, topics["input"], values, 4, rate=2000).run()
        records = await out.until(lambda r: len(r) >= n, timeout_s=120, settle_s=1.0, alive=worker.alive)
        await asyncio.sleep(2.5)  # metrics snapshots are written every 2 s
        metrics = await asyncio.to_thread(_scrape, worker.port)
        live_segments = segments_of(worker)
        assert worker.stop(60) == 0, worker.log_tail()
    by_coord = {source_coords(r): r for r in records}
    assert len(records) == n and set(by_coord) == set(coords)
    for (coord, image) in zip(coords, pixels):
        check_demo_result(json.loads(by_coord[coord].value), image)
    publishers = {json.loads(r.value)["worker"]["pid"] for r in records}
    assert len(publishers) == K, "both intakes published"
    # one /metrics for the pod: each process's series, labelled
    consumed = {line.split('process="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
                for line in metrics.splitlines() if line.startswith("worker_messages_consumed_total{")}
    assert consumed["intake-1"] + consumed["intake-2"] == n and consumed.get("gpu", 0) == 0
    assert 'worker_batch_size_count{process="gpu"}' in metrics
    assert len(live_segments) == K  # one ring per intake while running ...
    assert segments_of(worker) == []  # ... and none after the exit


def _scrape(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


async def _interrupt_and_restart(broker, topics, tmp_path, n: int, rate: float, interrupt, **settings):
    """Stream ``n`` images; once a fraction has results, ``interrupt(first worker)`` (it checks how the
    worker went); then a second worker finishes the stream. Returns (input coordinates, every result)."""
    await setup(broker, topics)
    values, _ = pngs(n)
    env = worker_env(broker.bootstrap, topics, intake_processes=K, max_batch_size=16, **settings)
    producer = PacedProducer(broker.bootstrap, topics["input"], values, 4, rate=rate)
    async with TopicReader(broker.bootstrap, topics["output"]) as out:
        first = WorkerProc(env, tmp_path / "w1.log", name="first").start()
        await first.wait_ready(90)
        feed = asyncio.create_task(producer.run())
        try:
            await out.until(lambda r: len(r) >= n // 4, timeout_s=60, alive=first.alive)
            interrupt(first)
            assert segments_of(first) == []
            second = WorkerProc(env, tmp_path / "w2.log", name="second").start()
            coords = await asyncio.wait_for(feed, 90)
            want = set(coords)
            records = await out.until(lambda r: want <= {source_coords(x) for x in r}, timeout_s=120,
                                      settle_s=2.0, alive=second.alive)
        finally:
            feed.cancel()
        assert second.stop(60) == 0, second.log_tail()
    assert {source_coords(r) for r in records} == want  # 0 lost
    return coords, records


async def _kill_mid_stream(broker, topics, tmp_path, victim: str, **settings) -> None:
    """kill -9 one child (the GPU process or intake 1) mid-stream: the worker exits 1 with nothing of the
    dead one's unfinished work committed; a restart finishes everything: 0 lost, duplicates bounded."""
    n, max_in_flight, commit_ms = 1500, 64, 200

    def kill(first: WorkerProc) -> None:
        intakes = child_pid(first, "intakes started", "pids")
        pid = child_pid(first, "gpu process started; loading models") if victim == "gpu" else intakes[0]
        os.kill(pid, signal.SIGKILL)
        code = first.wait(60)
        assert code == 1, f"exit {code} after the {victim} was killed:\n{first.log_tail()}"
        assert not any(alive(p) for p in intakes), "no orphaned intake"
        text = first.log_path.read_text()
        assert ("gpu process exited" if victim == "gpu" else "intake exited; stopping the worker") in text

    coords, records = await _interrupt_and_restart(broker, topics, tmp_path, n, n / 12.0, kill,
                                                   max_in_flight=max_in_flight, commit_interval_ms=commit_ms,
                                                   **settings)
    stamps = sorted(r.timestamp for r in records)
    peak = max(np.searchsorted(stamps, t + commit_ms + 500, side="right") - i for i, t in enumerate(stamps))
    bound = K * max_in_flight + peak
    dup = duplicates(records)
    print(f"\nkill -9 {victim}: {len(records)} results for {n} inputs, duplicates={dup} (bound {bound})")
    assert dup <= bound
    by_coord = {source_coords(r): r for r in records}
    for coord, image in zip(coords, pngs(n)[1]):
        check_demo_result(json.loads(by_coord[coord].value), image)


@pytest.mark.timeout(300)
async def test_kill_9_of_the_gpu_process_mid_stream(broker, topics, tmp_path):
    await _kill_mid_stream(broker, topics, tmp_path, "gpu")


@both_brokers
@pytest.mark.timeout(300)
@pytest.mark.parametrize("kafka_consumer", ["aiokafka", "librdkafka"])
async def test_kill_9_of_one_intake_mid_stream(broker, topics, tmp_path, kafka_consumer):
    await _kill_mid_stream(broker, topics, tmp_path, "intake", **kafka_clients(kafka_consumer))


@pytest.mark.timeout(240)
async def test_sigterm_drains_every_intake_then_restart_has_no_duplicates(broker, topics, tmp_path):
    def stop(first: WorkerProc) -> None:
        assert first.stop(60) == 0, first.log_tail()

    _, records = await _interrupt_and_restart(broker, topics, tmp_path, 1200, 1200 / 8.0, stop)
    assert duplicates(records) == 0


@pytest.mark.timeout(120)
async def test_kill_9_of_the_supervisor_leaves_no_process_and_the_next_start_cleans_shm(broker, topics, tmp_path):
    await setup(broker, topics)
    env = worker_env(broker.bootstrap, topics, intake_processes=K)
    first = WorkerProc(env, tmp_path / "w1.log", name="first").start()
    await first.wait_ready(90)
    children = [child_pid(first, "gpu process started; loading models"), *child_pid(first, "intakes started", "pids")]
    left = segments_of(first)
    assert len(left) == K
    first.kill()
    deadline = time.monotonic() + 15
    while any(alive(p) for p in children) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not any(alive(p) for p in children), "children die with the supervisor"
    assert all((shm.SHM_DIR / name).exists() for name in left)  # kill -9: nobody unlinked them
    second = WorkerProc(env, tmp_path / "w2.log", name="second").start()
    await second.wait_ready(90)
    assert not any((shm.SHM_DIR / name).exists() for name in left)
    assert "unlinked shared memory left by a killed earlier run" in second.log_path.read_text()
    assert second.stop(60) == 0


def small_dev_shm(size: str) -> list[str]:
    """A command prefix that runs the worker in a mount namespace of its own with a /dev/shm of ``size``
    (``mount`` needs root); skips, with the reason, where that is not allowed."""
    import subprocess

    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a /dev/shm of our own here: {probe.stderr.decode().strip()}")
    return ["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o size={size} tmpfs /dev/shm && exec "$0" "$@"']


@pytest.mark.timeout(60)
def test_a_dev_shm_too_small_for_the_rings_is_a_configuration_error_before_any_process_starts(tmp_path):
    """Two intakes' rings need 128 MiB; this /dev/shm holds 96 (Docker's default: 64). The rings' pages are
    taken at creation, so the worker says so and exits 2 before any child starts. Before, the files were sparse:
    the first write past the room killed an intake with SIGBUS mid-stream."""
    topics = {"input": "in", "output": "out", "dlq": "dlq", "group": "g"}
    env = worker_env("127.0.0.1:1", topics, intake_processes=K)  # no broker: nothing may get that far
    worker = WorkerProc(env, tmp_path / "w.log", prefix=small_dev_shm("96m")).start()
    assert worker.wait(50) == 2
    text = worker.log_path.read_text()
    assert "configuration error: /dev/shm has no room for" in text
    assert "-ring2 (64.0 MiB; 32.0 MiB free" in text
    assert "--shm-size" in text and "lower intake_processes" in text
    assert f"{K} rings of 256 x 262144 bytes" in text
    assert "gpu process started" not in text  # stopped before any child


# Every request overflows its 4 KiB slot: the demo models' rows are 16 KiB an image.
TINY_SLOTS = {"ipc_slots": 4, "ipc_slot_bytes": 4096}


@pytest.mark.timeout(180)
async def test_a_dev_shm_with_room_for_a_few_large_images_still_gives_every_result(broker, topics, tmp_path):
    """The rings (2 x 16 KiB) and room for about two 16 KiB images at a time: each large image that finds
    no room waits for the run's earlier ones to be answered. Every input still gets its exact result."""
    n = 120
    await setup(broker, topics)
    values, pixels = pngs(n)
    env = worker_env(broker.bootstrap, topics, intake_processes=K, max_batch_size=8, **TINY_SLOTS)
    async with TopicReader(broker.bootstrap, topics["output"]) as out:
        worker = WorkerProc(env, tmp_path / "w.log", prefix=small_dev_shm("72k")).start()
        await worker.wait_ready(90)
        coords = await PacedProducer(broker.bootstrap, topics["input"], values, 4, rate=2000).run()
        records = await out.until(lambda r: len(r) >= n, timeout_s=120, settle_s=1.0, alive=worker.alive)
        assert worker.stop(60) == 0, worker.log_tail()
    by_coord = {source_coords(r): r for r in records}
    assert len(records) == n and set(by_coord) == set(coords)
    for (coord, image) in zip(coords, pixels):
        check_demo_result(json.loads(by_coord[coord].value), image)
    assert any(e.get("event", "").startswith("no room in /dev/shm") for e in worker.events()), \
        "the test must make images wait for room"


@pytest.mark.timeout(120)
async def test_a_dev_shm_with_no_room_for_one_large_image_stops_the_worker_and_commits_nothing(broker, topics,
                                                                                           tmp_path):
    """Room for the rings and not for one 16 KiB image, with nothing in flight to free any: not the input's
    fault, so no dead letter: the worker stops with exit 1 naming the room, and commits nothing."""
    await setup(broker, topics)
    values, _ = pngs(8)
    env = worker_env(broker.bootstrap, topics, intake_processes=K, **TINY_SLOTS)
    worker = WorkerProc(env, tmp_path / "w.log", prefix=small_dev_shm("40k")).start()
    await worker.wait_ready(90)
    await PacedProducer(broker.bootstrap, topics["input"], values, 4, rate=200).run()
    assert worker.wait(60) == 1
    text = worker.log_path.read_text()
    assert "SharedMemoryFull" in text and "-ring1-o1 (16 KiB; " in text and "overflowPerIntake" in text
    committed = await committed_offsets(broker.bootstrap, topics["group"], topics["input"], 4)
    assert all(offset in (None, 0) for offset in committed.values()), committed
    async with TopicReader(broker.bootstrap, topics["dlq"]) as dlq:
        for _ in range(4):
            await dlq.poll(500)
        assert dlq.records == []

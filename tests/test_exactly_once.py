"""processing_guarantee=exactly-once: which results form a transaction, the setting, the refusal on a
broker without transactions (tansu), and kill -9 five times during 5 000 inputs on Apache Kafka.

The Kafka cases run ``python -m worker run`` (two intakes, one GPU process on the CPU, the bundled demo
models) as subprocesses (tests/procs.py), kill the whole worker with SIGKILL five times while inputs stream
in, restart it each time, and then read the output and DLQ topics back to their ends with
``isolation_level=read_committed``: every input has exactly one record, a result for each image and a DLQ
record for each poison input. The same run with at-least-once prints the duplicates that guarantee allows
and asserts only that nothing is lost. Counts are printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.procs import PacedProducer, WorkerProc, no_leftover_workers, source_coords, worker_env  # noqa: F401
from worker.broker import create_topics
from worker.errors import ConfigError
from worker.intake.publish import RecordTooLarge
from worker.intake.records import Source, dlq_record
from worker.intake.transact import TransactionalPublisher, transactional_id
from worker.policy.offsets import OffsetTracker
from worker.policy.transactions import StagedOutputs, plan_transaction
from worker.samples import encode, synth_image
from worker.settings import ProcessingGuarantee, Settings, load


# --- which results form a transaction (pure) ------------------------------------------------------------
def _started(tracker: OffsetTracker, tp: str, offsets) -> None:
    for o in offsets:
        tracker.start(tp, o)


def _done(tracker: OffsetTracker, staged: StagedOutputs, tp: str, offset: int, output: str) -> None:
    staged.stage(tp, offset, output)
    assert tracker.finish(tp, offset)


def test_a_transaction_is_the_contiguous_finished_prefix_in_offset_order():
    tracker, staged = OffsetTracker(), StagedOutputs()
    _started(tracker, "A", range(10, 16))
    for offset in (13, 11, 10, 15):  # finished out of order, 12 and 14 still running
        _done(tracker, staged, "A", offset, f"r{offset}")
    txn = plan_transaction(tracker, staged)
    assert txn.positions == {"A": 12}
    assert [(o, out) for _, o, out in txn.outputs] == [(10, "r10"), (11, "r11")]
    assert len(staged) == 2  # 13 and 15 wait behind 12 and 14
    tracker.mark_committed(dict(txn.positions))
    assert not plan_transaction(tracker, staged)  # nothing moved: no transaction at all
    _done(tracker, staged, "A", 12, "dlq12")
    txn = plan_transaction(tracker, staged)
    assert txn.positions == {"A": 14}
    assert [(o, out) for _, o, out in txn.outputs] == [(12, "dlq12"), (13, "r13")]
    tracker.mark_committed(dict(txn.positions))
    _done(tracker, staged, "A", 14, "r14")
    txn = plan_transaction(tracker, staged)
    assert txn.positions == {"A": 16}
    assert [o for _, o, _ in txn.outputs] == [14, 15]
    assert len(staged) == 0


def test_one_transaction_covers_every_partition_that_moved_and_only_those():
    tracker, staged = OffsetTracker(), StagedOutputs()
    _started(tracker, "A", [0, 1])
    _started(tracker, "B", [7, 8])
    _started(tracker, "C", [3])
    _done(tracker, staged, "B", 8, "b8")
    _done(tracker, staged, "A", 1, "a1")
    _done(tracker, staged, "A", 0, "a0")
    _done(tracker, staged, "B", 7, "b7")
    # C: 3 is still running; nothing of it joins
    txn = plan_transaction(tracker, staged)
    assert txn.positions == {"A": 2, "B": 9}
    assert [(tp, o) for tp, o, _ in txn.outputs] == [("A", 0), ("A", 1), ("B", 7), ("B", 8)]
    scoped = StagedOutputs()
    scoped.stage("A", 0, "x")
    scoped.stage("B", 0, "y")
    assert [tp for tp, _, _ in scoped.take({"B": 1}).outputs] == ["B"]  # other partitions stay staged
    assert len(scoped) == 1


def test_a_partition_let_go_takes_its_staged_outputs_with_it():
    staged = StagedOutputs()
    staged.stage("A", 5, "a5")
    staged.stage("A", 6, "a6")
    staged.stage("B", 1, "b1")
    assert staged.forget("A") == 2
    assert len(staged) == 1
    assert staged.take({"A": 10}).outputs == ()  # the next owner redoes them; none of ours may join


def test_a_record_the_producer_would_refuse_raises_record_too_large_before_any_transaction():
    pub = TransactionalPublisher(producer=None, max_request_size=2000, cycle_at=4)
    source = Source("images", 3, 42, 0, b"k")
    huge = dlq_record(source, b"x" * 5000, None, ValueError("bad"))

    async def go():
        with pytest.raises(RecordTooLarge):
            await pub.publish("dlq", huge)
        await pub.publish("dlq", dlq_record(source, b"x" * 100, None, ValueError("bad")))

    asyncio.run(go())
    txn = pub.staged.take({TopicPartition("images", 3): 43})
    assert [(tp.partition, o, out[0]) for tp, o, out in txn.outputs] == [(3, 42, "dlq")]


def test_the_setting_is_typed_and_refuses_anything_else():
    assert Settings().processing_guarantee is ProcessingGuarantee.AT_LEAST_ONCE
    s = load(environ={"WORKER_PROCESSING_GUARANTEE": "exactly-once"})
    assert s.processing_guarantee is ProcessingGuarantee.EXACTLY_ONCE
    assert load({"processing_guarantee": "at-least-once"}, environ={}).processing_guarantee \
        is ProcessingGuarantee.AT_LEAST_ONCE
    for bad in ("exactly_once", "once", ""):
        with pytest.raises(ConfigError, match="processing_guarantee=.* is not one of at-least-once, exactly-once"):
            load(environ={"WORKER_PROCESSING_GUARANTEE": bad})


def test_transactional_ids_differ_per_intake_and_pod_and_stay_across_restarts():
    assert transactional_id("vision", 2, host="gpu-worker-7f9c") == "vision.gpu-worker-7f9c.intake-2"
    ids = {transactional_id("vision", i, host=h) for i in (1, 2) for h in ("pod-a", "pod-b")}
    assert len(ids) == 4


# --- tansu: refused at start-up ---------------------------------------------------------------------------
async def test_exactly_once_is_refused_on_a_broker_without_transactions(tansu, topics, tmp_path):
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=tansu.bootstrap, transactional_id=f"{topics['group']}.probe")
    pub = TransactionalPublisher(producer, 1 << 20, cycle_at=8)
    with pytest.raises(ConfigError, match="exactly-once needs a broker with transactions.*tansu"):
        await pub.start()
    await pub.stop()

    # The real worker: the intake refuses before consuming anything, the worker exits non-zero.
    await create_topics(tansu.bootstrap, [(topics["input"], 1), (topics["output"], 1), (topics["dlq"], 1)])
    env = worker_env(tansu.bootstrap, topics, processing_guarantee="exactly-once")
    worker = WorkerProc(env, tmp_path / "w.log").start()
    code = await asyncio.to_thread(worker.wait, 90)
    log = worker.log_path.read_text()
    assert code == 1, log[-3000:]
    assert "ConfigError: processing_guarantee=exactly-once needs a broker with transactions" in log


# --- Apache Kafka: kill -9 five times ---------------------------------------------------------------------
POISON = [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"\xff\xd8\xff" + b"\x01" * 30]


def _inputs(n: int, seed: int = 11) -> tuple[list[bytes], set[int]]:
    """``n`` values: 64x64 PNGs, and a poison value at every 97th index (their indices returned)."""
    rng = np.random.default_rng(seed)
    blobs = [encode(synth_image(rng, 64, 64, 3), "png") for _ in range(32)]
    poison = {i for i in range(n) if i % 97 == 50}
    return [POISON[i % len(POISON)] if i in poison else blobs[i % len(blobs)] for i in range(n)], poison


async def read_committed(bootstrap: str, topic: str) -> list:
    """Every record of ``topic`` a read_committed consumer sees, read to the end (the last stable offset)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                                enable_auto_commit=False, isolation_level="read_committed")
    await consumer.start()
    try:
        while not consumer.assignment():
            await asyncio.sleep(0.05)
        parts = list(consumer.assignment())
        ends = await consumer.end_offsets(parts)  # read_committed: the last stable offsets
        records: list = []
        deadline = time.monotonic() + 60
        while [tp for tp in parts if await consumer.position(tp) < ends[tp]]:
            assert time.monotonic() < deadline, f"{topic}: not read to its end within 60 s"
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
        return records
    finally:
        await consumer.stop()


async def _kill_five_times(broker, topics, tmp_path, guarantee: str) -> dict:
    n, partitions, kills = 5000, 4, 5
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"\n{guarantee}: kill -9 x{kills} during {n} inputs, seed={seed}")
    await create_topics(broker.bootstrap, [(topics["input"], partitions), (topics["output"], partitions),
                                           (topics["dlq"], 2)])
    env = worker_env(broker.bootstrap, topics, processing_guarantee=guarantee, intake_processes=2,
                     max_in_flight=128, max_batch_size=16)
    values, poison = _inputs(n)
    producer = PacedProducer(broker.bootstrap, topics["input"], values, partitions, rate=n / 40.0)
    started = time.monotonic()
    worker = WorkerProc(env, tmp_path / "worker-0.log", name="worker-0").start()
    await worker.wait_ready(90)
    feed = asyncio.create_task(producer.run())
    try:
        for k in range(kills):
            await worker.wait_ready(90)
            await asyncio.sleep(rng.uniform(1.0, 4.0))
            worker.kill()  # SIGKILL of the supervisor: its intakes and GPU process die with it
            print(f"  kill {k + 1}: {producer.sent} inputs sent, t={time.monotonic() - started:.1f}s")
            worker = WorkerProc(env, tmp_path / f"worker-{k + 1}.log", name=f"worker-{k + 1}").start()
        coords = await asyncio.wait_for(feed, 180)
        await worker.wait_ready(90)
        want = len(coords)
        deadline = time.monotonic() + 240
        while True:  # until the committed offsets cover every input (the group's own record of progress)
            done = await _committed_total(broker.bootstrap, topics, partitions)
            if done >= want:
                break
            assert worker.alive(), worker.log_tail()
            assert time.monotonic() < deadline, f"committed {done} of {want}:\n{worker.log_tail()}"
            await asyncio.sleep(0.5)
    finally:
        feed.cancel()
    assert worker.stop(60) == 0, worker.log_tail()
    results = await read_committed(broker.bootstrap, topics["output"])
    dead = await read_committed(broker.bootstrap, topics["dlq"])
    by_coord = {c: i for i, c in enumerate(coords)}
    print(f"  {len(results)} results + {len(dead)} DLQ records read_committed for {n} inputs "
          f"({len(poison)} poison), {time.monotonic() - started:.1f}s")
    return {"coords": coords, "by_coord": by_coord, "poison": poison, "results": results, "dead": dead}


async def _read_all(bootstrap: str, topic: str) -> list:
    """What a read_uncommitted consumer sees: aborted transactions' records too."""
    from tests.procs import TopicReader

    async with TopicReader(bootstrap, topic) as reader:
        ends = await reader._consumer.end_offsets([TopicPartition(topic, p) for p in range(4)])
        want = sum(ends.values())  # transaction markers take offsets too: read until two polls add nothing
        idle = 0
        while idle < 2 and len(reader.records) < want:
            idle = idle + 1 if not await reader.poll(500) else 0
        return reader.records


async def _committed_total(bootstrap: str, topics: dict, partitions: int) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=topics["group"], enable_auto_commit=False)
    await consumer.start()
    try:
        total = 0
        for p in range(partitions):
            total += await consumer.committed(TopicPartition(topics["input"], p)) or 0
        return total
    finally:
        await consumer.stop()


def _per_input(run: dict) -> tuple[Counter, Counter, list[int]]:
    """Records per input index: results, DLQ records, and the inputs with neither (lost)."""
    results = Counter(run["by_coord"][source_coords(r)] for r in run["results"])
    dead = Counter(run["by_coord"][source_coords(r)] for r in run["dead"])
    lost = [i for i in range(len(run["coords"])) if results[i] + dead[i] == 0]
    return results, dead, lost


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("broker", ["kafka"], indirect=True)
async def test_kill_9_five_times_exactly_once_every_input_has_one_record(broker, topics, tmp_path):
    run = await _kill_five_times(broker, topics, tmp_path, "exactly-once")
    results, dead, lost = _per_input(run)
    n, poison = len(run["coords"]), run["poison"]
    good = set(range(n)) - poison
    doubled = {i: results[i] + dead[i] for i in range(n) if results[i] + dead[i] > 1}
    written = len(await _read_all(broker.bootstrap, topics["output"]))
    print(f"  exactly-once: lost={len(lost)} duplicated={len(doubled)}; {written - len(run['results'])} result "
          f"records of aborted transactions on the topic (invisible to read_committed)")
    assert lost == [] and doubled == {}
    assert set(results) == good  # a result for every image, none for a poison input
    assert set(dead) == poison  # a DLQ record for every poison input, none for an image


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("broker", ["kafka"], indirect=True)
async def test_kill_9_five_times_at_least_once_loses_nothing_and_shows_its_duplicates(broker, topics, tmp_path):
    run = await _kill_five_times(broker, topics, tmp_path, "at-least-once")
    results, dead, lost = _per_input(run)
    n, poison = len(run["coords"]), run["poison"]
    extra = sum(results.values()) + sum(dead.values()) - (n - len(lost))
    print(f"  at-least-once: lost={len(lost)} duplicates={extra} "
          f"(inputs with more than one record: {sum(1 for i in range(n) if results[i] + dead[i] > 1)})")
    assert lost == []
    assert set(results) == set(range(n)) - poison and set(dead) == poison


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("broker", ["kafka"], indirect=True)
async def test_a_fenced_intake_stops_loudly_and_its_successor_keeps_exactly_once(broker, topics, tmp_path):
    """A second worker of the same group on the same host takes the same transactional ids: its
    InitProducerId fences the first, whose next transaction fails with a fenced producer; the first exits 1
    naming it, the second carries on, and read_committed still shows one record per input."""
    n, partitions = 800, 4
    await create_topics(broker.bootstrap, [(topics["input"], partitions), (topics["output"], partitions),
                                           (topics["dlq"], 1)])
    env = worker_env(broker.bootstrap, topics, processing_guarantee="exactly-once", max_in_flight=64)
    values, poison = _inputs(n)
    first = WorkerProc(env, tmp_path / "first.log", name="first").start()
    await first.wait_ready(90)
    feed = asyncio.create_task(PacedProducer(broker.bootstrap, topics["input"], values, partitions, rate=80).run())
    try:
        await asyncio.sleep(3.0)
        second = WorkerProc(env, tmp_path / "second.log", name="second").start()
        code = await asyncio.to_thread(first.wait, 60)
        log = first.log_path.read_text()
        assert code == 1, first.log_tail()
        assert "transaction failed; stopping" in log and "fenced" in log, first.log_tail()
        coords = await asyncio.wait_for(feed, 120)
        deadline = time.monotonic() + 120
        while await _committed_total(broker.bootstrap, topics, partitions) < len(coords):
            assert second.alive(), second.log_tail()
            assert time.monotonic() < deadline, second.log_tail()
            await asyncio.sleep(0.5)
    finally:
        feed.cancel()
    assert second.stop(60) == 0, second.log_tail()
    results = await read_committed(broker.bootstrap, topics["output"])
    dead = await read_committed(broker.bootstrap, topics["dlq"])
    per = Counter(source_coords(r) for r in [*results, *dead])
    print(f"\nfenced: {len(results)} results + {len(dead)} DLQ records for {n} inputs; "
          f"inputs with != 1 record: {sum(1 for c in coords if per[c] != 1)}")
    assert all(per[c] == 1 for c in coords) and len(per) == len(coords)

"""Fault injection against the real broker and real worker processes: nothing lost, nothing stuck.

Each test starts ``python -m worker run`` subprocesses (tests/procs.py) on fresh topics of the session's
tansu broker, injects one kind of fault and checks the outcome on the topics themselves (every input
offset has a result or a DLQ record, read back by source coordinates) and on the group's committed
offsets. Workers run on the CPU with the bundled exact-function models and small images, so inference
keeps up on a 2-core machine. Every test has a hard timeout; counts are printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import signal
import time
from datetime import datetime

import numpy as np
import pytest

from tests.corpus import good_image_specs, malformed_corpus, tiny_valid_images
from tests.helpers import check_demo_result, kafka_clients
from tests.procs import (PacedProducer, TopicReader, WorkerProc, committed_offsets, duplicates,  # noqa: F401
                         no_leftover_workers, source_coords, worker_env)
from worker.broker import LocalBroker, create_topics, free_port
from worker.samples import encode, synth_image

pytestmark = pytest.mark.slow


def small_pngs(n: int, distinct: int = 64, seed: int = 3) -> tuple[list[bytes], list[np.ndarray]]:
    """``n`` 64x64 PNG values cycling over ``distinct`` images (decoded pixels known exactly)."""
    rng = np.random.default_rng(seed)
    pixels = [synth_image(rng, 64, 64, 3) for _ in range(distinct)]
    blobs = [encode(p, "png") for p in pixels]
    return [blobs[i % distinct] for i in range(n)], [pixels[i % distinct] for i in range(n)]


async def create_test_topics(bootstrap: str, topics: dict[str, str], partitions: int) -> None:
    await create_topics(bootstrap, [(topics["input"], partitions), (topics["output"], partitions),
                                    (topics["dlq"], 1)])


def covered(coords: list[tuple[int, int]]):
    want = set(coords)
    return lambda records: want <= {source_coords(r) for r in records}


def doc(record) -> dict:
    return json.loads(record.value)


def iso_ms(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() * 1000.0


def events(proc: WorkerProc, name: str) -> list[dict]:
    return [e for e in proc.events() if e.get("event") == name]


# The live intake's two Kafka consumers (kafka_consumer): the delivery tests run with each.
CONSUMERS = pytest.mark.parametrize("kafka_consumer", ["aiokafka", "librdkafka"])


# --- 1. kill -9 ------------------------------------------------------------------------------------------
@pytest.mark.timeout(240)
async def test_kill_9_five_times_while_streaming_loses_nothing(broker, topics, tmp_path, kafka_consumer="aiokafka"):
    """SIGKILL the worker 5 times at random moments while 5 000 messages stream in; restart each time.

    Bound on duplicates. A result is duplicated only when it was published by a process that died
    before committing past it. At the moment of a kill, the uncommitted-but-published messages of a
    partition are (a) messages in flight (their result may be acknowledged while the process dies
    before ``finish``): at most ``max_in_flight`` over all partitions; (b) messages finished since the
    last commit: at most what the worker finishes in one commit interval plus the commit round trip;
    (c) finished messages held behind a slower, lower offset of the same partition, which is in flight
    and is at most one message latency old. So per kill: duplicates <= max_in_flight + the most results
    published in any window of (commit interval + slack for the commit round trip and message
    latency; 500 ms here), measured from the results' own timestamps.
    """
    n, partitions, kills, max_in_flight, commit_ms = 5000, 4, 5, 64, 200
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"\nkill -9 test: seed={seed}")
    await create_test_topics(broker.bootstrap, topics, partitions)
    env = worker_env(broker.bootstrap, topics, **kafka_clients(kafka_consumer), max_in_flight=max_in_flight,
                     commit_interval_ms=commit_ms,
                     max_batch_size=16)
    values, _ = small_pngs(n)
    producer = PacedProducer(broker.bootstrap, topics["input"], values, partitions, rate=n / 45.0)
    started = time.monotonic()
    async with TopicReader(broker.bootstrap, topics["output"]) as out:
        worker = WorkerProc(env, tmp_path / "worker-0.log", name="worker-0").start()
        await worker.wait_ready()
        feed = asyncio.create_task(producer.run())
        killed: list[int] = []
        try:
            for k in range(kills):
                await worker.wait_ready(60)  # joined: consuming from its committed positions
                await out.poll()
                await asyncio.sleep(rng.uniform(0.3, 3.0))
                await out.poll()
                worker.kill()  # SIGKILL: no drain, no commit, no leave-group
                killed.append(worker.pid)
                print(f"  kill {k + 1}: {len(out.records)} results read, {producer.sent} messages sent, "
                      f"t={time.monotonic() - started:.1f}s")
                worker = WorkerProc(env, tmp_path / f"worker-{k + 1}.log", name=f"worker-{k + 1}").start()
            coords = await asyncio.wait_for(feed, 120)
            records = await out.until(covered(coords), timeout_s=150, settle_s=1.0, alive=worker.alive)
        finally:
            feed.cancel()
        assert worker.stop() == 0, worker.log_tail()

    dup = duplicates(records)
    first_by: dict[tuple[int, int], int] = {}
    per_kill = {pid: 0 for pid in killed}
    for rec in sorted(records, key=lambda r: r.timestamp):
        coord, pid = source_coords(rec), doc(rec)["worker"]["pid"]
        if coord in first_by:
            per_kill[first_by[coord]] = per_kill.get(first_by[coord], 0) + 1
        else:
            first_by[coord] = pid
    stamps = sorted(r.timestamp for r in records)
    window_ms = commit_ms + 500
    peak = max(np.searchsorted(stamps, t + window_ms, side="right") - i for i, t in enumerate(stamps))
    bound = kills * (max_in_flight + peak)
    print(f"  {len(records)} results for {n} inputs: duplicates={dup} (bound {bound} = {kills} kills x "
          f"(max_in_flight {max_in_flight} + {peak} results in the busiest {window_ms} ms)), "
          f"{time.monotonic() - started:.1f}s")
    print(f"  duplicates by killed process (first publisher): {[per_kill[pid] for pid in killed]}")
    assert {source_coords(r) for r in records} == set(coords)
    assert dup <= bound
    assert all(per_kill[pid] <= max_in_flight + peak for pid in killed)


# --- 2. broker stalled -----------------------------------------------------------------------------------
@pytest.mark.timeout(180)
@CONSUMERS
async def test_broker_stopped_for_20s_mid_stream(broker, topics, tmp_path, kafka_consumer):
    n, partitions, stall_s = 2000, 4, 20.0
    await create_test_topics(broker.bootstrap, topics, partitions)
    env = worker_env(broker.bootstrap, topics, max_in_flight=128, **kafka_clients(kafka_consumer))
    values, _ = small_pngs(n)
    producer = PacedProducer(broker.bootstrap, topics["input"], values, partitions, rate=100.0)
    async with TopicReader(broker.bootstrap, topics["output"]) as out:
        worker = WorkerProc(env, tmp_path / "worker.log").start()
        await worker.wait_ready()
        feed = asyncio.create_task(producer.run())
        try:
            await out.until(lambda r: len(r) >= 300, timeout_s=60, alive=worker.alive)
            cpu_before, t0 = worker.cpu_seconds(), time.monotonic()
            readiness: list[tuple[float, int | None]] = []
            broker.pause()
            try:
                while time.monotonic() - t0 < stall_s:
                    answer = await asyncio.to_thread(worker.probe, "/readyz", 2.0)
                    readiness.append((round(time.monotonic() - t0, 1), answer and answer[0]))
                    assert worker.alive(), f"worker exited during the stall:\n{worker.log_tail()}"
                    await asyncio.sleep(0.5)
            finally:
                broker.resume()
            cpu = worker.cpu_seconds() - cpu_before
            coords = await asyncio.wait_for(feed, 120)
            records = await out.until(covered(coords), timeout_s=120, settle_s=1.0, alive=worker.alive)
            back = await worker.wait_ready(60) - (t0 + stall_s - worker.started_at)
        finally:
            feed.cancel()
        assert worker.alive()
        assert worker.stop() == 0, worker.log_tail()

    not_ready = [t for t, status in readiness if status == 503]
    print(f"\nbroker SIGSTOP {stall_s:.0f}s: {len(records)} results for {n} inputs, duplicates="
          f"{duplicates(records)}; /readyz 503 from t={not_ready[0] if not_ready else None}s "
          f"({len(not_ready)}/{len(readiness)} probes), no answer in {sum(s is None for _, s in readiness)}; "
          f"ready again {back:.1f}s after SIGCONT; worker CPU during the stall {cpu:.2f}s")
    assert {source_coords(r) for r in records} == set(coords)
    assert not_ready, f"/readyz never turned false during the stall: {readiness}"
    assert all(status is not None for _, status in readiness), "the probe server stopped answering"
    assert cpu < 0.25 * stall_s, f"busy loop during the stall: {cpu:.1f}s CPU in {stall_s}s"
    warnings = [e for e in worker.events() if e.get("event") == "broker unreachable"]
    assert warnings, "no 'broker unreachable' log line"
    assert [e for e in worker.events() if e.get("event") == "broker reachable again"], "no 'reachable again'"
    assert "never retrieved" not in worker.log_path.read_text(), "an asyncio task failed unobserved"


@pytest.mark.timeout(120)
async def test_broker_unreachable_at_start_then_appears(topics, tmp_path):
    """A broker that is not there yet (connection refused): the worker waits with backoff, not ready,
    without a busy loop, and starts processing by itself once the broker listens."""
    port = free_port()
    env = worker_env(f"127.0.0.1:{port}", topics)
    worker = WorkerProc(env, tmp_path / "worker.log").start()
    try:
        # The clock starts once the models are loaded and an intake has failed its first connection:
        # from then on only waiting is left, and the CPU of every process of the worker is counted.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            live = worker.probe("/healthz")
            retrying = any(e.get("event") == "broker unreachable; retrying" for e in worker.events())
            if live is not None and live[1].get("models_ready") and retrying:
                break
            await asyncio.sleep(0.2)
        cpu_before = worker.cpu_seconds()
        await asyncio.sleep(6.0)
        cpu = worker.cpu_seconds() - cpu_before
        status = worker.probe()
        assert worker.alive(), worker.log_tail()
        assert status is not None and status[0] == 503 and status[1]["broker_reachable"] is False, status
        retries = [e for e in worker.events() if e.get("event") == "broker unreachable; retrying"]
        assert len(retries) >= 2, worker.log_tail()
        assert cpu < 1.5, f"busy loop while the broker is away: {cpu:.2f}s CPU in 6s"
        with LocalBroker(port=port) as late:
            await create_test_topics(late.bootstrap, topics, 2)
            values, pixels = small_pngs(40)
            producer = PacedProducer(late.bootstrap, topics["input"], values, 2, rate=1000.0)
            coords = await producer.run()
            async with TopicReader(late.bootstrap, topics["output"]) as out:
                records = await out.until(covered(coords), timeout_s=60, settle_s=0.5, alive=worker.alive)
            await worker.wait_ready(30)
            assert worker.stop() == 0, worker.log_tail()
    finally:
        worker.kill()
    delays = [e.get("retry_in_s") for e in retries]
    print(f"\nbroker absent at start: {len(retries)} retries (delays {delays}), CPU {cpu:.2f}s in 6s; "
          f"{len(records)} results after it appeared")
    assert delays == sorted(delays), "backoff must not shrink"
    for rec in records:
        check_demo_result(doc(rec), pixels[coords.index(source_coords(rec))])


# --- 3. two workers, one joins and leaves --------------------------------------------------------------
@pytest.mark.timeout(180)
@CONSUMERS
async def test_second_worker_joins_and_leaves_mid_stream(broker, topics, tmp_path, kafka_consumer):
    """No loss, and no result published after the other member committed past it.

    The check, precisely: every worker logs each acknowledged commit (``committed``, with the positions
    and the time the broker answered); every result names the process that published it
    (``worker.pid``) and carries the time it was handed to that process's producer (the record's
    CreateTime, taken before the send). A violation is a result for (partition p, offset o) published by
    worker X at time t while some other worker Y had, before t, committed a position > o for p: X
    published work for a partition it no longer owned, after the new owner had already moved past it.
    The worker prevents it by cancelling the revoked partitions' unfinished work at the end of the
    bounded revoke wait and flushing its producer before it lets the partitions go; the other member
    can only commit after that.

    To give a late publication every chance, the members differ: worker a is slow (its GPU batches
    wait 10 s for company, much longer than its 0.2 s revoke wait, so a rebalance always finds work in
    flight), worker b is fast (it redoes the handed-over backlog and commits within a second of its
    assignment). b starts right after a published a batch, so when b's join makes a revoke its work,
    a's next batch still has most of its 10 s to wait: several seconds after b's first commits. With the revoke of before this
    issue (wait, commit, forget, let the old tasks run on), this test finds such late results.
    """
    n, partitions = 3000, 4
    await create_test_topics(broker.bootstrap, topics, partitions)
    common = dict(rebalance_timeout_s=0.2, drain_timeout_s=15, log_level="debug", **kafka_clients(kafka_consumer))
    env_a = worker_env(broker.bootstrap, topics, max_in_flight=4096, max_batch_size=2048, max_wait_ms=10000,
                       **common)
    env_b = worker_env(broker.bootstrap, topics, max_in_flight=256, max_batch_size=64, max_wait_ms=5, **common)
    values, pixels = small_pngs(n)
    producer = PacedProducer(broker.bootstrap, topics["input"], values, partitions, rate=120.0)
    async with TopicReader(broker.bootstrap, topics["output"]) as out:
        a = WorkerProc(env_a, tmp_path / "a.log", name="a").start()
        await a.wait_ready()
        feed = asyncio.create_task(producer.run())
        try:
            await out.until(lambda r: len(r) >= 300, timeout_s=60, alive=a.alive)
            b = WorkerProc(env_b, tmp_path / "b.log", name="b").start()
            await b.wait_ready(60)
            await asyncio.sleep(1.0)
            await out.poll()
            before = len(out.records)
            await out.until(lambda r: len(r) >= before + 300, timeout_s=60, alive=b.alive)
            b_code = b.stop(30)
            coords = await asyncio.wait_for(feed, 120)
            records = await out.until(covered(coords), timeout_s=120, settle_s=1.0, alive=a.alive)
        finally:
            feed.cancel()
        assert b_code == 0, b.log_tail()
        assert a.stop() == 0, a.log_tail()

    assert {source_coords(r) for r in records} == set(coords)
    for rec in records:
        check_demo_result(doc(rec), pixels[coords.index(source_coords(rec))])
    # Commit history per worker, from the logs.
    # Results name the intake process that published them; each worker's log names its intakes.
    commits: list[tuple[str, float, int, int]] = []  # (worker, time ms, partition, position)
    pids: dict[int, str] = {}
    for proc in (a, b):
        for e in events(proc, "intakes started"):
            pids.update({pid: proc.name for pid in e["pids"]})
        for e in events(proc, "committed"):
            for key, pos in e["positions"].items():
                commits.append((proc.name, iso_ms(e["timestamp"]), int(key.rsplit(":", 1)[1]), pos))
    by_worker = {name: sum(1 for r in records if pids.get(doc(r)["worker"]["pid"]) == name) for name in "ab"}
    violations = []
    for rec in records:
        p, o = source_coords(rec)
        publisher = pids.get(doc(rec)["worker"]["pid"])
        for name, t, cp, pos in commits:
            if name != publisher and cp == p and pos > o and t < rec.timestamp:
                violations.append((publisher, p, o, rec.timestamp, name, pos, t))
                break
    revokes = [(proc.name, e.get("unfinished_left_uncommitted")) for proc in (a, b)
               for e in events(proc, "partitions revoked") if e.get("partitions")]
    print(f"\ntwo workers: {len(records)} results for {n} inputs, duplicates={duplicates(records)}, "
          f"results by worker {by_worker}, {len(commits)} commit positions, revokes (worker, cut) {revokes}, "
          f"late publications {len(violations)}")
    assert not violations, violations[:5]
    assert by_worker["b"] > 0


# --- 4. malformed corpus ---------------------------------------------------------------------------------
def _envelope(image: bytes | None = None, **fields) -> bytes:
    body = dict(fields)
    if image is not None:
        body["image"] = base64.b64encode(image).decode()
    return json.dumps(body).encode()


JSON = [("content-type", b"application/json")]


@pytest.mark.timeout(180)
async def test_malformed_corpus_goes_to_dlq_with_its_reason_and_good_images_get_results(broker, topics, tmp_path):
    max_bytes = 1 << 20
    corpus = malformed_corpus(max_bytes=max_bytes)
    assert len(corpus) >= 200, len(corpus)
    by_name = {name: data for name, data, _ in corpus}
    good_png = encode(synth_image(np.random.default_rng(9), 64, 64, 3), "png")
    # The corpus labels what the image decode path says. The worker reads a value starting with "{" as a
    # JSON envelope first (its documented input contract), so such a case is a malformed envelope here.
    bad: list[tuple[str, bytes | None, list | None, str]] = [
        (n, d, None, "malformed_envelope" if d[:1] == b"{" else r) for n, d, r in corpus]
    bad += [
        ("envelope/image-not-string", b'{"image": 12}', None, "malformed_envelope"),
        ("envelope/no-image-field", _envelope(correlation_id="c"), None, "malformed_envelope"),
        ("envelope/empty-object", b"{}", JSON, "malformed_envelope"),
        ("envelope/image-empty", b'{"image": ""}', None, "malformed_envelope"),
        ("envelope/image-null", b'{"image": null}', None, "malformed_envelope"),
        ("envelope/image-list", b'{"image": ["aGk="]}', None, "malformed_envelope"),
        ("envelope/image-not-base64", b'{"image": "!!not base64!!"}', None, "malformed_envelope"),
        ("envelope/image-bad-padding", b'{"image": "aGk"}', None, "malformed_envelope"),
        ("envelope/unparseable", b'{"image": "aGk=",', None, "malformed_envelope"),
        ("envelope/not-utf8", b'{"image": "\xff\xfe"}', None, "malformed_envelope"),
        ("envelope/array", b'["aGk="]', JSON, "malformed_envelope"),
        ("envelope/string", b'"aGk="', JSON, "malformed_envelope"),
        ("envelope/null", b"null", JSON, "malformed_envelope"),
        ("envelope/png-with-json-content-type", good_png, JSON, "malformed_envelope"),
        ("envelope/correlation-id-object", _envelope(good_png, correlation_id={"a": 1}), None, "malformed_envelope"),
        ("envelope/correlation-id-list", _envelope(good_png, correlation_id=[1]), None, "malformed_envelope"),
        ("envelope/oversized", _envelope(bytes(800_000)), None, "too_large"),
        ("envelope/empty-image-bytes", _envelope(b""), None, "malformed_envelope"),
        ("envelope/truncated-png", _envelope(good_png[:60]), None, "undecodable_image"),
        ("envelope/float-tiff", _envelope(by_name["unsupported/tiff-float32"]), None, "unsupported_image"),
        ("envelope/bomb", _envelope(by_name["huge/png-100000x100000"]), None, "too_large"),
        ("tombstone/none-value", None, None, "empty_value"),
    ]
    specs = good_image_specs(60, seed=5)
    lossless, lossless_pixels = small_pngs(12, distinct=12, seed=11)
    good: list[tuple[str, bytes, list | None, dict]] = []
    good += [(name, data, None, {"width": s["width"], "height": s["height"], "format": s["format"]})
             for name, data, s in specs]
    good += [(f"tiny/{name}", data, None, {"width": 1, "height": 1}) for name, data in tiny_valid_images()]
    good += [(f"exact/{i}", data, None, {"pixels": px}) for i, (data, px) in enumerate(zip(lossless, lossless_pixels))]
    good += [(f"envelope/good-{i}", _envelope(data, correlation_id=f"env-{i}"), None,
              {"pixels": px, "correlation_id": f"env-{i}"}) for i, (data, px) in enumerate(zip(lossless, lossless_pixels))]
    good += [("envelope/good-with-header", _envelope(lossless[0]), JSON + [("correlation-id", b"hdr-1")],
              {"pixels": lossless_pixels[0], "correlation_id": "hdr-1"})]

    rng = random.Random(4)
    items = [("bad", *b) for b in bad] + [("good", *g) for g in good]
    rng.shuffle(items)
    partitions = 3
    await create_test_topics(broker.bootstrap, topics, partitions)
    env = worker_env(broker.bootstrap, topics, max_bytes=max_bytes, max_batch_size=16)
    worker = WorkerProc(env, tmp_path / "worker.log").start()
    await worker.wait_ready()
    pid = worker.pid
    producer = PacedProducer(broker.bootstrap, topics["input"], [it[2] for it in items], partitions, rate=500.0,
                             headers=[it[3] for it in items])
    coords = await producer.run()
    index = {c: i for i, c in enumerate(coords)}
    n_bad = sum(1 for it in items if it[0] == "bad")
    async with TopicReader(broker.bootstrap, topics["dlq"]) as dlq_reader, \
            TopicReader(broker.bootstrap, topics["output"]) as out_reader:
        deadline = time.monotonic() + 120
        while len(dlq_reader.records) < n_bad or len(out_reader.records) < len(items) - n_bad:
            assert time.monotonic() < deadline, (len(dlq_reader.records), len(out_reader.records))
            assert worker.alive(), worker.log_tail()
            await dlq_reader.poll(100)
            await out_reader.poll(100)
        await asyncio.sleep(1.0)
        await dlq_reader.poll(300)
        await out_reader.poll(300)
    assert worker.alive() and worker.pid == pid
    assert worker.stop() == 0, worker.log_tail()
    assert not [e for e in worker.events() if e.get("level") in ("error", "critical")]

    wrong = []
    dlq_seen = set()
    for rec in dlq_reader.records:
        i = index[source_coords(rec)]
        kind, name, value, _, expected = items[i]
        h = {k: v.decode("utf-8", "replace") for k, v in rec.headers}
        dlq_seen.add(i)
        if kind != "bad" or h["error-reason"] != expected:
            wrong.append((name, kind, expected, h["error-reason"], h["error-message"][:120]))
            continue
        assert rec.value == (value or b"") and rec.key == f"k{i}".encode(), name
        assert h["error-class"] and h["error-message"] and h["worker-version"] and h["source-timestamp"], name
        assert h["source-topic"] == topics["input"], name
    results_seen = set()
    for rec in out_reader.records:
        i = index[source_coords(rec)]
        kind, name, _, _, expect = items[i]
        results_seen.add(i)
        if kind != "good":
            wrong.append((name, kind, "a DLQ record", "a result", ""))
            continue
        d = doc(rec)
        if "pixels" in expect:
            check_demo_result(d, expect["pixels"])
        for key in ("width", "height", "format"):
            if key in expect:
                assert d["image"][key] == expect[key], (name, d["image"], expect)
        if "correlation_id" in expect:
            assert d["correlation_id"] == expect["correlation_id"], name
        assert len(d["models"]["channel_means"]["outputs"]["means"]["data"]) == 3, name
    reasons: dict[str, int] = {}
    for it in items:
        if it[0] == "bad":
            reasons[it[4]] = reasons.get(it[4], 0) + 1
    print(f"\ncorpus: {n_bad} malformed ({len(corpus)} from tests/corpus.py) by reason {reasons}, "
          f"{len(items) - n_bad} good; DLQ {len(dlq_reader.records)}, results {len(out_reader.records)}, "
          f"same pid {pid} throughout")
    assert not wrong, wrong
    assert len(dlq_reader.records) == n_bad and len(out_reader.records) == len(items) - n_bad
    assert dlq_seen | results_seen == set(range(len(items)))


# --- 5. SIGTERM and restart ------------------------------------------------------------------------------
@pytest.mark.timeout(150)
@CONSUMERS
async def test_sigterm_mid_stream_then_restart_has_no_duplicates(broker, topics, tmp_path, kafka_consumer):
    n, partitions = 3000, 4
    await create_test_topics(broker.bootstrap, topics, partitions)
    # Batches close on time only (2 s): a few hundred messages are in flight at almost any moment.
    env = worker_env(broker.bootstrap, topics, **kafka_clients(kafka_consumer), max_in_flight=1024, drain_timeout_s=15,
                     max_batch_size=512,
                     max_wait_ms=2000, log_level="debug")  # the GPU process logs each batch at debug
    values, _ = small_pngs(n)
    producer = PacedProducer(broker.bootstrap, topics["input"], values, partitions, rate=150.0)
    async with TopicReader(broker.bootstrap, topics["output"]) as out:
        first = WorkerProc(env, tmp_path / "first.log", name="first").start()
        await first.wait_ready()
        feed = asyncio.create_task(producer.run())
        try:
            await out.until(lambda r: len(r) >= 800, timeout_s=60, alive=first.alive)
            # SIGTERM early in a batch's 2 s wait: the last batch ended 0.2-1 s ago, and work is in flight.
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                in_flight = await asyncio.to_thread(first.metric, "worker_in_flight_messages") or 0.0
                batches = events(first, "batch")
                since = time.time() - iso_ms(batches[-1]["timestamp"]) / 1000 if batches else 0.0
                if in_flight >= 5 and 0.2 <= since <= 1.0:
                    break
                await asyncio.sleep(0.05)
            t0 = time.monotonic()
            code = first.stop(30)
            stop_s = time.monotonic() - t0
            second = WorkerProc(env, tmp_path / "second.log", name="second").start()
            coords = await asyncio.wait_for(feed, 120)
            records = await out.until(covered(coords), timeout_s=120, settle_s=2.0, alive=second.alive)
        finally:
            feed.cancel()
        assert second.stop() == 0, second.log_tail()
    drained = events(first, "drained")
    print(f"\nSIGTERM mid-stream with {in_flight:.0f} in flight: first worker exited {code} in {stop_s:.1f}s "
          f"(drained {drained[0].get('finished') if drained else '?'}, cut {drained[0].get('cut') if drained else '?'}); "
          f"{len(records)} results for {n} inputs, duplicates={duplicates(records)}")
    assert code == 0, first.log_tail()
    assert drained and drained[0]["cut"] == 0 and drained[0]["finished"] > 0
    assert duplicates(records) == 0
    assert {source_coords(r) for r in records} == set(coords) and len(records) == n


@pytest.mark.timeout(90)
async def test_second_signal_exits_at_once(broker, topics, tmp_path):
    """While a drain waits (batches held for 5 s), a second SIGTERM exits at once, committing nothing."""
    await create_test_topics(broker.bootstrap, topics, 1)
    env = worker_env(broker.bootstrap, topics, max_batch_size=64, max_wait_ms=5000, drain_timeout_s=30)
    worker = WorkerProc(env, tmp_path / "worker.log").start()
    await worker.wait_ready()
    values, _ = small_pngs(10)
    await PacedProducer(broker.bootstrap, topics["input"], values, 1, rate=1000.0).run()
    await asyncio.sleep(2.0)  # consumed within a poll; the batch waits for company
    worker.signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    t0 = time.monotonic()
    worker.signal(signal.SIGTERM)
    code = worker.wait(10)
    took = time.monotonic() - t0
    committed = await committed_offsets(broker.bootstrap, topics["group"], topics["input"], 1)
    print(f"\nsecond signal: exit {code} {took:.2f}s after it; committed {committed}")
    assert code == 130 and took < 2.0, worker.log_tail()
    assert committed == {0: None}


# --- 6. fatal device error --------------------------------------------------------------------------------
@pytest.mark.timeout(120)
async def test_device_error_exits_non_zero_without_committing_the_batch(broker, topics, tmp_path):
    """An engine raising DeviceError (a CUDA fault) on one image: the process exits non-zero with a clear
    log line, and no offset without an acknowledged result is committed."""
    n, partitions, marker_at = 200, 2, 101  # index 101: partition 1, offset 50
    await create_test_topics(broker.bootstrap, topics, partitions)
    env = worker_env(broker.bootstrap, topics, max_batch_size=8)
    env["FAKE_DEVICE_ERROR_MARKER"] = "77"
    values, _ = small_pngs(n)
    values[marker_at] = encode(np.full((64, 64, 3), 77, np.uint8), "png")
    worker = WorkerProc(env, tmp_path / "worker.log", args=("-m", "tests.procs")).start()
    await worker.wait_ready()
    coords = await PacedProducer(broker.bootstrap, topics["input"], values, partitions, rate=400.0).run()
    t0 = time.monotonic()
    code = worker.wait(60)
    async with TopicReader(broker.bootstrap, topics["output"]) as out:
        await asyncio.sleep(1.0)
        await out.poll(500)
        await out.poll(500)
    published = {source_coords(r) for r in out.records}
    committed = await committed_offsets(broker.bootstrap, topics["group"], topics["input"], partitions)
    fatal = events(worker, "fatal error; stopping")
    print(f"\ndevice error: exit {code} {time.monotonic() - t0:.1f}s after the stream; committed {committed}; "
          f"{len(published)} results; log: {fatal[0] if fatal else None}")
    assert code not in (0, None)
    assert fatal and "CUDA error" in fatal[0]["error"], fatal
    gpu_failed = events(worker, "gpu thread failed")
    assert gpu_failed and "DeviceError" in gpu_failed[0]["error"], gpu_failed
    assert coords[marker_at] not in published
    for p, pos in committed.items():
        assert all((p, o) in published for o in range(pos or 0)), f"partition {p} committed past a missing result"
    assert (committed[1] or 0) <= coords[marker_at][1]

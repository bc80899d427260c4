"""`worker replay`: range parsing and planning, the rate limiter, and replays against the real broker.

The broker tests check exact outcomes: the set of (partition, offset) that got a result (or a DLQ
record) is exactly the range, with no duplicates, for offset ranges, timestamp ranges and `--until end`
under live traffic; a killed replay resumes and covers the range; a cleanly stopped one resumes with
zero duplicates; empty ranges exit 0 with a zero summary; bad ranges fail before any processing.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tests.helpers import source_of
from worker.broker import create_topics
from worker.cli import main
from worker.errors import ConfigError
from worker.policy.rate import TokenBucket
from worker.replay import (PartitionRange, ReplayPlan, parse_offsets, parse_partitions, parse_timestamp,
                           plan_ranges, range_spec, replay_group_id)
from worker.replay.cli import EXIT_INCOMPLETE, run_replay
from worker.replay.ends import probe_offset, true_end
from worker.replay.ranges import true_end_offsets
from worker.samples import encode, synth_image

REPO = Path(__file__).resolve().parents[1]


# --- parsing, planning, group ids (no broker) ------------------------------------------------------
def test_parse_offsets_and_partitions():
    assert parse_offsets("0:10,3:7", "--from-offset") == ((0, 10), (3, 7))
    assert parse_offsets(" 2:0 ", "--until-offset") == ((2, 0),)
    for bad, msg in (("0-10", "is not PARTITION:OFFSET"), ("0:-1", "is not PARTITION:OFFSET"),
                     ("", "needs at least one"), ("1:5,1:6", "names partition 1 more than once")):
        with pytest.raises(ConfigError, match=msg):
            parse_offsets(bad, "--from-offset")
    assert parse_partitions("3,0,1") == (0, 1, 3)
    with pytest.raises(ConfigError, match="more than once"):
        parse_partitions("1,1")
    with pytest.raises(ConfigError, match="comma-separated list"):
        parse_partitions("a,b")


def test_parse_timestamp_iso_and_epoch_ms():
    ms = 1793491200000  # 2026-11-01T00:00:00Z
    assert parse_timestamp("2026-11-01T00:00:00Z", "--from-timestamp") == ms
    assert parse_timestamp("2026-11-01T01:00:00+01:00", "--from-timestamp") == ms
    assert parse_timestamp("2026-11-01T00:00:00", "--from-timestamp") == ms  # no zone: UTC
    assert parse_timestamp(str(ms), "--from-timestamp") == ms
    with pytest.raises(ConfigError, match="epoch timestamps are in milliseconds"):
        parse_timestamp("1793491200", "--from-timestamp")  # seconds by mistake
    with pytest.raises(ConfigError, match="neither ISO 8601"):
        parse_timestamp("yesterday", "--until-timestamp")


def test_range_spec_checks_without_a_broker():
    spec = range_spec("images", from_offset="0:10,3:7", until_timestamp="2026-11-01T00:00:00Z")
    assert spec.start.offsets == ((0, 10), (3, 7)) and spec.until.timestamp_ms == 1793491200000
    assert range_spec("images", from_beginning=True).until.kind == "end"  # --until end is the default
    with pytest.raises(ConfigError, match="exactly one start point"):
        range_spec("images")
    with pytest.raises(ConfigError, match="start after end: partition 0 starts at offset 9"):
        range_spec("images", from_offset="0:9", until_offset="0:3")
    with pytest.raises(ConfigError, match="start after end: --from-timestamp"):
        range_spec("images", from_timestamp="2026-11-02T00:00:00Z", until_timestamp="2026-11-01T00:00:00Z")
    with pytest.raises(ConfigError, match="the only value is 'end'"):
        range_spec("images", from_beginning=True, until="tomorrow")


def test_plan_ranges_rules():
    parts, first, last = {0, 1, 2}, {0: 0, 1: 5, 2: 0}, {0: 100, 1: 50, 2: 0}
    spec = range_spec("t", from_beginning=True)
    r = plan_ranges(spec, parts, first, last)
    assert r.ranges == {0: PartitionRange(0, 0, 100), 1: PartitionRange(1, 5, 50), 2: PartitionRange(2, 0, 0)}
    # Offset lists select their partitions; an offset below the log start is moved up, with a warning.
    r = plan_ranges(range_spec("t", from_offset="0:10,1:2", until_offset="0:20,1:30"), parts, first, last)
    assert r.ranges == {0: PartitionRange(0, 10, 20), 1: PartitionRange(1, 5, 30)}
    assert "deleted by retention" in r.warnings[0]
    # Timestamps: no message at or after the end time means "to the end"; at or after the start, empty.
    spec = range_spec("t", from_timestamp="1793491200000", until_timestamp="1793491300000")
    r = plan_ranges(spec, parts, first, last, {0: 40, 1: None, 2: None}, {0: None, 1: None, 2: None})
    assert r.ranges == {0: PartitionRange(0, 40, 100), 1: PartitionRange(1, 50, 50), 2: PartitionRange(2, 0, 0)}
    for spec, message in (
        (range_spec("t", from_beginning=True, partitions="0,7"), "unknown partition 7: topic t has partitions 0-2"),
        (range_spec("t", from_offset="0:101"), r"--from-offset 0:101 is past the end .*end offset 100"),
        (range_spec("t", from_beginning=True, until_offset="1:51"), "--until-offset 1:51 is past the end"),
        (range_spec("t", from_offset="0:60", until_timestamp="1793491200000"), "start after end: partition 0"),
        (range_spec("t", from_offset="0:1", partitions="0,1"), "exactly the partitions of --partitions"),
        (range_spec("t", from_offset="0:1", until_offset="1:2"), "name different partitions"),
        (range_spec("t", from_timestamp="1793491200000"), "no offsets for --from-timestamp"),
    ):
        with pytest.raises(ConfigError, match=message):
            plan_ranges(spec, parts, first, last, {0: None, 1: None, 2: None}, {0: 50, 1: 10, 2: 0})


def test_true_end_from_one_fetch_at_end_minus_one():
    assert true_end(21, range(20, 30)) == 30  # tansu: base of the last batch + 1, the fetch holds the batch
    assert true_end(30, [29]) == 30  # Kafka: the record at end - 1 and nothing after it
    assert true_end(30, [29, 30, 31]) == 32  # records that arrived since: in, the snapshot moves to the fetch
    assert true_end(30, [29, 31]) == 30  # only the contiguous run from end - 1 counts
    assert true_end(30, [30, 31]) == 30 and true_end(30, []) == 30  # no record at end - 1 (compaction, a marker)
    assert true_end(5, [4, 5, 6], start=5) == 5  # an empty partition is not probed
    assert (probe_offset(0, 21), probe_offset(7, 7), probe_offset(0, 0)) == (20, None, None)


def test_replay_group_is_stable_and_follows_what_defines_the_replay():
    spec = range_spec("images", from_timestamp="2026-11-01T00:00:00Z", until="end")
    same = range_spec("images", from_timestamp="1793491200000")
    g = replay_group_id("live", spec, "results", "m@1")
    assert g.startswith("live-replay-") and g == replay_group_id("live", same, "results", "m@1")
    others = {replay_group_id("live", range_spec("images", from_beginning=True), "results", "m@1"),
              replay_group_id("live", spec, "results.v2", "m@1"),
              replay_group_id("live", spec, "results", "m@2"),
              replay_group_id("live", spec, "results", "m@1", run_id="again"),
              replay_group_id("live", range_spec("images", from_beginning=True, partitions="0"), "results", "m@1")}
    assert g not in others and len(others) == 5


def test_token_bucket_with_a_fake_clock():
    now = [0.0]
    bucket = TokenBucket(rate=10, clock=lambda: now[0])  # burst: one second's worth
    assert [bucket.reserve() for _ in range(10)] == [0.0] * 10
    assert bucket.reserve() == pytest.approx(0.1)  # the 11th waits one token's time
    assert bucket.reserve() == pytest.approx(0.2)  # reservations queue up
    now[0] += 0.2
    assert bucket.reserve() == pytest.approx(0.1)
    now[0] += 100.0  # idle time refills only up to the burst
    assert bucket.available() == pytest.approx(10.0)
    assert bucket.reserve(10) == 0.0 and bucket.reserve(5) == pytest.approx(0.5)
    slow = TokenBucket(rate=0.5, clock=lambda: now[0])  # below 1/s: one message, then 2 s apart
    assert slow.reserve() == 0.0 and slow.reserve() == pytest.approx(2.0)
    with pytest.raises(ValueError):
        TokenBucket(rate=0)


@pytest.mark.parametrize("args", [  # what the Helm chart's replay Job passes (tests/test_helm.py)
    ["replay", "--from-timestamp", "2026-11-01T00:00:00Z", "--until-offset", "0:1000,1:2000", "--partitions", "0,1",
     "--output-topic", "camera.labels.v2", "--rate", "200"],
    ["replay", "--from-offset", "0:10,3:7", "--until-timestamp", "1767225600000", "--dlq-topic", "images.replay.dlq",
     "--replay-group", "backfill-2026"],
    ["replay", "--from-beginning", "--until", "end", "--run-id", "again"],
])
def test_cli_accepts_the_helm_charts_args(args):
    from worker.cli import build_parser

    ns = build_parser().parse_args(args)
    spec = range_spec("t", from_beginning=ns.from_beginning, from_offset=ns.from_offset,
                      from_timestamp=ns.from_timestamp, until=ns.until, until_offset=ns.until_offset,
                      until_timestamp=ns.until_timestamp, partitions=ns.partitions)
    assert ns.func.__name__ == "cmd_replay" and spec.start.kind in ("timestamp", "offsets", "beginning")


class _FakeConsumer:
    def __init__(self, committed):
        self._committed, self.paused, self.sought = committed, set(), {}

    async def committed(self, tp):
        return self._committed.get(tp.partition)

    def assign(self, tps):
        self.assigned = set(tps)

    def seek(self, tp, offset):
        self.sought[tp.partition] = offset

    def pause(self, *tps):
        self.paused |= {tp.partition for tp in tps}


class _Listener:
    async def on_partitions_assigned(self, assigned):
        self.assigned = assigned


async def test_replay_plan_resumes_drops_past_the_end_and_completes():
    ranges = {0: PartitionRange(0, 10, 20), 1: PartitionRange(1, 0, 5), 2: PartitionRange(2, 3, 3)}
    plan = ReplayPlan("t", ranges, "g")
    consumer = _FakeConsumer({0: 15, 1: 2})  # earlier runs committed 15 and 2
    await plan.attach(consumer, _Listener())
    assert consumer.sought == {0: 15, 1: 2, 2: 3} and consumer.paused == {2}  # empty range: nothing to fetch
    assert plan.total == 5 + 3 and plan.already_done == 5 + 2
    tp0, tp1 = TopicPartition("t", 0), TopicPartition("t", 1)
    assert not plan.accept(tp0, 14) and all(plan.accept(tp0, o) for o in range(15, 20))
    assert not plan.accept(tp0, 20) and consumer.paused == {0, 2}  # past the end: fetching stops
    assert not plan.complete({tp0: 17, tp1: 5})  # 17 still in flight
    assert plan.complete({tp0: 20, tp1: 5}) and plan.finished
    # A gap at the end of the range (e.g. compaction): a record past the end proves nothing is left.
    gap = ReplayPlan("t", {0: PartitionRange(0, 0, 10)}, "g")
    await gap.attach(_FakeConsumer({}), _Listener())
    assert gap.accept(tp0, 7) and not gap.accept(tp0, 12)
    assert not gap.complete({tp0: 7}) and gap.complete({tp0: 8})


# --- against the broker ------------------------------------------------------------------------------
def _images(n: int, seed: int = 7) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [encode(synth_image(rng, 32, 32, 3), "png") for _ in range(n)]


async def _topics(settings, partitions: int = 2) -> None:
    await create_topics(settings.bootstrap_servers, [(settings.input_topic, partitions),
                                                    (settings.output_topic, partitions), (settings.dlq_topic, 1)])


async def _replay(settings, group=None, rate=0.0, worker_out=None, **flags):
    spec = range_spec(settings.input_topic, **flags)
    return await run_replay(settings, spec, group=group, rate=rate, out=io.StringIO(), worker_out=worker_out)


async def _outputs(settings, expected: int, settle_s: float = 1.0, timeout_s: float = 60.0) -> list[tuple[int, int]]:
    """Source coordinates of every result and DLQ record, read until ``expected`` (then ``settle_s``
    more, to catch extras)."""
    consumer = AIOKafkaConsumer(settings.output_topic, settings.dlq_topic, bootstrap_servers=settings.bootstrap_servers,
                                group_id=None, auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    out: list[tuple[int, int]] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(out) < expected and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                out.extend(source_of(r) for r in records)
        settle = time.monotonic() + settle_s
        while time.monotonic() < settle:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                out.extend(source_of(r) for r in records)
    finally:
        await consumer.stop()
    return out


async def _produce(settings, values: list[bytes], partitions: int = 2) -> list[tuple[int, int]]:
    """One record per produce request, spread over the partitions (multi-record batches:
    ``_produce_batches``)."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
    await producer.start()
    try:
        out = []
        for i, value in enumerate(values):
            md = await producer.send_and_wait(settings.input_topic, value, key=f"k{i}".encode(),
                                              partition=i % partitions)
            out.append((md.partition, md.offset))
        return out
    finally:
        await producer.stop()


def _range_set(ranges) -> set[tuple[int, int]]:
    return {(int(p), o) for p, (s, e) in ranges.items() for o in range(s, e)}


async def test_offset_range_exact_then_rerun_does_nothing(settings):
    settings = settings.replace(output_topic=settings.output_topic + ".v2", dlq_topic=settings.dlq_topic + ".v2")
    await _topics(settings)
    values = _images(40)
    values[10] = b"not an image"  # partition 0, offset 5: inside the range, so one DLQ record
    await _produce(settings, values)

    flags = dict(from_offset="0:3,1:5", until_offset="0:15,1:12")
    outcome = await _replay(settings, **flags)
    s = outcome.summary
    assert outcome.exit_code == 0 and s["status"] == "complete"
    assert (s["range_messages"], s["processed"], s["published"], s["dead_lettered"]) == (19, 19, 18, 1)
    seen = await _outputs(settings, 19)
    assert Counter(seen) == Counter(_range_set({0: (3, 15), 1: (5, 12)}))

    again = await _replay(settings, **flags)  # the same replay: its group committed the whole range
    assert again.exit_code == 0 and again.plan.group_id == outcome.plan.group_id
    assert (again.summary["processed"], again.summary["already_done"]) == (0, 19)


async def test_timestamp_range_exact(settings):
    await _topics(settings)
    marks, batches = [], []
    # The broker looks times up by its own append time (tansu) or the record's create time (Kafka,
    # CreateTime): both are "now" here, so leave clear gaps around the marks.
    for i in range(3):
        if i:
            await asyncio.sleep(0.05)
            marks.append(int(time.time() * 1000))
            await asyncio.sleep(0.05)
        batches.append(await _produce(settings, _images(8, seed=i)))
    iso = datetime.fromtimestamp(marks[0] / 1000, timezone.utc).isoformat()
    outcome = await _replay(settings, from_timestamp=iso, until_timestamp=str(marks[1]))
    assert outcome.exit_code == 0 and outcome.summary["processed"] == 8
    assert Counter(await _outputs(settings, 8)) == Counter(batches[1])


async def test_until_end_is_the_snapshot_at_start_while_a_producer_keeps_writing(settings):
    await _topics(settings)
    await _produce(settings, _images(30))
    stop = asyncio.Event()
    written = []

    async def keep_writing():
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
        await producer.start()
        try:
            blob, i = _images(1, seed=3)[0], 0
            while not stop.is_set():
                md = await producer.send_and_wait(settings.input_topic, blob, partition=i % 2)
                written.append((md.partition, md.offset))
                i += 1
                await asyncio.sleep(0.02)
        finally:
            await producer.stop()

    writer = asyncio.create_task(keep_writing())
    try:
        while len(written) < 5:
            await asyncio.sleep(0.02)
        outcome = await _replay(settings, from_beginning=True, until="end")
        after = len(written)
    finally:
        stop.set()
        await writer
    ranges = outcome.summary["ranges"]
    assert outcome.exit_code == 0 and all(e >= 15 for _, e in ranges.values())
    snapshot = _range_set(ranges)
    assert any(c not in snapshot for c in written[:after]), "no traffic arrived during the replay"
    assert outcome.summary["processed"] == len(snapshot)
    assert Counter(await _outputs(settings, len(snapshot), settle_s=1.5)) == Counter(snapshot)


async def _stop_when(workers: list, done: int) -> None:
    while not workers or workers[0].counts["published"] + workers[0].counts["dead_lettered"] < done:
        await asyncio.sleep(0.02)
    workers[0].request_stop()  # what SIGTERM does: drain, commit, exit


async def test_clean_stop_then_resume_gives_every_result_exactly_once(settings):
    await _topics(settings)
    await _produce(settings, _images(60))
    workers: list = []
    stopper = asyncio.create_task(_stop_when(workers, 30))
    first = await _replay(settings, rate=20, worker_out=workers, from_beginning=True)
    await stopper
    assert first.exit_code == EXIT_INCOMPLETE and first.summary["status"] == "incomplete"
    assert first.summary["throttled_s"] > 0 and 30 <= first.summary["processed"] < 60

    second = await _replay(settings, rate=20, from_beginning=True)
    assert second.exit_code == 0 and second.plan.group_id == first.plan.group_id
    assert second.summary["already_done"] == first.summary["processed"]
    assert second.summary["already_done"] + second.summary["processed"] == 60
    assert Counter(await _outputs(settings, 60)) == Counter(_range_set({0: (0, 30), 1: (0, 30)}))


async def test_sigkill_then_resume_covers_the_range(settings):
    await _topics(settings)
    await _produce(settings, _images(60))
    group = settings.group_id + "-replay-kill"
    s = settings
    cmd = [sys.executable, "-m", "worker", "replay", "--from-beginning", "--until", "end", "--rate", "20",
           "--replay-group", group, "--bootstrap-servers", s.bootstrap_servers, "--input-topic", s.input_topic,
           "--output-topic", s.output_topic, "--dlq-topic", s.dlq_topic, "--device", "cpu", "--http-port", "0",
           "--decode-workers", "2", "--commit-interval-ms", "200", "--log-format", "json", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ))
    consumer = AIOKafkaConsumer(s.output_topic, bootstrap_servers=s.bootstrap_servers, group_id=None,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        seen = 0
        deadline = time.monotonic() + 60
        while seen < 30 and time.monotonic() < deadline and proc.poll() is None:
            seen += sum(len(r) for r in (await consumer.getmany(timeout_ms=100)).values())
        assert proc.poll() is None, f"replay exited early: {proc.communicate()[1].decode()[-2000:]}"
        assert seen >= 30
        await asyncio.sleep(0.3)  # let a periodic commit land, as one would have in a long run
        proc.send_signal(signal.SIGKILL)  # no drain, no final commit
        proc.wait(10)
    finally:
        await consumer.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    resumed = await _replay(settings, group=group, from_beginning=True, until="end")
    assert resumed.exit_code == 0 and 0 < resumed.summary["already_done"] < 60
    outputs = await _outputs(settings, 60)
    assert set(outputs) == _range_set({0: (0, 30), 1: (0, 30)})
    # At least once across a kill: only work finished but not yet committed when it died runs twice.
    duplicates = len(outputs) - len(set(outputs))
    assert duplicates <= 60 - resumed.summary["already_done"]


def _cli(settings, *flags: str, input_topic: str | None = None) -> list[str]:
    s = settings
    return ["replay", *flags, "--bootstrap-servers", s.bootstrap_servers, "--input-topic", input_topic or s.input_topic,
            "--output-topic", s.output_topic, "--dlq-topic", s.dlq_topic, "--device", "cpu", "--http-port", "0",
            "--decode-workers", "2", "--log-format", "json", "--log-level", "warning"]


def test_empty_range_exits_0_with_a_zero_summary(settings, make_topics, capsys):
    make_topics((settings.input_topic, 2), (settings.output_topic, 2), (settings.dlq_topic, 1))
    asyncio.run(_produce(settings, _images(10)))
    assert main(_cli(settings, "--from-offset", "0:5,1:2", "--until-offset", "0:5,1:2")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["status"] == "complete" and summary["ranges"] == {"0": [5, 5], "1": [2, 2]}
    assert (summary["range_messages"], summary["processed"], summary["published"], summary["dead_lettered"]) \
        == (0, 0, 0, 0)


@pytest.mark.parametrize("flags, message", [
    (["--from-beginning"], "topic missing: input topic 'no-such-topic'"),
    (["--from-beginning", "--partitions", "0,7"], "unknown partition 7: topic"),
    (["--from-offset", "0:4", "--until-offset", "0:2"], "start after end: partition 0 starts at offset 4"),
    (["--from-offset", "0:9"], "--from-offset 0:9 is past the end of the partition (end offset 3)"),
    (["--from-offset", "1:0", "--until-offset", "1:99"], "--until-offset 1:99 is past the end"),
    (["--from-timestamp", "2999-01-01T00:00:00Z"], "no offsets for --from-timestamp"),
])
def test_bad_ranges_fail_fast_with_exit_2(settings, make_topics, capsys, flags, message):
    make_topics((settings.input_topic, 2), (settings.output_topic, 2), (settings.dlq_topic, 1))
    asyncio.run(_produce(settings, _images(6)))
    missing = "no-such-topic" in message
    started = time.monotonic()
    assert main(_cli(settings, *flags, input_topic="no-such-topic" if missing else None)) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert time.monotonic() - started < 10  # before models load or anything is consumed


async def _produce_batches(settings, batches: int, per_batch: int, partition: int = 0) -> list[tuple[int, int]]:
    """``batches`` record batches of ``per_batch`` records each (one produce request per batch)."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all", max_batch_size=1 << 20)
    await producer.start()
    try:
        out, blobs = [], _images(per_batch, seed=11)
        for b in range(batches):
            batch = producer.create_batch()
            for i, blob in enumerate(blobs):
                assert batch.append(key=f"b{b}-{i}".encode(), value=blob, timestamp=None) is not None
            md = await (await producer.send_batch(batch, settings.input_topic, partition=partition))
            out.extend((md.partition, md.offset + i) for i in range(per_batch))  # md.offset: the batch's base
        return out
    finally:
        await producer.stop()


async def test_until_end_covers_multi_record_batches(settings):
    """tansu answers end offsets with the last batch's base offset + 1 (30 records in three batches of
    10 at 0..29: 21); the replay must still cover all 30 (issue 12: it stopped at 21, exit 0, complete)."""
    await _topics(settings)
    produced = await _produce_batches(settings, batches=3, per_batch=10)
    assert produced == [(0, o) for o in range(30)]
    tp0 = TopicPartition(settings.input_topic, 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        reported = (await consumer.end_offsets([tp0]))[tp0]
        assert reported in (21, 30)  # 21 on tansu (what this test is about), 30 on Kafka
        assert await true_end_offsets(consumer, {tp0: 0}, {tp0: reported}) == ({tp0: 30}, [])
    finally:
        await consumer.stop()
    outcome = await _replay(settings, from_beginning=True, until="end")
    s = outcome.summary
    assert outcome.exit_code == 0 and s["status"] == "complete"
    assert s["ranges"] == {0: [0, 30], 1: [0, 0]}
    assert (s["range_messages"], s["processed"], s["published"]) == (30, 30, 30)
    assert Counter(await _outputs(settings, 30)) == Counter(produced)

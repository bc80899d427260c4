"""kafka_consumer=librdkafka: the live intake's consumer on librdkafka (worker.intake.rdkafka_consumer).

The delivery tests (tests/test_end_to_end.py, test_faults.py, test_processes.py) run with both consumers;
here: its configuration (librdkafka itself validates it), which plans get it, how record errors are
told apart, and against the real broker that a revoke's hook runs to its end before another member is
given the partitions.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import threading
import time

import confluent_kafka
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.helpers import produce
from tests.kafka_broker import both_brokers
from worker.broker import create_topics
from worker.errors import ConfigError
from worker.intake import rdkafka_consumer
from worker.intake.clients import ClientsMixin
from worker.intake.consume import LivePlan, RebalanceHooks
from worker.intake.rdkafka_consumer import RdKafkaConsumer, RdKafkaError
from worker.intake.rdkafka_owner import Owner
from worker.replay import ReplayPlan
from worker.settings import Settings


def test_config_carries_the_settings_and_librdkafka_accepts_it():
    s = Settings(bootstrap_servers="127.0.0.1:1", check_crcs=False, fetch_max_bytes=8 << 20,
                 max_partition_fetch_bytes=2 << 20, fetch_max_wait_ms=50, auto_offset_reset="latest")
    conf = rdkafka_consumer.config(s, "g1")
    assert conf["group.id"] == "g1" and conf["enable.auto.commit"] is False
    assert conf["check.crcs"] is False and conf["auto.offset.reset"] == "latest"
    assert (conf["fetch.max.bytes"], conf["max.partition.fetch.bytes"], conf["fetch.wait.max.ms"]) == (8 << 20, 2 << 20, 50)
    assert conf["queued.max.messages.kbytes"] == 8192  # its prefetch: one fetch, not librdkafka's 64 MB
    assert conf["isolation.level"] == "read_uncommitted" and conf["security.protocol"] == "PLAINTEXT"
    confluent_kafka.Consumer(conf).close()  # librdkafka refuses an unknown or invalid property here


def test_config_maps_tls_and_sasl():
    s = Settings(bootstrap_servers="b:9093", security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
                 sasl_username="u", sasl_password="p", ssl_cafile="/ca.pem")
    conf = rdkafka_consumer.config(s, "g")
    assert conf["security.protocol"] == "SASL_SSL" and conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert (conf["sasl.username"], conf["sasl.password"], conf["ssl.ca.location"]) == ("u", "p", "/ca.pem")
    assert "ssl.certificate.location" not in conf  # unset files are left to librdkafka's defaults


def test_a_large_fetch_raises_the_largest_response_librdkafka_takes():
    conf = rdkafka_consumer.config(Settings(fetch_max_bytes=200_000_000), "g")
    assert conf["receive.message.max.bytes"] == 200_000_512


async def test_a_configuration_librdkafka_refuses_is_a_config_error_naming_it():
    # librdkafka wants max.poll.interval.ms >= session.timeout.ms; the worker's own checks do not know that
    s = Settings(bootstrap_servers="127.0.0.1:1", session_timeout_ms=60000, max_poll_interval_ms=10000)
    with pytest.raises(ConfigError, match="librdkafka refused the configuration: .*max.poll.interval.ms"):
        await RdKafkaConsumer(rdkafka_consumer.config(s, "g")).start()


async def test_no_broker_is_a_connection_error_and_stop_ends_the_clients_thread(monkeypatch):
    """The worker's connect loop retries on KafkaConnectionError and closes the failed clients: a
    librdkafka handle left open would go on reconnecting in the background, one more per retry."""
    from aiokafka.errors import KafkaConnectionError

    from tests.procs import free_port

    monkeypatch.setattr(rdkafka_consumer, "CONNECT_TIMEOUT_S", 1.0)
    consumer = RdKafkaConsumer(rdkafka_consumer.config(Settings(bootstrap_servers=f"127.0.0.1:{free_port()}"), "g"))
    with pytest.raises(KafkaConnectionError, match="no broker answered"):
        await consumer.start()
    await asyncio.wait_for(consumer.stop(), 10)
    consumer._owner._thread.join(5)
    assert not consumer._owner._thread.is_alive()

def test_librdkafka_with_exactly_once_is_refused_at_load():
    with pytest.raises(ConfigError, match="kafka_consumer=librdkafka cannot be combined"):
        Settings(kafka_consumer="librdkafka", processing_guarantee="exactly-once")
    assert Settings(kafka_consumer="LIBRDKAFKA").kafka_consumer == "librdkafka"


class _Clients(ClientsMixin):
    def __init__(self, settings: Settings, plan) -> None:
        self.settings, self.plan, self.exactly_once = settings, plan, False


async def test_a_live_plan_gets_librdkafka_and_a_replay_keeps_aiokafka():
    s = Settings(kafka_consumer="librdkafka", bootstrap_servers="127.0.0.1:1")
    assert isinstance(_Clients(s, LivePlan("images", "g"))._new_consumer(), RdKafkaConsumer)
    replay = ReplayPlan.__new__(ReplayPlan)  # its type is what counts; a replay assigns and seeks by hand
    replay.group_id = "g-replay"
    assert isinstance(_Clients(s, replay)._new_consumer(), AIOKafkaConsumer)
    plain = dataclasses.replace(s, kafka_consumer="aiokafka")
    assert isinstance(_Clients(plain, LivePlan("images", "g"))._new_consumer(), AIOKafkaConsumer)


class _Message:
    def topic(self) -> str:
        return "images"

    def partition(self) -> int:
        return 3

    def offset(self) -> int:
        return 42


class _Record(_Message):
    def __init__(self, offset: int) -> None:
        self._offset = offset

    def offset(self) -> int:
        return self._offset

    def error(self) -> None:
        return None


class _Queue:
    """librdkafka's consumer queue as ``_consume`` sees it: ``queued`` now, ``coming`` within a wait. It
    records each call, since librdkafka itself would hold a batch call with a timeout for all ``n``."""

    def __init__(self, queued: int, coming: int) -> None:
        self.queued = [_Record(i) for i in range(queued)]
        self.coming = [_Record(queued + i) for i in range(coming)]
        self.calls: list[tuple[int, float]] = []

    def consume(self, n: int, timeout: float) -> list[_Record]:
        self.calls.append((n, timeout))
        if not self.queued and timeout > 0:
            self.queued, self.coming = self.coming, []
        out, self.queued = self.queued[:n], self.queued[n:]
        return out

    def get_watermark_offsets(self, tp, cached: bool) -> tuple[int, int]:
        return 0, 100


@pytest.mark.parametrize(("queued", "coming", "calls", "got"), [
    (3, 0, [(500, 0)], 3),                      # records queued: taken at once, no wait for 500
    (600, 0, [(500, 0)], 500),                  # more than asked: the first 500
    (0, 3, [(500, 0), (1, 0.1), (499, 0)], 3),  # none: wait for the first, then take what came with it
    (0, 0, [(500, 0), (1, 0.1)], 0),            # none within the timeout: an empty poll
])
def test_a_poll_returns_what_is_queued_and_waits_only_for_the_first_record(queued, coming, calls, got):
    """As aiokafka's getmany: librdkafka's batch call with a timeout waits for all n records (or the
    whole timeout), which held every record below the peak for up to the poll timeout."""
    consumer = RdKafkaConsumer({})
    consumer._consumer = queue = _Queue(queued, coming)
    messages = consumer._consume(500, 0.1)
    assert queue.calls == calls
    assert [m.offset() for m in messages] == list(range(got))
    if got:
        assert consumer.highwater(consumer._tp("images", 3)) == 100


@pytest.mark.parametrize("code", [confluent_kafka.KafkaError._BAD_MSG, confluent_kafka.KafkaError._BAD_COMPRESSION,
                                  confluent_kafka.KafkaError.TOPIC_AUTHORIZATION_FAILED])
def test_a_corrupt_batch_or_a_refused_topic_stops_the_intake(code):
    # librdkafka would go on past a batch it cannot read: its records would be lost, so it is fatal
    consumer = RdKafkaConsumer({})
    with pytest.raises(RdKafkaError, match="topic=images partition=3 offset=42"):
        consumer._message_error(confluent_kafka.KafkaError(code), _Message())


@pytest.mark.parametrize("code", [confluent_kafka.KafkaError.UNKNOWN_TOPIC_OR_PART, confluent_kafka.KafkaError._TRANSPORT,
                                  confluent_kafka.KafkaError._PARTITION_EOF])
def test_a_missing_topic_or_a_lost_connection_is_waited_for(code):
    RdKafkaConsumer({})._message_error(confluent_kafka.KafkaError(code), _Message())  # logged, no raise


async def test_inside_a_rebalance_callback_the_owner_runs_the_hooks_calls_and_holds_polls_back():
    """A rebalance callback (inside a poll, on the owner thread) waits for the worker's hook; the calls
    the hook makes (a commit, a pause) must run meanwhile on that thread, the only one confluent-kafka
    lets in; a poll or close queued meanwhile waits for the callback to return."""
    owner = Owner("test-owner")
    order: list[str] = []
    hook_done: concurrent.futures.Future = concurrent.futures.Future()
    in_callback = threading.Event()

    def poll_with_callback() -> None:
        order.append("poll starts")
        in_callback.set()
        owner.serve_until(hook_done)
        order.append("poll ends")
    try:
        first_poll = owner.submit(poll_with_callback, reentrant=False)
        await asyncio.to_thread(in_callback.wait, 5)
        second_poll = owner.submit(lambda: order.append("second poll"), reentrant=False)
        commit = owner.submit(lambda: order.append("hook's commit") or threading.current_thread().name)
        assert await asyncio.wait_for(commit, 5) == "test-owner"
        assert order == ["poll starts", "hook's commit"]
        hook_done.set_result(None)
        await asyncio.wait_for(asyncio.gather(first_poll, second_poll), 5)
        assert order == ["poll starts", "hook's commit", "poll ends", "second poll"]
    finally:
        owner.close()


class _OwnerOnly:
    """The consumer's handle, noting every call made off the owner thread: confluent-kafka makes such a
    call wait, without a timeout, for the one in progress (a poll inside a rebalance callback that waits
    for the event loop: the deadlock CI met)."""

    def __init__(self, real) -> None:
        self._real = real
        self.strays: list[tuple[str, str]] = []
        self.calls: list[str] = []  # every call's name, in order

    def __getattr__(self, name: str):
        attr = getattr(self._real, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self.calls.append(name)
            thread = threading.current_thread().name
            if thread != "rdkafka-poll":
                self.strays.append((name, thread))
            return attr(*args, **kwargs)
        return call

@both_brokers
@pytest.mark.timeout(120)
async def test_a_revoke_runs_its_hook_to_the_end_before_another_member_gets_the_partitions(broker, topics):
    """The callback blocks librdkafka's rebalance until the worker's async hook (drain, flush, commit) is
    done: the member that joins is assigned the partitions only after the hook ended, and the hook's
    commit, made while the callback waits, is on the broker. Every call on the consumer's handle, the
    hook's and the lookups', is made on the owner thread."""
    await create_topics(broker.bootstrap, [(topics["input"], 4)])
    settings = Settings(bootstrap_servers=broker.bootstrap, session_timeout_ms=6000, fetch_max_wait_ms=50)
    events: list[tuple[str, float, frozenset]] = []

    async def assigned(tps: set) -> None:
        events.append(("assigned", time.monotonic(), frozenset(tps)))

    async def revoked(tps: set) -> None:
        events.append(("revoke starts", time.monotonic(), frozenset(tps)))
        await asyncio.sleep(1.5)  # a drain that takes a while
        await asyncio.wait_for(first.commit({tp: 2 for tp in tps}), 10)  # made inside the callback
        events.append(("revoke ends", time.monotonic(), frozenset(tps)))

    first = RdKafkaConsumer(rdkafka_consumer.config(settings, topics["group"]))
    await first.start()
    first._consumer = handle = _OwnerOnly(first._consumer)
    first.subscribe([topics["input"]], listener=RebalanceHooks(revoked, assigned))
    try:
        async with _polled(first):
            await _until(lambda: len(first.assignment()) == 4)
            some = sorted(first.assignment(), key=lambda tp: tp.partition)[:2]
            first.pause(*some)
            first.resume(*some)
            await first.commit({tp: 1 for tp in some})
            assert [await first.committed(tp) for tp in some] == [1, 1]
            assert set(await first.end_offsets(some)) == set(some)
            assert topics["input"] in await first.topics()
            second_assigned = await _join_and_leave(broker.bootstrap, topics)
        assert [await first.committed(TopicPartition(topics["input"], p)) for p in range(4)] == [2, 2, 2, 2]
    finally:
        await first.stop()
    assert handle.strays == [], "consumer calls made off the owner thread"
    ends = [t for name, t, _ in events if name == "revoke ends"]
    assert second_assigned and ends, events
    assert ends[0] < second_assigned[0][0], "the other member got partitions while the revoke hook still ran"
    assert all(isinstance(tp, TopicPartition) for tp in second_assigned[0][1])


async def _nothing(tps: set) -> None:
    pass


@contextlib.asynccontextmanager
async def _polled(consumer: RdKafkaConsumer):
    """Poll ``consumer`` in the background meanwhile: librdkafka runs the rebalance callbacks inside polls."""
    polling = True

    async def poll() -> None:
        while polling:
            await consumer.getmany(timeout_ms=50, max_records=100)
    poller = asyncio.create_task(poll())
    try:
        yield
    finally:
        polling = False
        await poller


async def _until(done, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def _join_and_leave(bootstrap: str, topics: dict[str, str]) -> list[tuple[float, frozenset]]:
    """A second member (aiokafka) joins the group, polls until it is given partitions, and leaves: the
    other member's partitions are revoked, then all of them assigned to it again. Returns (when, what)
    the second member was given."""
    second = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=topics["group"],
                              session_timeout_ms=6000, enable_auto_commit=False)
    got: list[tuple[float, frozenset]] = []

    async def second_got(tps: set) -> None:
        if tps:
            got.append((time.monotonic(), frozenset(tps)))
    await second.start()
    second.subscribe([topics["input"]], listener=RebalanceHooks(_nothing, second_got))
    try:
        for _ in range(300):
            await second.getmany(timeout_ms=100)
            if got:
                break
    finally:
        await second.stop()
    return got


@both_brokers
@pytest.mark.timeout(120)
async def test_a_partition_paused_before_a_rebalance_is_consumed_again_once_reassigned(broker, topics):
    """librdkafka keeps a partition's pause across unassign and assign; aiokafka, and so the worker
    (which pauses again in its assignment hook while backpressure holds), starts a new assignment
    unpaused. A pause the worker made before a rebalance must not outlive it (CI: a worker whose
    partitions were paused when the broker stalled consumed nothing after rejoining)."""
    await create_topics(broker.bootstrap, [(topics["input"], 4)])
    settings = Settings(bootstrap_servers=broker.bootstrap, session_timeout_ms=6000, fetch_max_wait_ms=50)
    first = RdKafkaConsumer(rdkafka_consumer.config(settings, topics["group"]))
    await first.start()
    rounds: list[frozenset] = []

    async def assigned(tps: set) -> None:
        rounds.append(frozenset(tps))
    first.subscribe([topics["input"]], listener=RebalanceHooks(_nothing, assigned))
    try:
        async with _polled(first):
            await _until(lambda: len(first.assignment()) == 4)
            all_four = first.assignment()
            first.pause(*all_four)  # backpressure, say; never resumed by hand below
            assert await _join_and_leave(broker.bootstrap, topics)
            await _until(lambda: len(rounds) >= 3 and first.assignment() == all_four)  # all, some, all again
        await produce(broker.bootstrap, topics["input"], [b"v%d" % i for i in range(40)], 4)
        seen: set[int] = set()
        deadline = time.monotonic() + 30
        while len(seen) < 4 and time.monotonic() < deadline:
            for tp, records in (await first.getmany(timeout_ms=200, max_records=100)).items():
                if records:
                    seen.add(tp.partition)
        assert seen == {0, 1, 2, 3}, f"partitions still paused after the rebalance: {sorted({0, 1, 2, 3} - seen)}"
    finally:
        await first.stop()


async def _read(consumer: RdKafkaConsumer, into: dict[int, list[int]], total: int) -> None:
    """Poll until ``into`` (partition -> offsets, in the order they came) holds ``total`` offsets."""
    deadline = time.monotonic() + 30
    while sum(map(len, into.values())) < total:
        assert time.monotonic() < deadline, f"{sum(map(len, into.values()))} of {total} records read"
        for tp, records in (await consumer.getmany(timeout_ms=100, max_records=20)).items():
            into.setdefault(tp.partition, []).extend(r.offset for r in records)


@both_brokers
@pytest.mark.timeout(120)
async def test_backpressure_holds_the_assignment_without_dropping_what_librdkafka_fetched(broker, topics):
    """librdkafka's pause drops what it prefetched and fetches it all again on resume; the worker pauses
    its whole assignment at every backpressure high mark (the GPU idle a third of the time on an H100).
    Such a pause is a hold: no records while it lasts, no pause or resume reaches librdkafka, and the
    records go on where they stopped, none lost or repeated. A hold that lasts ``hold_limit_s`` becomes
    librdkafka's pause (polls resume, so rebalance callbacks run), undone by the resume."""
    await create_topics(broker.bootstrap, [(topics["input"], 2)])
    await produce(broker.bootstrap, topics["input"], [b"v%d" % i for i in range(200)], 2)
    settings = Settings(bootstrap_servers=broker.bootstrap, session_timeout_ms=6000, fetch_max_wait_ms=50)
    consumer = RdKafkaConsumer(rdkafka_consumer.config(settings, topics["group"]))
    await consumer.start()
    consumer._consumer = handle = _OwnerOnly(consumer._consumer)
    consumer.subscribe([topics["input"]], listener=RebalanceHooks(_nothing, _nothing))
    seen: dict[int, list[int]] = {}
    try:
        await _read(consumer, seen, 40)
        assigned = consumer.assignment()
        consumer.pause(*assigned)
        for _ in range(5):
            assert await consumer.getmany(timeout_ms=50, max_records=100) == {}, "records while held"
        consumer.resume(*assigned)
        await _read(consumer, seen, 200)
        assert "pause" not in handle.calls and "resume" not in handle.calls, handle.calls

        consumer.hold_limit_s = 0.3
        consumer.pause(*assigned)
        await produce(broker.bootstrap, topics["input"], [b"w%d" % i for i in range(20)], 2)
        held_from = time.monotonic()
        while time.monotonic() - held_from < 1.5:
            assert await consumer.getmany(timeout_ms=50, max_records=100) == {}, "records while held"
        assert handle.calls.count("pause") == 1 and "resume" not in handle.calls, handle.calls
        consumer.resume(*assigned)
        await _read(consumer, seen, 220)
        assert handle.calls.count("resume") == 1, handle.calls
    finally:
        await consumer.stop()
    assert sorted(seen) == [0, 1] and all(offsets == list(range(110)) for offsets in seen.values()), seen
    assert handle.strays == [], "consumer calls made off the owner thread"

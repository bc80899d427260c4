"""Pure pieces of the per-poll intake (issue 11): pool chunks and the partition of each produce batch."""

from __future__ import annotations

import random

from aiokafka.partitioner import DefaultPartitioner

from worker.intake.partitions import by_partition
from worker.intake.pool import chunks, run_each


def test_chunks_are_contiguous_near_equal_and_in_order():
    items = list(range(10))
    parts = chunks(items, 3)
    assert [list(p) for p in parts] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [list(p) for p in chunks(items[:2], 4)] == [[0], [1]]  # never an empty part
    assert [list(p) for p in chunks(items, 1)] == [items]
    assert [list(p) for p in chunks([], 2)] == [[]]


def test_run_each_keeps_each_calls_exception_apart():
    def f(x):
        if x == 2:
            raise ValueError("bad")
        return x * 10
    out = run_each(f, [(1,), (2,), (3,)])
    assert out[0] == 10 and isinstance(out[1], ValueError) and out[2] == 30


def test_keyed_records_go_where_the_default_partitioner_sends_each_alone():
    rng = random.Random(7)
    keys = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))) for _ in range(500)]
    partitions, available = list(range(12)), [0, 3, 5, 7, 11]
    groups = by_partition(keys, DefaultPartitioner(), partitions, available)
    assert sorted(i for idx in groups.values() for i in idx) == list(range(len(keys)))
    for partition, idx in groups.items():
        assert idx == sorted(idx)  # the records' order within a batch
        for i in idx:
            assert DefaultPartitioner()(keys[i], partitions, available) == partition


def test_records_without_a_key_share_one_available_partition():
    picks = []

    def partitioner(key, all_partitions, available):
        if key is None:
            picks.append(None)
            return available[-1]
        return DefaultPartitioner()(key, all_partitions, available)
    keys = [None, b"a", None, b"b", None]
    groups = by_partition(keys, partitioner, [0, 1, 2, 3], [1, 2])
    assert len(picks) == 1  # one choice for the batch, as the partitioner makes it for no key
    assert {0, 2, 4} <= set(groups[2])
    assert by_partition([None] * 4, DefaultPartitioner(), [0, 1, 2], [1]) == {1: [0, 1, 2, 3]}


class _Batch:
    def __init__(self, room: int) -> None:
        self.room, self.records = room, []

    def append(self, *, timestamp, key, value, headers):
        if len(self.records) >= self.room:
            return None
        self.records.append(value)
        return object()


class _BatchProducer:
    """send_batch fails for the partitions in ``failing``; send (the per-record path) always succeeds."""

    def __init__(self, failing=(), room=100) -> None:
        import asyncio
        from types import SimpleNamespace
        self._asyncio = asyncio
        self.failing, self.room = set(failing), room
        self.batches, self.singles = [], []
        self._partitioner = DefaultPartitioner()
        self.client = SimpleNamespace(cluster=SimpleNamespace(available_partitions_for_topic=lambda t: {0, 1, 2}))

    async def partitions_for(self, topic):
        return {0, 1, 2}

    def create_batch(self):
        return _Batch(self.room)

    async def send_batch(self, batch, topic, *, partition):
        future = self._asyncio.get_running_loop().create_future()
        if partition in self.failing:
            from aiokafka.errors import KafkaTimeoutError
            future.set_exception(KafkaTimeoutError())
        else:
            self.batches.append((partition, list(batch.records)))
            future.set_result(None)
        return future

    async def send(self, topic, value, key=None, headers=None):
        self.singles.append(value)
        future = self._asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


async def test_publish_many_sends_by_batches_and_a_failed_batch_record_by_record():
    from worker.intake.publish import Publisher
    from worker.intake.records import Record
    keys = [f"k{i}".encode() for i in range(30)]
    failing = DefaultPartitioner()(keys[0], [0, 1, 2], [0, 1, 2])
    producer = _BatchProducer(failing={failing}, room=4)  # small batches: a full one is sent, a new one begun
    pub = Publisher(producer, max_pending=8)
    records = [Record(b"v%d" % i, k, []) for i, k in enumerate(keys)]
    out = await pub.publish_many("results", records)
    assert out == [None] * len(records)
    in_batches = [v for _, values in producer.batches for v in values]
    expected_alone = {r.value for r in records if DefaultPartitioner()(r.key, [0, 1, 2], [0, 1, 2]) == failing}
    assert set(producer.singles) == expected_alone  # the failed partition's records, each alone
    assert sorted(in_batches + producer.singles) == sorted(r.value for r in records)
    assert all(len(values) <= 4 for _, values in producer.batches)
    assert pub._slots._value == 8  # every slot given back

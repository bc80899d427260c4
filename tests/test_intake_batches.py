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

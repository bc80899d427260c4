"""Which output partition each record of a produce batch goes to: what the producer's partitioner would
choose for each record sent alone (aiokafka's ``DefaultPartitioner``: murmur2 of the key, as the Java
client), so batching results changes nothing for a consumer that relies on keys."""

from __future__ import annotations

from collections.abc import Callable, Sequence

Partitioner = Callable[[bytes | None, list[int], list[int]], int]


def by_partition(keys: Sequence[bytes | None], partitioner: Partitioner, all_partitions: list[int],
                 available: list[int]) -> dict[int, list[int]]:
    """Record indices grouped by partition, each group in the records' order. Keyed records go where
    ``partitioner`` puts them; the records without a key all go to one partition, picked as the
    partitioner picks for no key (random among the available ones): one batch instead of one per
    partition, and the same spread over many batches (the "sticky" choice of newer Kafka clients)."""
    groups: dict[int, list[int]] = {}
    unkeyed: int | None = None
    for i, key in enumerate(keys):
        if key is None:
            if unkeyed is None:
                unkeyed = partitioner(None, all_partitions, available)
            partition = unkeyed
        else:
            partition = partitioner(key, all_partitions, available)
        groups.setdefault(partition, []).append(i)
    return groups

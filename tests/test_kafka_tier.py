"""Kafka-tier cases whose tansu twins live elsewhere, where Apache Kafka behaves differently.

The replay's multi-record-batch case (tests/test_replay.py) is about tansu's short end offset; on Kafka
the end offset is true; this case also proves that a replay on Kafka finds the topic's partitions (it once
took them from the consumer's cached metadata, empty on Kafka without a subscription, and reported
"complete" having replayed nothing).
"""

from __future__ import annotations

import pytest

from tests.test_replay import test_until_end_covers_multi_record_batches as _until_end_over_multi_record_batches

pytestmark = pytest.mark.kafka


@pytest.mark.parametrize("broker", ["kafka"], indirect=True)
async def test_replay_until_end_covers_multi_record_batches_on_kafka(settings):
    await _until_end_over_multi_record_batches(settings)


def test_the_cluster_id_never_reads_as_an_option():
    from tests.kafka_broker import _cluster_id

    ids = [_cluster_id() for _ in range(2000)]  # about 31 of 2000 random ids start with "-"
    assert not [i for i in ids if i.startswith("-")] and all(len(i) == 22 for i in ids)

"""Bounded, resumable reprocessing of a topic range: what `worker replay` reads, and when it is done.

Three layers, from pure to connected:

1. ``range_spec`` parses the flags into a ``RangeSpec`` (start point, end point, partitions) and rejects
   what is wrong without asking the broker (bad syntax, start timestamp after end timestamp, ...).
2. ``plan_ranges`` turns a spec plus what the broker said (partitions, log start and end offsets, offsets
   for the timestamps) into one ``[start, end)`` per selected partition, or a ``ConfigError`` that
   names the partition and both offsets. Pure, so every rule is tested with plain calls;
   ``resolve`` gathers the broker's answers (end offsets snapshotted once, so traffic that arrives
   during the replay does not extend it) and calls it.
3. ``ReplayPlan`` is the worker's ``Plan`` for a replay: it assigns the partitions by hand under the
   replay's own consumer group, seeks each to ``max(committed, start)`` (so a killed replay resumes
   where its last commit left it), drops records at or past the end, and says "complete" once every
   partition's committable position reached its end. The run pipeline (worker.app) is the same one
   the live worker uses: a replay is a plan, not a copy.

Ranges are in offsets. Timestamps are resolved to offsets once, with ``offsets_for_times`` (the
earliest offset whose timestamp is at or after the given time), so a range from T1 until T2 holds the
messages at or after T1's offset and before T2's.
"""

from worker.replay.plan import ReplayPlan
from worker.replay.ranges import PartitionRange, Resolved, plan_ranges, resolve, select_partitions
from worker.replay.spec import (Bound, RangeSpec, parse_offsets, parse_partitions, parse_timestamp, range_spec,
                                replay_group_id)

__all__ = ["Bound", "PartitionRange", "RangeSpec", "ReplayPlan", "Resolved", "parse_offsets", "parse_partitions",
           "parse_timestamp", "plan_ranges", "range_spec", "replay_group_id", "resolve", "select_partitions"]

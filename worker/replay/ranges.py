"""Layer 2 of a replay: a spec against the broker's answers, one ``[start, end)`` per partition."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from worker.errors import ConfigError
from worker.settings import Settings
from worker.replay.ends import probe_offset, true_end
from worker.replay.spec import RangeSpec

_BROKER_TIMEOUT_S = 30.0
_PROBE_TIMEOUT_S = 10.0  # the fetch at end - 1 (true_end_offsets); past it the broker's end offset stands


@dataclass(frozen=True)
class PartitionRange:
    partition: int
    start: int
    end: int  # exclusive

    @property
    def size(self) -> int:
        return max(0, self.end - self.start)


@dataclass
class Resolved:
    ranges: dict[int, PartitionRange]
    warnings: list[str] = field(default_factory=list)


def _join(partitions) -> str:
    return ",".join(map(str, sorted(partitions)))


def select_partitions(spec: RangeSpec, existing: set[int]) -> list[int]:
    named = [dict(b.offsets) for b in (spec.start, spec.until) if b.kind == "offsets"]
    if spec.partitions is not None:
        selected = list(spec.partitions)
        for b, flag in ((spec.start, "--from-offset"), (spec.until, "--until-offset")):
            if b.kind == "offsets" and set(dict(b.offsets)) != set(selected):
                raise ConfigError(f"{flag} must give an offset for exactly the partitions of --partitions "
                                  f"({_join(selected)}); it names {_join(dict(b.offsets))}")
    elif named:
        if len(named) == 2 and set(named[0]) != set(named[1]):
            raise ConfigError(f"--from-offset and --until-offset name different partitions "
                              f"({_join(named[0])} vs {_join(named[1])})")
        selected = sorted(named[0])
    else:
        selected = sorted(existing)
    unknown = [p for p in selected if p not in existing]
    if unknown:
        has = f"has partitions 0-{max(existing)} ({len(existing)})" if existing else "has no partitions"
        raise ConfigError(f"unknown partition {unknown[0]}: topic {spec.topic} {has}")
    return selected


def _offset_of(bound, flag: str, p: int, given: dict[int, int], by_time: dict[int, int | None] | None,
               default: int, hi: int, note: str = "") -> int:
    """One end of partition ``p``'s range: a given offset (not past the log end), the offset found for a
    timestamp (the log end where none is at or after it), or ``default`` (beginning, or the end snapshot)."""
    if bound.kind == "offsets":
        offset = given[p]
        if offset > hi:
            raise ConfigError(f"partition {p}: {flag} {p}:{offset} is past the end of the partition "
                              f"(end offset {hi}){note}")
        return offset
    if bound.kind == "timestamp":
        found = (by_time or {}).get(p)
        return hi if found is None else found
    return default


def plan_ranges(spec: RangeSpec, existing: set[int], first: dict[int, int], last: dict[int, int],
                start_by_time: dict[int, int | None] | None = None,
                end_by_time: dict[int, int | None] | None = None) -> Resolved:
    """``first``/``last``: log start and end offsets; ``*_by_time``: offsets_for_times (None: no such message)."""
    out = Resolved({})
    selected = select_partitions(spec, existing)
    if spec.start.kind == "timestamp" and all((start_by_time or {}).get(p) is None for p in selected):
        raise ConfigError(f"no offsets for --from-timestamp: no message at or after {spec.start.describe()} "
                          f"in partitions {_join(selected)} of {spec.topic}; nothing to replay")
    starts, ends = dict(spec.start.offsets), dict(spec.until.offsets)
    for p in selected:
        lo, hi = first[p], last[p]
        start = _offset_of(spec.start, "--from-offset", p, starts, start_by_time, lo, hi)
        end = _offset_of(spec.until, "--until-offset", p, ends, end_by_time, hi, hi,
                         "; a replay does not wait for new messages")
        if end < lo:
            out.warnings.append(f"partition {p}: the range ends at offset {end}, below the log start offset {lo} "
                                f"(deleted by retention); nothing to replay there")
            end = lo
        if start > end:
            raise ConfigError(f"start after end: partition {p} would start at offset {start} "
                              f"({spec.start.describe()}) but end at offset {end} ({spec.until.describe()})")
        if start < lo:
            out.warnings.append(f"partition {p}: offsets below {lo} were deleted by retention; "
                                f"replaying from {min(lo, end)} instead of {start}")
            start = min(lo, end)
        out.ranges[p] = PartitionRange(p, start, max(start, end))
    return out


def _by_time(answer: dict, tps: list[TopicPartition]) -> dict[int, int | None]:
    # Kafka answers "no message at or after" with offset -1 (aiokafka: None); tansu with timestamp -1.
    return {tp.partition: (None if answer.get(tp) is None or answer[tp].timestamp < 0 else answer[tp].offset)
            for tp in tps}


async def true_end_offsets(consumer: AIOKafkaConsumer, first: dict[TopicPartition, int],
                           last: dict[TopicPartition, int], timeout_s: float = _PROBE_TIMEOUT_S,
                           ) -> tuple[dict[TopicPartition, int], list[TopicPartition]]:
    """``last`` (end_offsets) checked by one fetch at ``end - 1`` per partition (worker.replay.ends: the
    embedded broker answers the last batch's base offset + 1). Returns the ends and the partitions whose
    fetch got no answer in time (their end offset stands). Leaves ``consumer`` assigned to them."""
    probes = {tp: o for tp, e in last.items() if (o := probe_offset(first.get(tp, 0), e)) is not None}
    if not probes:
        return dict(last), []
    consumer.assign(list(probes))
    for tp, offset in probes.items():
        consumer.seek(tp, offset)
    fetched: dict[TopicPartition, list[int]] = {tp: [] for tp in probes}
    pending = set(probes)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while pending and loop.time() < deadline:
        answer = await consumer.getmany(*pending, timeout_ms=200)
        for tp, records in answer.items():
            fetched[tp].extend(r.offset for r in records)
            pending.discard(tp)  # one fetch is enough: the one that holds end - 1 when there is one
        for tp in list(pending):  # moved on without a record: a control batch or a reset; nothing to add
            if await consumer.position(tp) > probes[tp]:
                pending.discard(tp)
    return ({tp: true_end(e, fetched.get(tp, ()), first.get(tp, 0)) for tp, e in last.items()},
            sorted(pending, key=lambda tp: tp.partition))


async def resolve(spec: RangeSpec, settings: Settings) -> Resolved:
    """Ask the broker once (topics, offsets) and plan the ranges; ConfigError before any processing."""
    consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **settings.kafka_common())
    try:
        await asyncio.wait_for(consumer.start(), _BROKER_TIMEOUT_S)
        topics = await asyncio.wait_for(consumer.topics(), _BROKER_TIMEOUT_S)
        for name, what in ((spec.topic, "input topic"), (settings.output_topic, "output topic"),
                           (settings.dlq_topic, "DLQ topic")):
            if name not in topics:
                raise ConfigError(f"topic missing: {what} {name!r} does not exist on {settings.bootstrap_servers}"
                                  + ("" if what == "input topic" else "; create it first (a replay creates no topics)"))
        # From a fresh metadata answer: the consumer's cached cluster lists no topic on Apache Kafka when
        # it has no subscription (tansu's bootstrap answer happened to fill it), and an empty partition set
        # would plan nothing and report "complete".
        cluster = await asyncio.wait_for(consumer._client.fetch_all_metadata(), _BROKER_TIMEOUT_S)
        existing = set(cluster.partitions_for_topic(spec.topic) or ())
        if not existing:
            raise ConfigError(f"input topic {spec.topic!r} has no partitions in the broker's metadata "
                              f"({settings.bootstrap_servers}): nothing to replay")
        selected = select_partitions(spec, existing)  # before asking for offsets of partitions that may not exist
        tps = [TopicPartition(spec.topic, p) for p in selected]
        first = await asyncio.wait_for(consumer.beginning_offsets(tps), _BROKER_TIMEOUT_S)
        last = await asyncio.wait_for(consumer.end_offsets(tps), _BROKER_TIMEOUT_S)  # the snapshot
        last, unchecked = await true_end_offsets(consumer, first, last)
        by_time = {}
        for which, bound in (("start", spec.start), ("end", spec.until)):
            if bound.kind == "timestamp":
                answer = await asyncio.wait_for(
                    consumer.offsets_for_times({tp: bound.timestamp_ms for tp in tps}), _BROKER_TIMEOUT_S)
                by_time[which] = _by_time(answer, tps)
        resolved = plan_ranges(spec, existing, {tp.partition: o for tp, o in first.items()},
                               {tp.partition: o for tp, o in last.items()}, by_time.get("start"), by_time.get("end"))
        resolved.warnings += [f"partition {tp.partition}: no answer to a fetch at its end offset - 1 within "
                              f"{_PROBE_TIMEOUT_S:g}s; taking the broker's end offset {last[tp]} as the end "
                              f"(a broker that reports the last batch's start would leave that batch out)"
                              for tp in unchecked]
        return resolved
    except (KafkaError, OSError, asyncio.TimeoutError) as exc:
        raise ConfigError(f"cannot resolve the replay range on {settings.bootstrap_servers}: "
                          f"{type(exc).__name__}: {exc}") from None
    finally:
        await consumer.stop()



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

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from worker import log
from worker.errors import ConfigError
from worker.flow.rate import RateLimiter
from worker.settings import Settings

# Epoch milliseconds below this (March 1973) are almost surely epoch *seconds* given by mistake.
_MIN_EPOCH_MS = 100_000_000_000
_BROKER_TIMEOUT_S = 30.0


# --- 1. the spec, parsed from flags ------------------------------------------------------------
@dataclass(frozen=True)
class Bound:
    """A start or end point: ``beginning`` / ``end`` (of the log), per-partition ``offsets``, or a ``timestamp``."""

    kind: str
    offsets: tuple[tuple[int, int], ...] = ()
    timestamp_ms: int | None = None

    def key(self) -> str:
        """Normalised text for the replay group's hash (ISO and epoch-ms of one instant agree)."""
        if self.kind == "offsets":
            return "offsets:" + ",".join(f"{p}:{o}" for p, o in sorted(self.offsets))
        if self.kind == "timestamp":
            return f"timestamp:{self.timestamp_ms}"
        return self.kind

    def describe(self) -> str:
        if self.kind == "offsets":
            return "offsets " + ",".join(f"{p}:{o}" for p, o in self.offsets)
        if self.kind == "timestamp":
            iso = datetime.fromtimestamp(self.timestamp_ms / 1000, timezone.utc).isoformat(timespec="milliseconds")
            return f"timestamp {iso.replace('+00:00', 'Z')} ({self.timestamp_ms})"
        return self.kind


@dataclass(frozen=True)
class RangeSpec:
    topic: str
    start: Bound
    until: Bound
    partitions: tuple[int, ...] | None = None  # None: every partition (or those the offset lists name)

    def key(self) -> str:
        parts = ",".join(map(str, sorted(self.partitions))) if self.partitions is not None else "all"
        return f"topic={self.topic};partitions={parts};from={self.start.key()};until={self.until.key()}"


def parse_offsets(text: str, flag: str) -> tuple[tuple[int, int], ...]:
    """``"0:10,3:7"`` → ((0, 10), (3, 7))."""
    out: list[tuple[int, int]] = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        p, sep, o = item.partition(":")
        if not sep or not p.strip().isdigit() or not o.strip().isdigit():
            raise ConfigError(f"{flag}: {item!r} is not PARTITION:OFFSET (non-negative integers), "
                              f"e.g. {flag} 0:1200,3:900")
        out.append((int(p), int(o)))
    if not out:
        raise ConfigError(f"{flag} needs at least one PARTITION:OFFSET, e.g. {flag} 0:1200,3:900")
    seen = [p for p, _ in out]
    dup = sorted({p for p in seen if seen.count(p) > 1})
    if dup:
        raise ConfigError(f"{flag} names partition {dup[0]} more than once")
    return tuple(out)


def parse_partitions(text: str) -> tuple[int, ...]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items or not all(s.isdigit() for s in items):
        raise ConfigError(f"--partitions: {text!r} is not a comma-separated list of partition numbers, e.g. 0,1,5")
    parts = [int(s) for s in items]
    if len(set(parts)) != len(parts):
        raise ConfigError(f"--partitions lists a partition more than once: {text!r}")
    return tuple(sorted(parts))


def parse_timestamp(text: str, flag: str) -> int:
    """ISO 8601 (no zone: UTC) or epoch milliseconds → epoch milliseconds."""
    raw = text.strip()
    if raw.isdigit():
        ms = int(raw)
        if ms < _MIN_EPOCH_MS:
            raise ConfigError(f"{flag} {raw}: epoch timestamps are in milliseconds; {raw} would be "
                              f"{datetime.fromtimestamp(ms / 1000, timezone.utc):%Y-%m-%d} (seconds? use {ms * 1000})")
        return ms
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise ConfigError(f"{flag} {raw!r} is neither ISO 8601 (2026-11-01T00:00:00Z) nor epoch milliseconds") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return int(when.timestamp() * 1000)


def range_spec(topic: str, *, from_beginning: bool = False, from_offset: str | None = None,
               from_timestamp: str | None = None, until: str | None = None, until_offset: str | None = None,
               until_timestamp: str | None = None, partitions: str | None = None) -> RangeSpec:
    """The flags of `worker replay` as a spec; every check that needs no broker happens here."""
    starts = [name for name, v in (("--from-beginning", from_beginning), ("--from-offset", from_offset),
                                   ("--from-timestamp", from_timestamp)) if v]
    ends = [name for name, v in (("--until", until), ("--until-offset", until_offset),
                                 ("--until-timestamp", until_timestamp)) if v]
    if len(starts) != 1:
        raise ConfigError("a replay needs exactly one start point: --from-beginning, --from-offset P:O,... or "
                          "--from-timestamp ISO8601|EPOCH_MS" + (f" (got {' and '.join(starts)})" if starts else ""))
    if len(ends) > 1:
        raise ConfigError(f"a replay takes one end point, got {' and '.join(ends)}")
    if until not in (None, "end"):
        raise ConfigError(f"--until {until!r}: the only value is 'end' (use --until-offset or --until-timestamp)")
    if from_offset:
        start = Bound("offsets", offsets=parse_offsets(from_offset, "--from-offset"))
    elif from_timestamp:
        start = Bound("timestamp", timestamp_ms=parse_timestamp(from_timestamp, "--from-timestamp"))
    else:
        start = Bound("beginning")
    if until_offset:
        end = Bound("offsets", offsets=parse_offsets(until_offset, "--until-offset"))
    elif until_timestamp:
        end = Bound("timestamp", timestamp_ms=parse_timestamp(until_timestamp, "--until-timestamp"))
    else:
        end = Bound("end")
    if start.kind == end.kind == "timestamp" and start.timestamp_ms > end.timestamp_ms:
        raise ConfigError(f"start after end: --from-timestamp {start.describe()} is after "
                          f"--until-timestamp {end.describe()}")
    if start.kind == end.kind == "offsets":
        ends_by_p = dict(end.offsets)
        for p, o in start.offsets:
            if p in ends_by_p and o > ends_by_p[p]:
                raise ConfigError(f"start after end: partition {p} starts at offset {o} "
                                  f"(--from-offset) but ends at offset {ends_by_p[p]} (--until-offset)")
    return RangeSpec(topic, start, end, parse_partitions(partitions) if partitions else None)


def replay_group_id(live_group: str, spec: RangeSpec, output_topic: str, pipeline_label: str,
                    run_id: str = "") -> str:
    """``<live group>-replay-<hash>``: the same replay (range, output topic, models, run id) always gets
    the same group, so a restart resumes it; a new range, model version or run id starts afresh."""
    ident = json.dumps({"range": spec.key(), "output": output_topic, "pipeline": pipeline_label, "run": run_id},
                       sort_keys=True)
    return f"{live_group}-replay-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


# --- 2. the spec against the broker: one [start, end) per partition --------------------------------
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
        if spec.start.kind == "offsets":
            start = starts[p]
            if start > hi:
                raise ConfigError(f"partition {p}: --from-offset {p}:{start} is past the end of the partition "
                                  f"(end offset {hi})")
        elif spec.start.kind == "timestamp":
            start = hi if start_by_time[p] is None else start_by_time[p]
        else:
            start = lo
        if spec.until.kind == "offsets":
            end = ends[p]
            if end > hi:
                raise ConfigError(f"partition {p}: --until-offset {p}:{end} is past the end of the partition "
                                  f"(end offset {hi}); a replay does not wait for new messages")
        elif spec.until.kind == "timestamp":
            end = hi if end_by_time[p] is None else end_by_time[p]
        else:
            end = hi
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
        existing = set(consumer.partitions_for_topic(spec.topic) or ())
        selected = select_partitions(spec, existing)  # before asking for offsets of partitions that may not exist
        tps = [TopicPartition(spec.topic, p) for p in selected]
        first = await asyncio.wait_for(consumer.beginning_offsets(tps), _BROKER_TIMEOUT_S)
        last = await asyncio.wait_for(consumer.end_offsets(tps), _BROKER_TIMEOUT_S)  # the snapshot
        by_time = {}
        for which, bound in (("start", spec.start), ("end", spec.until)):
            if bound.kind == "timestamp":
                answer = await asyncio.wait_for(
                    consumer.offsets_for_times({tp: bound.timestamp_ms for tp in tps}), _BROKER_TIMEOUT_S)
                by_time[which] = _by_time(answer, tps)
        return plan_ranges(spec, existing, {tp.partition: o for tp, o in first.items()},
                           {tp.partition: o for tp, o in last.items()}, by_time.get("start"), by_time.get("end"))
    except (KafkaError, OSError, asyncio.TimeoutError) as exc:
        raise ConfigError(f"cannot resolve the replay range on {settings.bootstrap_servers}: "
                          f"{type(exc).__name__}: {exc}") from None
    finally:
        await consumer.stop()


# --- 3. the worker's plan ------------------------------------------------------------------------
class ReplayPlan:
    """Manual assignment under the replay group; done when every partition's position reached its end."""

    def __init__(self, topic: str, ranges: dict[int, PartitionRange], group_id: str,
                 rate: float | None = None) -> None:
        self.topic = topic
        self.group_id = group_id
        self.ranges = {TopicPartition(topic, p): r for p, r in sorted(ranges.items())}
        self.limiter = RateLimiter(rate) if rate else None
        self.resume_from: dict[TopicPartition, int] = {}  # where this run starts, after earlier runs' commits
        self.attached_at: float | None = None
        self.finished = False
        self._consumer: AIOKafkaConsumer | None = None
        self._passed: set[TopicPartition] = set()  # a record at or past the end was seen
        self._last: dict[TopicPartition, int] = {}  # highest accepted offset
        self._log = log.get("replay", group_id=group_id)

    @property
    def total(self) -> int:
        """Offsets this run still has to cover (the whole range minus what earlier runs committed)."""
        return sum(r.end - self.resume_from.get(tp, r.start) for tp, r in self.ranges.items())

    @property
    def already_done(self) -> int:
        return sum(self.resume_from.get(tp, r.start) - r.start for tp, r in self.ranges.items())

    async def attach(self, consumer: AIOKafkaConsumer, listener: ConsumerRebalanceListener) -> None:
        tps = list(self.ranges)
        # Read the commits before assign(): assign + seek then run without an await in between, so
        # aiokafka's own committed-offset refresh cannot move the position we chose.
        committed = await asyncio.gather(*(consumer.committed(tp) for tp in tps))
        for tp, done in zip(tps, committed):
            r = self.ranges[tp]
            if done is not None and done > r.end:
                self._log.warning("replay group already committed past this range's end; nothing to do here "
                                  "(pass a new --replay-group or --run-id to process it again)",
                                  partition=tp.partition, committed=done, end=r.end)
            self.resume_from[tp] = min(r.end, max(r.start, done or 0))
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, self.resume_from[tp])
        finished = [tp for tp in tps if self.resume_from[tp] >= self.ranges[tp].end]
        if finished:
            consumer.pause(*finished)  # nothing to fetch there
        self._consumer = consumer
        self.attached_at = time.monotonic()
        self._log.info("replay attached", total=self.total, already_done=self.already_done,
                       ranges={tp.partition: [self.resume_from[tp], r.end] for tp, r in self.ranges.items()})
        # No group rebalance with manual assignment: tell the worker itself (metrics, readiness).
        await listener.on_partitions_assigned(set(tps))

    def accept(self, tp: TopicPartition, offset: int) -> bool:
        r = self.ranges.get(tp)
        if r is None:
            return False
        if offset >= r.end:
            if tp not in self._passed:
                self._passed.add(tp)
                self._log.debug("partition reached its end", partition=tp.partition, end=r.end)
            if self._consumer is not None:
                self._consumer.pause(tp)  # stop fetching past the end (a backpressure resume may undo it)
            return False
        if offset < self.resume_from.get(tp, r.start):
            return False
        self._last[tp] = max(offset, self._last.get(tp, offset))
        return True

    def partition_done(self, tp: TopicPartition, position: int | None) -> bool:
        end = self.ranges[tp].end
        if self.resume_from.get(tp, self.ranges[tp].start) >= end or (position is not None and position >= end):
            return True
        # Offsets missing at the end of the range (compaction, transaction markers) are never delivered:
        # once a record past the end was seen, the partition is done when everything accepted is finished.
        if tp in self._passed:
            return tp not in self._last or (position is not None and position > self._last[tp])
        return False

    def complete(self, positions: dict[TopicPartition, int | None]) -> bool:
        if all(self.partition_done(tp, positions.get(tp)) for tp in self.ranges):
            self.finished = True
        return self.finished

    async def throttle(self, n: int) -> None:
        """Awaited by the consume loop before each message starts (``--rate``)."""
        if self.limiter is not None:
            await self.limiter.acquire(n)

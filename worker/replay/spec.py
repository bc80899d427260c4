"""Layer 1 of a replay: the range flags parsed into a ``RangeSpec``, checked without the broker."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone


from worker.errors import ConfigError

# Epoch milliseconds below this (March 1973) are almost surely epoch *seconds* given by mistake.
_MIN_EPOCH_MS = 100_000_000_000



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


def _bound(offsets: str | None, timestamp: str | None, side: str, default: str) -> Bound:
    """One end of the range from its flags (``side`` "from" or "until"); neither flag: ``default``."""
    if offsets:
        return Bound("offsets", offsets=parse_offsets(offsets, f"--{side}-offset"))
    if timestamp:
        return Bound("timestamp", timestamp_ms=parse_timestamp(timestamp, f"--{side}-timestamp"))
    return Bound(default)


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
    start = _bound(from_offset, from_timestamp, "from", "beginning")
    end = _bound(until_offset, until_timestamp, "until", "end")
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



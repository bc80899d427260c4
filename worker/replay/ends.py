"""The true end of a partition from the broker's end offset and one fetch at it (pure; see ranges.py).

Kafka answers ListOffsets(latest) with the high watermark: the offset after the last record. tansu (the
embedded broker) answers with the *base* offset of the last record batch + 1: three batches of 10
records at 0..29 give 21, so a replay ``--until end`` would stop 9 records short and call it complete.

The check that works on both: seek to ``end - 1`` and fetch once. On Kafka that returns the record at
``end - 1`` (the answer stands); on tansu it returns the whole last batch, ``end - 1`` and the records
after it. The true end is past the contiguous run of offsets that starts at ``end - 1``. When no record
is at ``end - 1`` (compaction, a transaction marker) nothing is proved and the broker's answer stands.

A fetch can also return records that arrived after ``end_offsets`` answered: on tansu they cannot be
told from the rest of the last batch, so they are in (the snapshot is then the fetch's moment, a few
milliseconds later, and still a prefix of the log: nothing is left out before it).
"""

from __future__ import annotations

from collections.abc import Iterable


def probe_offset(start: int, end: int) -> int | None:
    """Where to fetch to check ``end`` (None: an empty partition, nothing to check)."""
    return end - 1 if end > start else None


def true_end(end: int, fetched: Iterable[int], start: int = 0) -> int:
    """The end offset given the broker's ``end`` and the offsets one fetch at ``end - 1`` returned."""
    if probe_offset(start, end) is None:
        return end
    seen = set(fetched)
    if end - 1 not in seen:
        return end  # no record at end - 1 (compacted away, a control record) or no answer: keep it
    while end in seen:
        end += 1
    return end

"""Socket reads sized for fetch responses, so a busy event loop still drains them quickly.

A fetch response of 76 KB images runs to megabytes. aiokafka reads it through an ``asyncio.StreamReader``
whose limit is 64 KiB (``aiokafka.conn.READER_LIMIT``): past 128 KiB buffered the transport stops
reading until the reader task has run, so a 5.6 MB response takes ~44 pause/resume round trips through
the event loop; and asyncio's socket transport reads at most 256 KiB per loop iteration. On an idle
loop neither matters. On the worker's loop, busy with a few thousand messages a second, every round
trip waits behind all the ready callbacks, and the fetch path, not the GPU, bounds the worker.

Measured here (tansu, 8 partitions, 76 KB records, a loop kept busy by 40 tasks of 50 us each):
64 KiB limit and 256 KiB reads 592 records/s; 16 MiB limit 921/s; 16 MiB and 4 MiB reads 1,965/s
(idle loop: ~5,000/s in all three).

Both knobs are process-wide (aiokafka's module constant, asyncio's transport class attribute), so this
is applied once at start-up, before any client connects; it only raises them, never lowers.
"""

from __future__ import annotations

from worker import log

_log = log.get(__name__)


def widen_socket_reads(read_bytes: int, reader_limit: int) -> dict[str, int]:
    """Raise asyncio's per-read size to ``read_bytes`` and aiokafka's stream limit to ``reader_limit``
    (0: leave as is). Returns what is in force."""
    from asyncio import selector_events

    import aiokafka.conn

    transport = getattr(selector_events, "_SelectorSocketTransport", None)
    if read_bytes and transport is not None and getattr(transport, "max_size", read_bytes) < read_bytes:
        transport.max_size = read_bytes
    if reader_limit and aiokafka.conn.READER_LIMIT < reader_limit:
        aiokafka.conn.READER_LIMIT = reader_limit
    in_force = {"socket_read_bytes": int(getattr(transport, "max_size", 0)),
                "kafka_reader_limit": int(aiokafka.conn.READER_LIMIT)}
    _log.debug("socket_reads", **in_force)
    return in_force

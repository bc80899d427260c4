"""The control messages of a link between an intake and the GPU process: pure packing, no I/O.

Image bytes, decoded rows and results travel in the intake's slot ring (shared memory); these
messages only say which slot holds what. One message carries every request (or reply) that was ready
at the time, so a poll's worth of images costs one pipe write, not one per image.

Request (intake -> GPU):  kind, slot, request id, payload bytes, partition, offset, image header.
Reply (GPU -> intake):    request id, slot, status, result bytes, where the result lies.
A slot of -1 means the payload did not fit a slot and lies in an overflow segment of its own, named
after the request id (``overflow_name``).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from enum import IntEnum

from worker.decode.headers import COLORS, FORMATS, ImageInfo

REQUESTS = b"R"
REPLIES = b"A"
FATAL = b"F"

_COUNT = struct.Struct("<I")
_REQUEST = struct.Struct("<BiIIiqBBIIBBB")
_REPLY = struct.Struct("<IiBIB")


class Kind(IntEnum):
    ROWS = 0  # decoded on the intake: one uint8 HWC array per model, back to back
    ENCODED = 1  # checked bytes the GPU process decodes (decoder=nvimgcodec)


class Status(IntEnum):
    OK = 0
    POISON = 1  # the input's fault: to the DLQ
    RETRIABLE = 2  # a device error: left uncommitted
    FATAL = 3  # the worker must stop


class Placement(IntEnum):
    SLOT = 0  # the result lies in the request's slot
    INLINE = 1  # it follows the reply header in the message (larger than a slot)


@dataclass(frozen=True)
class Request:
    kind: Kind
    slot: int
    request_id: int
    nbytes: int
    partition: int
    offset: int
    info: ImageInfo | None = None  # for Kind.ENCODED


@dataclass(frozen=True)
class Reply:
    request_id: int
    slot: int
    status: Status
    nbytes: int
    placement: Placement
    inline: bytes = b""


def overflow_name(link_name: str, request_id: int) -> str:
    return f"{link_name}-o{request_id}"


def overflow_pattern(link_name: str) -> str:
    """A glob of every overflow segment of the run's links (``<run>-ring<i>-o<id>``, any i), or of this
    link's alone where its name is not a run's ring."""
    return re.sub(r"-ring\d+$", "-ring*", link_name) + "-o*"


def pack_requests(requests: list[Request]) -> bytes:
    parts = [REQUESTS, _COUNT.pack(len(requests))]
    for r in requests:
        i = r.info
        parts.append(_REQUEST.pack(
            r.kind, r.slot, r.request_id, r.nbytes, r.partition, r.offset,
            FORMATS.index(i.format) if i else 0, COLORS.index(i.color) if i else 0,
            i.width if i else 0, i.height if i else 0, i.channels if i else 0, i.bit_depth if i else 0,
            min(i.bits_per_pixel, 255) if i else 0))
    return b"".join(parts)


def unpack_requests(message: bytes) -> list[Request]:
    if message[:1] != REQUESTS:
        raise ValueError(f"not a request message: {message[:1]!r}")
    (n,) = _COUNT.unpack_from(message, 1)
    out = []
    pos = 1 + _COUNT.size
    for _ in range(n):
        kind, slot, rid, nbytes, part, off, fmt, color, w, h, ch, depth, bpp = _REQUEST.unpack_from(message, pos)
        pos += _REQUEST.size
        info = ImageInfo(FORMATS[fmt], w, h, ch, depth, COLORS[color], bpp) if kind == Kind.ENCODED else None
        out.append(Request(Kind(kind), slot, rid, nbytes, part, off, info))
    return out


def pack_replies(replies: list[Reply]) -> bytes:
    parts = [REPLIES, _COUNT.pack(len(replies))]
    for r in replies:
        parts.append(_REPLY.pack(r.request_id, r.slot, r.status, r.nbytes, r.placement))
        if r.placement == Placement.INLINE:
            parts.append(r.inline)
    return b"".join(parts)


def unpack_replies(message: bytes) -> list[Reply]:
    if message[:1] != REPLIES:
        raise ValueError(f"not a reply message: {message[:1]!r}")
    (n,) = _COUNT.unpack_from(message, 1)
    out = []
    pos = 1 + _COUNT.size
    for _ in range(n):
        rid, slot, status, nbytes, placement = _REPLY.unpack_from(message, pos)
        pos += _REPLY.size
        inline = b""
        if placement == Placement.INLINE:
            inline = bytes(message[pos:pos + nbytes])
            pos += nbytes
        out.append(Reply(rid, slot, Status(status), nbytes, Placement(placement), inline))
    return out


def pack_fatal(message: str) -> bytes:
    return FATAL + message.encode("utf-8", "replace")

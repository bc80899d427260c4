"""A JPEG read marker by marker, without decoding: the header up to the first scan (``header``), then the
scans behind it (``check_scans``). Both bound their steps, so a value made of markers costs little."""

from __future__ import annotations

import re
import struct

from worker.decode.imageinfo import ImageInfo
from worker.decode.imageinfo import corrupt_header as _bad
from worker.decode.imageinfo import truncated_header as _truncated
from worker.errors import DecodeBomb, TruncatedImage, UnsupportedImage

_SOF_DECODABLE = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC9, 0xCA})  # baseline, extended, progressive, lossless
_SOF_HIERARCHICAL = frozenset({0xC5, 0xC6, 0xC7, 0xCB, 0xCD, 0xCE, 0xCF})  # libjpeg refuses these
_FILL = re.compile(rb"\xff+")
_JPEG_MAX_STEPS = 2000


def header(d: bytes) -> ImageInfo:
    """The header of the JPEG ``d``: its markers up to the first scan (SOS)."""
    n = len(d)
    pos = 2
    sof: tuple[int, int, int, int, int] | None = None
    adobe_transform = None
    # Real files have tens of markers before the scan (APPn, DQT, DHT, SOF); a value made of millions of
    # empty ones would hold the GIL for seconds in this loop, so stop counting well before that.
    for _ in range(_JPEG_MAX_STEPS):
        # Like libjpeg's next_marker: bytes before 0xFF are skipped (with a warning there), 0xFF fill bytes
        # are skipped, and FF00 is stuffing rather than a marker. Real files put each marker right where the
        # last segment ended, one 0xFF and its code: taken as it is, without the searches (this runs on the
        # intake's event loop for every image the card decodes).
        if pos + 1 < n and d[pos] == 0xFF and d[pos + 1] != 0xFF:
            marker = d[pos + 1]
            pos += 2
        else:
            pos = d.find(b"\xff", pos)
            if pos < 0:
                raise _truncated("JPEG", n, "a frame header (SOF) and a scan (SOS)")
            pos = _FILL.match(d, pos).end()
            if pos >= n:
                raise _truncated("JPEG", n, "a marker after the 0xFF fill bytes at the end")
            marker = d[pos]
            pos += 1
        if marker == 0 or 0xD0 <= marker <= 0xD7 or marker == 0x01:
            continue  # stuffing; RSTn and TEM carry no length
        if marker == 0xD9:
            raise _bad("JPEG", f"end of image (EOI) at byte {pos - 2} before any scan")
        if marker == 0xD8:
            raise _bad("JPEG", f"second start of image (SOI) at byte {pos - 2}")
        if pos + 2 > n:
            raise _truncated("JPEG", n, f"the length of marker 0x{marker:02X} at byte {pos - 2}")
        length = (d[pos] << 8) | d[pos + 1]
        if length < 2:
            raise _bad("JPEG", f"marker 0x{marker:02X} at byte {pos - 2} has length {length}")
        end = pos + length
        if end > n:
            raise _truncated("JPEG", n, f"{end} bytes for marker 0x{marker:02X} at byte {pos - 2}")
        if marker == 0xDA:
            if sof is None:
                raise _bad("JPEG", f"scan (SOS) at byte {pos - 2} before any frame header (SOF)")
            scan_at = pos - 2
            break
        if marker in _SOF_DECODABLE or marker in _SOF_HIERARCHICAL:
            if sof is not None:
                raise _bad("JPEG", f"second frame header (SOF) at byte {pos - 2}")
            if marker in _SOF_HIERARCHICAL:
                raise UnsupportedImage(f"JPEG uses hierarchical coding (SOF marker 0x{marker:02X}), which the "
                                       "decoder cannot read: re-encode as baseline or progressive JPEG")
            if length < 8:
                raise _bad("JPEG", f"frame header (SOF) at byte {pos - 2} has length {length}")
            precision, height, width, ncomp = struct.unpack_from(">BHHB", d, pos + 2)
            if length != 8 + 3 * ncomp:
                raise _bad("JPEG", f"frame header (SOF) length {length} does not fit {ncomp} components")
            if width == 0 or height == 0 or ncomp == 0:
                raise _bad("JPEG", f"frame header declares {width}x{height} with {ncomp} components "
                                   "(a height given later by a DNL marker is not supported)")
            if not 2 <= precision <= 16:
                raise _bad("JPEG", f"frame header declares {precision}-bit samples")
            for i in range(ncomp):
                sampling = d[pos + 9 + 3 * i]
                if not (1 <= sampling >> 4 <= 4 and 1 <= sampling & 15 <= 4):
                    raise _bad("JPEG", f"component {i} has sampling factors {sampling >> 4}x{sampling & 15}")
            sof = (marker, precision, height, width, ncomp)
        elif marker == 0xEE and length >= 14 and d[pos + 2:pos + 7] == b"Adobe":
            adobe_transform = d[pos + 13]  # APP14: 0 = RGB/CMYK as is, 1 = YCbCr, 2 = YCCK
        pos = end
    else:
        raise _bad("JPEG", f"no scan (SOS) within the first {_JPEG_MAX_STEPS} markers")
    sof_marker, precision, height, width, ncomp = sof
    if ncomp == 4:
        color = "ycck" if adobe_transform == 2 else "cmyk"
    else:
        color = {1: "gray", 3: "rgb"}.get(ncomp, "other")
    return ImageInfo("jpeg", width, height, ncomp, max(precision, 8), color, precision * ncomp,
                     data_at=scan_at, jpeg_sof=sof_marker)


# Past a scan, 0xFF followed by anything but 00 (stuffing), D0-D7 (RSTn, inside a scan) or FF (fill): in
# entropy-coded data each match is a real marker, since an encoder stuffs every 0xFF it codes. Segments
# between scans (tables, comments) are skipped by their length, not searched.
_NEXT_MARKER = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")
_PROGRESSIVE_SOF = frozenset({0xC2, 0xCA})
_HUFFMAN_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3})
# A complete Huffman-coded JPEG spends at least one bit on every 8x8 block of its full-resolution component
# (the DC code of a progressive first scan; two bits in a sequential scan): pixels / 512 bytes. A flat gray
# 6000x6000 at quality 1 takes 141 101 bytes progressive, 140 785 baseline (255 pixels per byte); refused
# below a quarter of the floor. Arithmetic coding (SOF9/SOF10) has no such floor and is not checked.
_JPEG_MAX_PIXELS_PER_BYTE = 2048


def check_scans(data: bytes, info: ImageInfo, max_jpeg_scans: int) -> None:
    """A JPEG's coded data, for ``headers.check_coded_data``: at most ``max_jpeg_scans`` scans
    (``DecodeBomb``), and Huffman-coded data of at least 1 byte per 2048 pixels (``TruncatedImage``).

    A sequential JPEG whose first scan holds every component has one scan (libjpeg refuses a second):
    ending in EOI is all there is to check, in constant time. Other JPEGs (progressive, or one scan per
    component) are walked marker by marker from the first scan: a regex search through each scan's
    entropy-coded data (~0.4 ns a byte), segments skipped by their length, a few steps per scan and at most
    2000 + 3 x max_jpeg_scans of them, so a value full of markers costs no more than that."""
    d = data if isinstance(data, bytes) else bytes(data)
    n, first = len(d), info.data_at
    every_component = first + 4 < n and d[first + 4] == info.channels  # Ns of the first SOS
    if info.jpeg_sof not in _PROGRESSIVE_SOF and every_component and d.endswith(b"\xff\xd9"):
        end = n - 2
    else:
        end = _scans_end(d, info, max_jpeg_scans)
    coded = end - first
    if info.jpeg_sof in _HUFFMAN_SOF and coded * _JPEG_MAX_PIXELS_PER_BYTE < info.pixels:
        raise TruncatedImage(f"JPEG {info.width}x{info.height} has {coded} bytes of scan data for "
                             f"{info.pixels} pixels; a complete image needs at least {info.pixels // 512} "
                             "(a bit per 8x8 block): the image data was cut short, or the header "
                             "declares a size the data does not hold")


def _scans_end(d: bytes, info: ImageInfo, max_scans: int) -> int:
    """Walk the markers from the first scan on: the offset of the EOI marker that ends the last scan, or
    the end of the data when it has none."""
    n = len(d)
    where = f"JPEG {info.width}x{info.height}"
    pos, scans = info.data_at, 0
    for _ in range(_JPEG_MAX_STEPS + 3 * max_scans):  # real files: a table or two per scan
        found = _NEXT_MARKER.search(d, pos)
        if found is None:
            return n  # no EOI: cut short. OpenCV refuses that (undecodable_image), after fewer scans than this
        at = found.start()
        marker, pos = d[at + 1], at + 2
        if marker == 0xD9:
            return at
        if marker == 0x01:
            continue  # TEM: no length
        if marker == 0xD8:
            raise _bad("JPEG", f"second start of image (SOI) at byte {at}, after scan {scans}")
        if pos + 2 > n or pos + ((d[pos] << 8) | d[pos + 1]) > n:
            return n  # cut short inside a segment: OpenCV's verdict too
        length = (d[pos] << 8) | d[pos + 1]
        if length < 2:
            raise _bad("JPEG", f"marker 0x{marker:02X} at byte {at} has length {length}")
        if marker == 0xDA:
            scans += 1
            if scans > max_scans:
                raise DecodeBomb(f"{where} has more than max_jpeg_scans={max_scans} scans (the next at byte "
                                 f"{at}); each one costs the decoder a pass over the whole image: re-encode "
                                 "it (baseline, or progressive with the encoder's default scans), or raise "
                                 "WORKER_MAX_JPEG_SCANS")
        pos += length
    raise DecodeBomb(f"{where} has more than {_JPEG_MAX_STEPS + 3 * max_scans} markers after its first scan; "
                     "no encoder writes that many: re-encode it")

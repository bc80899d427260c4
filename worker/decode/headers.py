"""What an encoded image is, read from its header alone: format, size, channels, sample depth, colour model.

Runs once per message before any pixel is decoded, so a decompression bomb (a few hundred bytes declaring
100000x100000 pixels) is refused by ``check_limits`` without allocating anything. Only headers are read:
JPEG markers up to the first scan, the PNG IHDR chunk, the WebP RIFF header and first chunk, the BMP info
header, the first TIFF IFD. A header the decoder would reject or that contradicts itself raises
``UndecodableImage``; a format or sample layout the worker does not take raises ``UnsupportedImage``.
Whatever the bytes, the only exceptions that leave ``sniff`` are ``PoisonMessage`` subclasses.

``check_coded_data`` then looks past the header without decoding: it walks a JPEG's markers from the first
scan to the end-of-image marker (counting scans: a scan of 80 bytes can cost the decoder a pass over every
block, ``DecodeBomb``) and refuses coded data too short for the declared pixels (``TruncatedImage``), which
OpenCV would otherwise decode into a gray fill.
"""

from __future__ import annotations

import struct
import zlib

from worker.decode import jpeg_markers
from worker.decode.imageinfo import COLORS, FORMATS, ImageInfo
from worker.decode.imageinfo import corrupt_header as _bad
from worker.decode.imageinfo import truncated_header as _truncated
from worker.errors import EmptyValue, TooLarge, TruncatedImage, UnsupportedImage

_SEND = "send JPEG, PNG, WebP, BMP or TIFF"
# Other formats OpenCV could decode are refused on purpose: name them so the producer knows what it sent.
_KNOWN_OTHERS = ((b"GIF8", "GIF"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"),
                 (b"P1", "PNM"), (b"P2", "PNM"), (b"P3", "PNM"), (b"P4", "PNM"), (b"P5", "PNM"), (b"P6", "PNM"),
                 (b"%PDF", "PDF"), (b"\x1f\x8b", "gzip"), (b"PK\x03\x04", "zip"), (b"{", "JSON text"),
                 (b"<", "XML/HTML/SVG text"), (b"\x76\x2f\x31\x01", "OpenEXR"), (b"#?RADIANCE", "Radiance HDR"))

__all__ = ["COLORS", "DEFAULT_MAX_JPEG_SCANS", "FORMATS", "ImageInfo", "check_coded_data", "check_limits",
           "check_size", "check_supported", "sniff"]


def check_size(n_bytes: int, max_bytes: int) -> None:
    if n_bytes > max_bytes:
        raise TooLarge(f"message value is {n_bytes} bytes, over max_bytes={max_bytes}: "
                       "send a smaller (re-encoded or downscaled) image, or raise WORKER_MAX_BYTES")


def check_limits(info: ImageInfo, max_pixels: int) -> None:
    if info.pixels > max_pixels:
        raise TooLarge(f"image {info.width}x{info.height} exceeds max_pixels={max_pixels} "
                       f"({info.pixels} pixels, {info.format} header): downscale before sending, "
                       "or raise WORKER_MAX_PIXELS")


def check_supported(info: ImageInfo) -> None:
    """Refuse what would not decode to 8-bit gray, BGR or BGRA. 16-bit PNG and TIFF are taken: the decoder
    reads them as uint16 and keeps the high byte. 12- and 16-bit JPEG are not: OpenCV's JPEG reader gives
    nothing for a valid 12-bit file (tests/test_imageinfo.py), nvJPEG is not asked."""
    if info.bit_depth != 8 and not (info.bit_depth == 16 and info.format in ("png", "tiff")):
        raise UnsupportedImage(f"{info.format} image {info.width}x{info.height} has {info.bit_depth}-bit "
                               "samples; supported: 8 bits per channel, and 16 for PNG and TIFF: convert to 8 "
                               "bits per channel")
    if info.color in ("cmyk", "ycck"):
        raise UnsupportedImage(f"{info.format} image {info.width}x{info.height} is {info.color.upper()}; "
                               "only gray, RGB and RGBA are supported: convert to RGB before sending")


def sniff(data: bytes | bytearray | memoryview | None) -> ImageInfo:
    """Identify ``data`` by its magic bytes and read its header. Raises PoisonMessage subclasses only."""
    if not data:
        raise EmptyValue("empty message value (0 bytes): nothing to decode; the producer sent no image")
    if not isinstance(data, bytes):
        data = bytes(data)
    if data[:2] == b"\xff\xd8":
        return jpeg_markers.header(data)
    if data[:4] == b"\x89PNG":
        return _png(data)
    if data[:4] == b"RIFF":
        return _webp(data)
    if data[:2] == b"BM":
        return _bmp(data)
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return _tiff(data, big=False)
    if data[:4] in (b"II+\x00", b"MM\x00+"):
        return _tiff(data, big=True)
    guess = next((name for magic, name in _KNOWN_OTHERS if data.startswith(magic)), "unknown format")
    raise UnsupportedImage(f"unsupported image format: first bytes {data[:8].hex()} ({guess}, "
                           f"{len(data)} bytes): {_SEND}")


# --- past the header -------------------------------------------------------------------------------------
DEFAULT_MAX_JPEG_SCANS = 100  # the max_jpeg_scans setting's default (why 100: docs/guarantees.md)
# Deflate codes at most 258 bytes with 2 bits (a one-bit length code and a one-bit distance code).
_DEFLATE_MAX_RATIO = 1032


def check_coded_data(data: bytes, info: ImageInfo, max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS) -> None:
    """The coded data behind a header, checked without decoding it. JPEG: at most ``max_jpeg_scans``
    scans (``DecodeBomb``), and Huffman-coded data of at least 1 byte per 2048 pixels (``TruncatedImage``:
    OpenCV would fill the missing blocks with gray). PNG: at least 1 byte per 1032 bytes of pixel rows,
    deflate's ceiling. Data cut short of its end marker is left to the decoder, which refuses it (OpenCV
    5 refuses a JPEG without EOI and a PNG without its last IDAT bytes: ``undecodable_image``).

    Runs on the event loop: the JPEG walk is bounded (worker.decode.jpeg_markers.check_scans says how)."""
    if info.format == "jpeg" and info.data_at:
        jpeg_markers.check_scans(data, info, max_jpeg_scans)
    elif info.format == "png":
        raw = info.pixels * info.bits_per_pixel // 8
        if len(data) * _DEFLATE_MAX_RATIO < raw:
            raise TruncatedImage(f"PNG {info.width}x{info.height} is {len(data)} bytes; its {raw} bytes of "
                                 f"pixels need at least {raw // _DEFLATE_MAX_RATIO} (deflate compresses at most "
                                 "1032:1): the value was cut short or the header's size is wrong")


# --- PNG -----------------------------------------------------------------------------------------------
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_PNG_COLORS = {0: ("gray", 1), 2: ("rgb", 3), 3: ("palette", 1), 4: ("gray_alpha", 2), 6: ("rgba", 4)}


def _png(d: bytes) -> ImageInfo:
    n = len(d)
    if n < 8:
        raise _truncated("PNG", n, "8 bytes of signature")
    if d[:8] != _PNG_SIGNATURE:
        raise _bad("PNG", f"signature is {d[:8].hex()}, not 89504e470d0a1a0a (was it sent through a text "
                          "channel that rewrote line endings?)")
    if n < 33:
        raise _truncated("PNG", n, "33 bytes: signature and IHDR chunk")
    length, ctype = struct.unpack_from(">I4s", d, 8)
    if ctype != b"IHDR" or length != 13:
        raise _bad("PNG", f"first chunk is {ctype!r} of {length} bytes, not IHDR of 13")
    width, height, depth, ctype_code, compression, filtering, interlace, crc = struct.unpack_from(
        ">IIBBBBBI", d, 16)
    if zlib.crc32(d[12:29]) != crc:
        raise _bad("PNG", f"IHDR CRC is 0x{crc:08x}, computed 0x{zlib.crc32(d[12:29]):08x}")
    if not (0 < width < 1 << 31 and 0 < height < 1 << 31):
        raise _bad("PNG", f"IHDR declares {width}x{height}")
    if ctype_code not in _PNG_DEPTHS or depth not in _PNG_DEPTHS[ctype_code]:
        raise _bad("PNG", f"IHDR declares colour type {ctype_code} with bit depth {depth}")
    if compression or filtering or interlace > 1:
        raise _bad("PNG", f"IHDR declares compression {compression}, filter {filtering}, interlace {interlace}")
    color, channels = _PNG_COLORS[ctype_code]
    return ImageInfo("png", width, height, channels, max(depth, 8), color, depth * channels)


# --- WebP ----------------------------------------------------------------------------------------------
def _webp(d: bytes) -> ImageInfo:
    n = len(d)
    if n < 12:
        raise _truncated("RIFF", n, "12 bytes: 'RIFF', size, form type")
    if d[8:12] != b"WEBP":
        raise UnsupportedImage(f"RIFF container of type {d[8:12]!r} is not WebP (first bytes "
                               f"{d[:8].hex()}): {_SEND}")
    riff_size = struct.unpack_from("<I", d, 4)[0]
    if riff_size < 12:
        raise _bad("WebP", f"RIFF size {riff_size} is too small")
    if riff_size > n - 8:  # libwebp refuses a truncated RIFF when it has all the data there is
        raise _truncated("WebP", n, f"{riff_size + 8} bytes declared by the RIFF header")
    if n < 30:
        raise _truncated("WebP", n, "30 bytes: RIFF header and first chunk header")
    fourcc, chunk_size = struct.unpack_from("<4sI", d, 12)
    if fourcc == b"VP8 ":
        tag = d[20] | d[21] << 8 | d[22] << 16
        if tag & 1 or not tag & 0x10 or (tag >> 1) & 7 > 3:
            raise _bad("WebP", f"VP8 frame tag 0x{tag:06x} is not a shown key frame of a known version")
        if tag >> 5 >= chunk_size:
            raise _bad("WebP", f"VP8 first partition of {tag >> 5} bytes overruns its {chunk_size}-byte chunk")
        if d[23:26] != b"\x9d\x01\x2a":
            raise _bad("WebP", f"VP8 start code is {d[23:26].hex()}, not 9d012a")
        width, height = (v & 0x3FFF for v in struct.unpack_from("<HH", d, 26))
        if not width or not height:
            raise _bad("WebP", f"VP8 frame declares {width}x{height}")
        return ImageInfo("webp", width, height, 3, 8, "rgb", 24)
    if fourcc == b"VP8L":
        if d[20] != 0x2F:
            raise _bad("WebP", f"VP8L signature byte is 0x{d[20]:02x}, not 0x2f")
        bits = struct.unpack_from("<I", d, 21)[0]
        if bits >> 29:
            raise _bad("WebP", f"VP8L version {bits >> 29} is not 0")
        alpha = bits >> 28 & 1
        return ImageInfo("webp", (bits & 0x3FFF) + 1, (bits >> 14 & 0x3FFF) + 1, 3 + alpha, 8,
                         "rgba" if alpha else "rgb", 24 + 8 * alpha)
    if fourcc == b"VP8X":
        if chunk_size != 10:
            raise _bad("WebP", f"VP8X chunk is {chunk_size} bytes, not 10")
        flags = d[20]
        width = 1 + int.from_bytes(d[24:27], "little")
        height = 1 + int.from_bytes(d[27:30], "little")
        if width * height >= 1 << 32:
            raise _bad("WebP", f"VP8X canvas {width}x{height} is over 2**32 pixels")
        alpha = flags >> 4 & 1
        return ImageInfo("webp", width, height, 3 + alpha, 8, "rgba" if alpha else "rgb", 24 + 8 * alpha)
    raise _bad("WebP", f"first chunk is {fourcc!r}, not 'VP8 ', 'VP8L' or 'VP8X'")


# --- BMP -----------------------------------------------------------------------------------------------
# compression: 0 none, 1 RLE8, 2 RLE4, 3 bit fields; what OpenCV's reader takes for each bit count
_BMP_OK = {(1, 0), (4, 0), (8, 0), (16, 0), (24, 0), (32, 0), (16, 3), (32, 3), (8, 1), (4, 2)}


def _bmp(d: bytes) -> ImageInfo:
    n = len(d)
    if n < 18:
        raise _truncated("BMP", n, "18 bytes: file header and info header size")
    dib = struct.unpack_from("<I", d, 14)[0]
    if dib < 40:
        # 12 is the OS/2 1.x core header: OpenCV 5 decodes a 24-bit one as a single gray channel, wrongly.
        raise UnsupportedImage(f"BMP info header of {dib} bytes (OS/2 or unknown variant) is not supported; "
                               f"BITMAPINFOHEADER (40 bytes) and later are: {_SEND}")
    if n < 14 + dib:
        raise _truncated("BMP", n, f"{14 + dib} bytes: file header and {dib}-byte info header")
    width, height, _, bpp, compression = struct.unpack_from("<iiHHI", d, 18)
    alpha_mask = struct.unpack_from("<I", d, 66)[0] if dib >= 56 and compression == 3 else 0
    if width <= 0 or height == 0:
        raise _bad("BMP", f"info header declares width {width} and height {height}")
    if compression in (4, 5):
        raise UnsupportedImage(f"BMP wraps an embedded {'JPEG' if compression == 4 else 'PNG'} "
                               f"(compression {compression}): send the JPEG or PNG itself")
    if (bpp, compression) not in _BMP_OK:
        raise _bad("BMP", f"{bpp} bits per pixel with compression {compression}")
    height = abs(height)  # negative: rows stored top-down
    if bpp <= 8:
        return ImageInfo("bmp", width, height, 1, 8, "palette", bpp)
    if alpha_mask:
        return ImageInfo("bmp", width, height, 4, 8, "rgba", bpp)
    return ImageInfo("bmp", width, height, 3, 8, "rgb", bpp)  # a 32-bit pixel without alpha mask: padding


# --- TIFF ----------------------------------------------------------------------------------------------
_TIFF_MAX_ENTRIES = 1000
_TIFF_TYPE_SIZE = {1: 1, 3: 2, 4: 4, 16: 8}  # BYTE, SHORT, LONG, LONG8 (BigTIFF)
_TIFF_TAGS = {256: "ImageWidth", 257: "ImageLength", 258: "BitsPerSample", 262: "PhotometricInterpretation",
              277: "SamplesPerPixel", 339: "SampleFormat"}


def _tiff(d: bytes, big: bool) -> ImageInfo:
    n = len(d)
    e = "<" if d[:2] == b"II" else ">"
    name = "BigTIFF" if big else "TIFF"
    # (offset format, IFD entry-count format, entry size, bytes of the inline value field)
    off_fmt, cnt_fmt, entry, inline = ("Q", "Q", 20, 8) if big else ("I", "H", 12, 4)
    header = 16 if big else 8
    if n < header:
        raise _truncated(name, n, f"{header} bytes of file header")
    if big:
        offsize, zero = struct.unpack_from(e + "HH", d, 4)
        if offsize != 8 or zero:
            raise _bad(name, f"offset size {offsize} (must be 8)")
    ifd = struct.unpack_from(e + off_fmt, d, header - inline)[0]
    cnt_size = struct.calcsize(cnt_fmt)
    if ifd < header or ifd + cnt_size > n:
        raise _bad(name, f"first IFD offset {ifd} is outside the {n} bytes of data (truncated?)")
    count = struct.unpack_from(e + cnt_fmt, d, ifd)[0]
    if not 0 < count <= _TIFF_MAX_ENTRIES:  # real IFDs have tens; 65535 would cost 50 ms of GIL here
        raise _bad(name, f"first IFD at byte {ifd} has {count} entries (accepted: 1 to {_TIFF_MAX_ENTRIES})")
    if ifd + cnt_size + entry * count > n:
        raise _truncated(name, n, f"{ifd + cnt_size + entry * count} bytes for the {count} entries of the IFD")
    tags: dict[int, tuple[int, ...]] = {}
    for at in range(ifd + cnt_size, ifd + cnt_size + entry * count, entry):
        tag, typ = struct.unpack_from(e + "HH", d, at)
        if tag not in _TIFF_TAGS:
            continue
        size = _TIFF_TYPE_SIZE.get(typ)
        if size is None or (size == 8 and not big):
            raise _bad(name, f"{_TIFF_TAGS[tag]} ({tag}) has field type {typ}, not an unsigned integer")
        nvalues = struct.unpack_from(e + off_fmt, d, at + 4)[0]
        if nvalues == 0:
            raise _bad(name, f"{_TIFF_TAGS[tag]} ({tag}) has no values")
        where = at + 4 + inline
        if size * nvalues > inline:
            where = struct.unpack_from(e + off_fmt, d, where)[0]
            if where + size * nvalues > n:
                raise _bad(name, f"values of {_TIFF_TAGS[tag]} ({tag}) at byte {where} lie outside the {n} "
                                 "bytes of data (truncated?)")
        fmt = e + {1: "B", 2: "H", 4: "I", 8: "Q"}[size] * min(nvalues, 8)  # 8 values tell all we need
        tags[tag] = struct.unpack_from(fmt, d, where)
    for tag in (256, 257):
        if tag not in tags:
            raise _bad(name, f"first IFD has no {_TIFF_TAGS[tag]} ({tag}) tag")
    width, height = tags[256][0], tags[257][0]
    spp = tags.get(277, (1,))[0]
    if width == 0 or height == 0 or spp == 0:
        raise _bad(name, f"first IFD declares {width}x{height} with {spp} samples per pixel")
    bits = tags.get(258, (1,))
    if any(b != bits[0] for b in bits):
        raise UnsupportedImage(f"{name} has different bit depths per sample {bits}: convert to 8-bit")
    sample_format = tags.get(339, (1,))[0]
    if sample_format != 1:
        kind = {2: "signed integers", 3: "floating point"}.get(sample_format, f"SampleFormat {sample_format}")
        raise UnsupportedImage(f"{name} samples are {kind} ({bits[0]}-bit); only unsigned 8-bit is "
                               "supported: convert before sending")
    photometric = tags.get(262, (1 if spp < 3 else 2,))[0]
    if photometric in (0, 1):
        color = {1: "gray", 2: "gray_alpha"}.get(spp, "other")
    elif photometric in (2, 6):  # RGB, or YCbCr (the decoder converts it to RGB)
        color = {3: "rgb", 4: "rgba"}.get(spp, "other")
    else:
        color = {3: "palette", 5: "cmyk"}.get(photometric, "other")
    return ImageInfo("tiff", width, height, spp, max(bits[0], 8), color, bits[0] * spp)

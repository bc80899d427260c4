"""Deterministic inputs for the decode stage's poison guard (a helper module for tests, not a test file).

- ``malformed_corpus()``: (name, bytes, reason) for values the decode path must refuse, with the reason code
  it really gives. Header-level faults are labelled by construction; faults in the image data (a PNG IDAT,
  JPEG entropy data, BMP pixels) are labelled by what ``cv2.imdecode`` does with them here: a case OpenCV
  decodes anyway is not poison, and goes to ``damaged_but_decodable()`` instead.
- ``tiny_valid_images()``: 1x1 images of every format and mode. Valid, not malformed.
- ``good_images(n, seed)``: valid images of varied sizes, formats and modes; ``good_image_specs`` adds what
  ``sniff`` must read from each.
- ``decode_like_worker``: the decode path as ``worker.decode.message`` documents it (size, header, limits,
  depth and colour, coded data against the header, OpenCV, 16-bit samples to their high byte, decoded
  dtype and size), so the corpus is checked before and besides it.
- ``handmade_jpeg``: a flat JPEG built marker by marker (any precision, size, components and scans), and
  ``jpeg_with_scans``: a real progressive JPEG with extra scans that each cost the decoder a pass.

Case names are ``group/detail``; groups: empty, oversized, unknown, truncated, huge, unsupported, corrupt,
bomb.
"""

from __future__ import annotations

import functools
import io
import math
import struct
import zlib
from collections.abc import Callable

import cv2
import numpy as np
from PIL import Image

from worker.errors import PoisonMessage, UndecodableImage, UnsupportedImage
from worker.decode.headers import check_coded_data, check_limits, check_size, check_supported, sniff

MAX_BYTES = 1 << 20  # what the corpus assumes unless told otherwise (the worker's default is 20 MB)
MAX_PIXELS = 40_000_000  # the worker's default
EMPTY, TOO_LARGE = "empty_value", "too_large"
UNSUPPORTED, UNDECODABLE = "unsupported_image", "undecodable_image"
TRUNCATED, BOMB = "truncated_image", "decode_bomb"
Case = tuple[str, bytes, str]


# --- the decode path ---------------------------------------------------------------------------------
def decode_like_worker(data: bytes, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    check_size(len(data), max_bytes)
    info = sniff(data)
    check_limits(info, max_pixels)
    check_supported(info)
    check_coded_data(data, info)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise UndecodableImage(f"OpenCV failed: {exc}") from None
    if image is None:
        raise UndecodableImage(f"{info.format} {info.width}x{info.height}: image data could not be decoded")
    if image.dtype == np.uint16 and info.bit_depth == 16:
        image = (image // 256).astype(np.uint8)  # the high byte of each sample
    if image.dtype != np.uint8:
        raise UnsupportedImage(f"{info.format} decoded to {image.dtype}")
    if image.shape[:2] != (info.height, info.width):
        raise UndecodableImage(f"header says {info.width}x{info.height}, "
                               f"decoded {image.shape[1]}x{image.shape[0]}")
    return image


def _verdict(data: bytes) -> str | None:
    """Reason code the decode path gives, or None when it decodes the value."""
    try:
        decode_like_worker(data)
    except PoisonMessage as exc:
        return exc.reason
    return None


# --- base images -------------------------------------------------------------------------------------
def _pixels(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    """Smooth random content: compresses like a photo, unlike white noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, h // 4), max(1, w // 4), channels), np.uint8)
    out = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    return out.reshape(h, w, channels) if channels > 1 else out.reshape(h, w)


def _cv(ext: str, arr: np.ndarray, *params: int) -> bytes:
    ok, buf = cv2.imencode(ext, arr, list(params))
    assert ok, ext
    return buf.tobytes()


def _pil(arr: np.ndarray, mode: str, fmt: str, **kw) -> bytes:
    image = Image.fromarray(arr[..., ::-1] if arr.ndim == 3 else arr)  # BGR(A) arrays, as OpenCV has them
    if arr.ndim == 3 and arr.shape[2] == 4:
        image = Image.fromarray(arr[..., [2, 1, 0, 3]], "RGBA")
    out = io.BytesIO()
    image.convert(mode).save(out, fmt, **kw)
    return out.getvalue()


def bmp_bytes(bgr: np.ndarray, top_down: bool = False) -> bytes:
    """A 24-bit BI_RGB BMP, bottom-up (the usual) or top-down (negative height), which Pillow cannot write."""
    h, w, _ = bgr.shape
    stride = (w * 3 + 3) & ~3
    rows = bgr if top_down else bgr[::-1]
    pixels = b"".join(row.tobytes().ljust(stride, b"\0") for row in rows)
    dib = struct.pack("<IiiHHIIiiII", 40, w, -h if top_down else h, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    return struct.pack("<2sIHHI", b"BM", 54 + len(pixels), 0, 0, 54) + dib + pixels


def tiff_bytes(arr: np.ndarray, endian: str = "<", photometric: int | None = None, long_dims: bool = False,
               width: int | None = None, height: int | None = None, extra: dict | None = None) -> bytes:
    """An uncompressed single-strip TIFF written by hand (big-endian, SHORT or LONG sizes, odd tags)."""
    h, w = arr.shape[:2]
    spp = 1 if arr.ndim == 2 else arr.shape[2]
    bits = arr.dtype.itemsize * 8
    if spp >= 3:
        arr = arr[..., [2, 1, 0, *range(3, spp)]]  # BGR(A) to RGB(A)
    payload = arr.astype(arr.dtype.newbyteorder(endian)).tobytes()
    dim_type = 4 if long_dims else 3
    tags: dict[int, tuple[int, list[int]]] = {
        256: (dim_type, [w if width is None else width]), 257: (dim_type, [h if height is None else height]),
        258: (3, [bits] * spp), 259: (3, [1]), 262: (3, [photometric if photometric is not None else
                                                          (1 if spp < 3 else 2)]),
        273: (4, [0]), 277: (3, [spp]), 278: (4, [h]), 279: (4, [len(payload)]), 284: (3, [1]),
    }
    if spp in (2, 4) and photometric in (None, 1, 2):
        tags[338] = (3, [2])  # unassociated alpha
    for tag, value in (extra or {}).items():
        if value is None:
            tags.pop(tag, None)
        else:
            tags[tag] = value
    count = len(tags)
    ifd_end = 8 + 2 + 12 * count + 4
    outside = b""
    entries = []
    for tag in sorted(tags):
        typ, values = tags[tag]
        raw = bytes(values) if typ == 2 else struct.pack(endian + {1: "B", 3: "H", 4: "I"}[typ] * len(values),
                                                         *values)
        entries.append((tag, typ, len(values), raw))
        if len(raw) > 4:
            outside += raw + b"\0" * (len(raw) & 1)
    strip_at = ifd_end + len(outside)
    ifd = struct.pack(endian + "H", count)
    out_at = ifd_end
    for tag, typ, n, raw in entries:
        if tag == 273:
            raw = struct.pack(endian + "I", strip_at)
        if len(raw) > 4:
            field = struct.pack(endian + "I", out_at)
            out_at += len(raw) + (len(raw) & 1)
        else:
            field = raw.ljust(4, b"\0")
        ifd += struct.pack(endian + "HHI", tag, typ, n) + field
    head = (b"II*\0" if endian == "<" else b"MM\0*") + struct.pack(endian + "I", 8)
    return head + ifd + b"\0\0\0\0" + outside + payload


@functools.cache
def _bases() -> dict[str, bytes]:
    rgb = _pixels(32, 48, 1)
    rgba = np.dstack([rgb, _pixels(32, 48, 2, 1)])
    return {
        "jpeg-baseline": _cv(".jpg", rgb, cv2.IMWRITE_JPEG_QUALITY, 90),
        "jpeg-progressive": _pil(rgb, "RGB", "JPEG", progressive=True),
        "jpeg-gray": _cv(".jpg", rgb[..., 0]),
        "png-rgb": _cv(".png", rgb),
        "png-palette": _pil(rgb, "P", "PNG"),
        "png-rgba": _cv(".png", rgba),
        "webp-lossy": _pil(rgb, "RGB", "WEBP", quality=80),
        "webp-lossless": _cv(".webp", rgb),  # OpenCV's default quality (100) means lossless
        "webp-alpha": _pil(rgba, "RGBA", "WEBP", quality=80),  # VP8X + ALPH + VP8
        "bmp-rgb": _cv(".bmp", rgb),
        "bmp-palette": _pil(rgb, "P", "BMP"),
        "tiff-opencv": _cv(".tiff", rgb),  # IFD after the pixels
        "tiff-pillow": _pil(rgb, "RGB", "TIFF"),  # IFD first
        "tiff-be": tiff_bytes(rgb, ">"),
    }


# --- byte surgery --------------------------------------------------------------------------------------
def _put(data: bytes, at: int, raw: bytes) -> bytes:
    return data[:at] + raw + data[at + len(raw):]


def _png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def _png_chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    chunks, at = [], 8
    while at < len(png):
        length, ctype = struct.unpack_from(">I4s", png, at)
        chunks.append((ctype, png[at + 8:at + 8 + length]))
        at += 12 + length
    return chunks


def _png_build(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(_png_chunk(t, b) for t, b in chunks)


def _png_ihdr(png: bytes, width: int | None = None, height: int | None = None, depth: int | None = None,
              ctype: int | None = None, tail: bytes | None = None) -> bytes:
    """Rewrite IHDR fields and fix its CRC, so only the field itself is wrong."""
    w, h, d, c = struct.unpack_from(">IIBB", png, 16)
    body = struct.pack(">IIBB", w if width is None else width, h if height is None else height,
                       d if depth is None else depth, c if ctype is None else ctype) + (tail or png[26:29])
    return png[:8] + _png_chunk(b"IHDR", body) + png[33:]


def _jpeg_segments(jpg: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of every segment from SOI through SOS."""
    out, at = [(0xD8, 0, 2)], 2
    while True:
        marker, length = jpg[at + 1], struct.unpack_from(">H", jpg, at + 2)[0]
        out.append((marker, at, at + 2 + length))
        if marker == 0xDA:
            return out
        at += 2 + length


def _jpeg_sof(jpg: bytes) -> int:
    return next(start for m, start, _ in _jpeg_segments(jpg) if m in (0xC0, 0xC1, 0xC2))


def _riff(body: bytes) -> bytes:
    return b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + body


def _vp8x(width: int, height: int, flags: int = 0, size: int = 10) -> bytes:
    return b"VP8X" + struct.pack("<I", size) + bytes([flags, 0, 0, 0]) + (width - 1).to_bytes(3, "little") \
        + (height - 1).to_bytes(3, "little")


def _cuts(lo: int, hi: int, k: int) -> list[int]:
    """k cut points spread over [lo, hi), always including both ends."""
    if hi <= lo:
        return []
    return sorted({lo, hi - 1, *(lo + (hi - lo) * i // k for i in range(k))})


def _header_end(data: bytes) -> int:
    """Shortest prefix of ``data`` that ``sniff`` accepts: cuts before it fail in the header."""
    for end in range(1, len(data) + 1):
        try:
            sniff(data[:end])
            return end
        except PoisonMessage:
            continue
    return len(data) + 1


# --- the corpus ------------------------------------------------------------------------------------------
def _truncations(collect: Callable[[str, bytes, str | None], None]) -> None:
    for name, data in _bases().items():
        magic = 4 if name.startswith(("png", "tiff", "webp")) else 2  # shorter prefixes are not identifiable
        end = _header_end(data)
        extra = []
        if name.startswith("jpeg"):  # around every marker: inside the marker, its length, its payload
            extra = [start + d for _, start, _ in _jpeg_segments(data) for d in (0, 1, 3)]
        header_cuts = sorted({c for c in _cuts(magic, min(end, len(data)), 10) + extra if magic <= c < end})
        for cut in header_cuts:
            collect(f"truncated/{name}@{cut}", data[:cut], UNDECODABLE)
        for cut in _cuts(end, len(data), 8):
            collect(f"truncated/{name}@{cut}", data[:cut], None)  # in the image data: OpenCV decides


def _huge(collect: Callable[[str, bytes, str | None], None], max_pixels: int) -> None:
    b = _bases()
    png, jpg = b["png-rgb"], b["jpeg-baseline"]
    over = max_pixels + 1
    for w, h in ((100000, 100000), (over, 1), (1, over), (65536, 65536)):
        collect(f"huge/png-{w}x{h}", _png_ihdr(png, w, h), TOO_LARGE)
    collect("huge/png-16bit-100000x100000", _png_ihdr(_cv(".png", _pixels(8, 8, 3).astype(np.uint16)),
                                                      100000, 100000), TOO_LARGE)  # limits come first
    sof = _jpeg_sof(jpg)
    for w, h in ((65000, 65000), (65535, 65535), (65535, 1000)):
        collect(f"huge/jpeg-{w}x{h}", _put(jpg, sof + 5, struct.pack(">HH", h, w)), TOO_LARGE)
    prog = b["jpeg-progressive"]
    collect("huge/jpeg-progressive-65000x65000",
            _put(prog, _jpeg_sof(prog) + 5, struct.pack(">HH", 65000, 65000)), TOO_LARGE)
    bmp = b["bmp-rgb"]
    for w, h in ((100000, 100000), (100000, -100000), (2**31 - 1, 2**31 - 1), (over, 1)):
        collect(f"huge/bmp-{w}x{h}", _put(bmp, 18, struct.pack("<ii", w, h)), TOO_LARGE)
    rgb = _pixels(4, 4, 4)
    collect("huge/tiff-long-100000x100000", tiff_bytes(rgb, long_dims=True, width=100000, height=100000),
            TOO_LARGE)
    collect("huge/tiff-short-65535x65535", tiff_bytes(rgb, width=65535, height=65535), TOO_LARGE)
    collect("huge/tiff-be-long-100000x100000", tiff_bytes(rgb, ">", long_dims=True, width=100000,
                                                          height=100000), TOO_LARGE)
    lossy, lossless = b["webp-lossy"], b["webp-lossless"]
    collect("huge/webp-vp8x-60000x60000", _riff(_vp8x(60000, 60000) + lossy[12:]), TOO_LARGE)
    collect("huge/webp-vp8x-16777216x255", _riff(_vp8x(16777216, 255) + lossy[12:]), TOO_LARGE)
    collect("huge/webp-vp8-16383x16383", _put(lossy, 26, struct.pack("<HH", 16383, 16383)), TOO_LARGE)
    bits = struct.unpack_from("<I", lossless, 21)[0] & ~((1 << 28) - 1) | 16383 | 16383 << 14
    collect("huge/webp-vp8l-16384x16384", _put(lossless, 21, struct.pack("<I", bits)), TOO_LARGE)


def _unsupported(collect: Callable[[str, bytes, str | None], None]) -> None:
    rgb = _pixels(24, 40, 5)  # 16-bit PNG and TIFF are decoded (MODES), 12- and 16-bit JPEG are not
    collect("unsupported/tiff-float32", _cv(".tiff", rgb.astype(np.float32)), UNSUPPORTED)
    collect("unsupported/tiff-int32", _pil(rgb[..., 0], "I", "TIFF"), UNSUPPORTED)
    collect("unsupported/tiff-signed-8bit", tiff_bytes(rgb, extra={339: (3, [2, 2, 2])}), UNSUPPORTED)
    collect("unsupported/tiff-mixed-depths", tiff_bytes(rgb, extra={258: (3, [8, 8, 16])}), UNSUPPORTED)
    collect("unsupported/tiff-cmyk", _pil(rgb, "CMYK", "TIFF"), UNSUPPORTED)
    collect("unsupported/tiff-cmyk-handmade", tiff_bytes(np.dstack([rgb, rgb[..., :1]]), photometric=5),
            UNSUPPORTED)
    cmyk = _pil(rgb, "CMYK", "JPEG")
    collect("unsupported/jpeg-cmyk", cmyk, UNSUPPORTED)
    collect("unsupported/jpeg-cmyk-progressive", _pil(rgb, "CMYK", "JPEG", progressive=True), UNSUPPORTED)
    app14 = next(s for m, s, _ in _jpeg_segments(cmyk) if m == 0xEE)
    collect("unsupported/jpeg-ycck", _put(cmyk, app14 + 15, b"\x02"), UNSUPPORTED)
    jpg = _bases()["jpeg-baseline"]
    sof = _jpeg_sof(jpg)
    collect("unsupported/jpeg-12bit", _put(jpg, sof + 4, b"\x0c"), UNSUPPORTED)
    collect("unsupported/jpeg-16bit-lossless", _put(_put(jpg, sof + 1, b"\xc3"), sof + 4, b"\x10"), UNSUPPORTED)
    collect("unsupported/jpeg-12bit-handmade", handmade_jpeg(16, 8, precision=12, sof=0xC1), UNSUPPORTED)
    for marker in (0xC5, 0xCB, 0xCF):
        collect(f"unsupported/jpeg-hierarchical-sof{marker:02x}", _put(jpg, sof + 1, bytes([marker])),
                UNSUPPORTED)
    bmp = _bases()["bmp-rgb"]
    collect("unsupported/bmp-embedded-jpeg", _put(bmp, 30, struct.pack("<I", 4)), UNSUPPORTED)
    collect("unsupported/bmp-embedded-png", _put(bmp, 30, struct.pack("<I", 5)), UNSUPPORTED)
    core = struct.pack("<IHHHH", 12, 1, 1, 1, 24)  # OS/2 1.x: 16-bit width and height
    collect("unsupported/bmp-os2-core-header", b"BM" + struct.pack("<IHHI", 29, 0, 0, 26) + core + b"\0\0\xff",
            UNSUPPORTED)
    collect("unsupported/bmp-header-20-bytes", _put(bmp, 14, struct.pack("<I", 20)), UNSUPPORTED)
    collect("unsupported/riff-wave", b"RIFF" + struct.pack("<I", 36) + b"WAVEfmt " + bytes(28), UNSUPPORTED)


def _unknown(collect: Callable[[str, bytes, str | None], None]) -> None:
    rgb = _pixels(16, 16, 6)
    collect("unknown/gif", _pil(rgb, "P", "GIF"), UNSUPPORTED)  # OpenCV 5 would decode these three
    collect("unknown/ppm", _cv(".ppm", rgb), UNSUPPORTED)
    collect("unknown/jpeg2000", b"\0\0\0\x0cjP  \r\n\x87\n" + _cv(".jp2", _pixels(64, 64, 6))[12:], UNSUPPORTED)
    for name, data in (("pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n"), ("json", b'{"image": 42}'),
                       ("html", b"<!doctype html><title>502 Bad Gateway</title>"), ("text", b"hello world"),
                       ("gzip", b"\x1f\x8b\x08\x00" + bytes(16)),
                       ("zip", b"PK\x03\x04" + bytes(26)), ("utf8-bom", b"\xef\xbb\xbfhello"),
                       ("base64-jpeg", b"/9j/4AAQSkZJRgABAQ"), ("base64-png", b"iVBORw0KGgoAAAANSUhEUg"),
                       ("jpeg-xl", b"\xff\x0a\xfa\x7f"), ("heic", b"\0\0\0\x18ftypheic\0\0\0\0"),
                       ("tiff-magic-3-bytes", b"II*"), ("png-first-3-bytes", b"\x89PN"),
                       ("tiff-bad-version", b"II\x2b\x01" + bytes(12)), ("bm-lowercase", b"bm" + bytes(60))):
        collect(f"unknown/{name}", data, UNSUPPORTED)
    for n in (1, 2, 3, 8, 64, 4096):
        collect(f"unknown/zeros-{n}", bytes(n), UNSUPPORTED)
    for byte in (0x00, 0x42, 0x49, 0x52, 0x89, 0xFF):
        collect(f"unknown/single-byte-{byte:02x}", bytes([byte]), UNSUPPORTED)
    rng = np.random.default_rng(20240605)
    magics = (b"\xff\xd8", b"\x89PNG", b"RIFF", b"BM", b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")
    made = 0
    while made < 24:
        data = rng.integers(0, 256, int(rng.integers(1, 5000)), np.uint8).tobytes()
        if not data.startswith(magics):
            collect(f"unknown/random-{made}-{len(data)}b", data, UNSUPPORTED)
            made += 1


def _corrupt(collect: Callable[[str, bytes, str | None], None], max_pixels: int) -> None:
    b = _bases()
    png = b["png-rgb"]
    bad_crc = bytearray(png)
    bad_crc[29] ^= 0x01
    collect("corrupt/png-ihdr-crc", bytes(bad_crc), UNDECODABLE)
    for w, h in ((0, 32), (48, 0), (0, 0), (2**31, 1), (2**32 - 1, 2**32 - 1)):
        collect(f"corrupt/png-ihdr-{w}x{h}", _png_ihdr(png, w, h), UNDECODABLE)
    for depth, ctype in ((3, 2), (1, 2), (16, 3), (8, 5), (8, 7), (4, 6), (0, 0)):
        collect(f"corrupt/png-ihdr-depth{depth}-type{ctype}", _png_ihdr(png, depth=depth, ctype=ctype),
                UNDECODABLE)
    for tail, what in ((b"\1\0\0", "compression1"), (b"\0\1\0", "filter1"), (b"\0\0\2", "interlace2")):
        collect(f"corrupt/png-ihdr-{what}", _png_ihdr(png, tail=tail), UNDECODABLE)
    chunks = _png_chunks(png)
    collect("corrupt/png-first-chunk-not-ihdr", _png_build([(b"gAMA", b"\0\0\xb1\x8f")] + chunks), UNDECODABLE)
    collect("corrupt/png-ihdr-length-14", png[:8] + _png_chunk(b"IHDR", png[16:29] + b"\0") + png[33:],
            UNDECODABLE)
    collect("corrupt/png-signature-crlf-to-lf", png[:4] + b"\n" + png[6:], UNDECODABLE)
    collect("corrupt/png-signature-lf-to-crlf", png[:6] + b"\r\n" + png[7:], UNDECODABLE)
    # in the image data: OpenCV decides
    at = png.index(b"IDAT")
    length = struct.unpack_from(">I", png, at - 4)[0]
    crc = bytearray(png)
    crc[at + 4 + length] ^= 0xFF
    collect("corrupt/png-idat-crc", bytes(crc), None)
    for offset in (0, 1, 2, 10, length // 2, length - 4):
        body = bytearray(png[at + 4:at + 4 + length])
        body[offset] ^= 0x5A
        fixed = [(t, bytes(body) if t == b"IDAT" else c) for t, c in chunks]
        collect(f"corrupt/png-zlib-byte{offset}-crc-fixed", _png_build(fixed), None)
    collect("corrupt/png-no-idat", _png_build([c for c in chunks if c[0] != b"IDAT"]), None)
    collect("corrupt/png-no-iend", _png_build([c for c in chunks if c[0] != b"IEND"]), None)
    collect("corrupt/png-ihdr-larger-than-data", _png_ihdr(png, 480, 320), None)
    collect("corrupt/png-ihdr-smaller-than-data", _png_ihdr(png, 20, 10), None)
    side = math.isqrt(max_pixels)
    collect(f"corrupt/png-ihdr-{side}x{max_pixels // side}-within-limit",
            _png_ihdr(png, side, max_pixels // side), None)
    collect("corrupt/png-16bit-palette-header", _png_ihdr(b["png-palette"], depth=16), UNDECODABLE)

    jpg = b["jpeg-baseline"]
    sof = _jpeg_sof(jpg)
    segments = _jpeg_segments(jpg)
    for what, at, raw in (("height0", sof + 5, b"\0\0"), ("width0", sof + 7, b"\0\0"),
                          ("components0", sof + 9, b"\0"), ("precision0", sof + 4, b"\0"),
                          ("precision1", sof + 4, b"\x01"), ("precision17", sof + 4, b"\x11"),
                          ("sof-length-short", sof + 2, b"\0\x0e"), ("sof-length-7", sof + 2, b"\0\x07"),
                          ("sampling-0x1", sof + 11, b"\x01"), ("sampling-5x1", sof + 11, b"\x51"),
                          ("app0-length-1", 4, b"\0\x01"), ("app0-length-past-end", 4, b"\xff\xff")):
        collect(f"corrupt/jpeg-{what}", _put(jpg, at, raw), UNDECODABLE)
    sof_end = next(e for m, s, e in segments if s == sof)
    collect("corrupt/jpeg-no-sof", jpg[:sof] + jpg[sof_end:], UNDECODABLE)
    collect("corrupt/jpeg-two-sof", jpg[:sof_end] + jpg[sof:], UNDECODABLE)
    collect("corrupt/jpeg-soi-eoi", b"\xff\xd8\xff\xd9", UNDECODABLE)
    collect("corrupt/jpeg-eoi-before-sof", jpg[:sof] + b"\xff\xd9" + jpg[sof:], UNDECODABLE)
    collect("corrupt/jpeg-second-soi", jpg[:sof] + b"\xff\xd8" + jpg[sof:], UNDECODABLE)
    collect("corrupt/jpeg-soi-then-zeros", b"\xff\xd8" + bytes(600), UNDECODABLE)
    collect("corrupt/jpeg-soi-then-text", b"\xff\xd8" + b"not a jpeg at all " * 20, UNDECODABLE)
    collect("corrupt/jpeg-only-fill-bytes", b"\xff\xd8" + b"\xff" * 300, UNDECODABLE)
    sos = segments[-1][1]
    collect("corrupt/jpeg-sof-larger-than-data", _put(jpg, sof + 5, struct.pack(">HH", 320, 480)), None)
    collect("corrupt/jpeg-sof-smaller-than-data", _put(jpg, sof + 5, struct.pack(">HH", 16, 16)), None)
    collect("corrupt/jpeg-entropy-cut-eoi-kept", jpg[:sos + 200] + b"\xff\xd9", None)
    collect("corrupt/jpeg-entropy-zeroed", jpg[:sos + 20] + bytes(len(jpg) - sos - 22) + b"\xff\xd9", None)
    collect("corrupt/jpeg-no-huffman-tables", b"".join(jpg[s:e] for m, s, e in segments if m != 0xC4)
            + jpg[segments[-1][2]:], None)
    collect("corrupt/jpeg-no-quant-tables", b"".join(jpg[s:e] for m, s, e in segments if m != 0xDB)
            + jpg[segments[-1][2]:], None)
    for k in range(6):
        at = sos + 30 + k * (len(jpg) - sos - 40) // 6
        collect(f"corrupt/jpeg-entropy-flip@{at}", _put(jpg, at, bytes([jpg[at] ^ 0x5A])), None)

    lossy, lossless = b["webp-lossy"], b["webp-lossless"]
    collect("corrupt/webp-riff-size-4", _put(lossy, 4, struct.pack("<I", 4)), UNDECODABLE)
    collect("corrupt/webp-first-chunk-alph", _riff(b"ALPH" + lossy[16:]), UNDECODABLE)
    collect("corrupt/webp-first-chunk-exif", _riff(b"EXIF" + struct.pack("<I", 4) + bytes(4) + lossy[12:]),
            UNDECODABLE)
    for what, at, raw in (("vp8-start-code", 23, b"\x9d\x01\x2b"),
                          ("vp8-interframe", 20, bytes([lossy[20] | 1])),
                          ("vp8-hidden-frame", 20, bytes([lossy[20] & ~0x10])),
                          ("vp8-version-5", 20, bytes([lossy[20] & ~0x0E | 0x0A])), ("vp8-width0", 26, b"\0\0"),
                          ("vp8-height0", 28, b"\0\xc0"), ("vp8-partition-too-big", 22, b"\xff")):
        collect(f"corrupt/webp-{what}", _put(lossy, at, raw), UNDECODABLE)
    collect("corrupt/webp-vp8l-signature", _put(lossless, 20, b"\x2e"), UNDECODABLE)
    collect("corrupt/webp-vp8l-version1", _put(lossless, 24, bytes([lossless[24] | 0x20])), UNDECODABLE)
    collect("corrupt/webp-vp8x-canvas-over-2**32", _riff(_vp8x(100000, 100000) + lossy[12:]), UNDECODABLE)
    collect("corrupt/webp-vp8x-size-9", _riff(_vp8x(48, 32, size=9) + lossy[12:]), UNDECODABLE)
    collect("corrupt/webp-vp8x-canvas-mismatch", _riff(_vp8x(100, 100) + lossy[12:]), None)
    collect("corrupt/webp-vp8x-alone", _riff(_vp8x(48, 32)), None)
    for k in range(4):
        at = 40 + k * (len(lossless) - 50) // 4
        collect(f"corrupt/webp-lossless-flip@{at}", _put(lossless, at, bytes([lossless[at] ^ 0xA5])), None)

    bmp = b["bmp-rgb"]
    for what, at, raw in (("width0", 18, struct.pack("<i", 0)), ("width-negative", 18, struct.pack("<i", -48)),
                          ("height0", 22, struct.pack("<i", 0)), ("bitcount7", 28, struct.pack("<H", 7)),
                          ("bitcount0", 28, struct.pack("<H", 0)),
                          ("rle8-with-24bit", 30, struct.pack("<I", 1)),
                          ("compression9", 30, struct.pack("<I", 9)),
                          ("header-size-huge", 14, b"\xff\xff\xff\x7f")):
        collect(f"corrupt/bmp-{what}", _put(bmp, at, raw), UNDECODABLE)
    collect("corrupt/bmp-wider-than-data", _put(bmp, 18, struct.pack("<i", 60)), None)
    collect("corrupt/bmp-taller-than-data", _put(bmp, 22, struct.pack("<i", 40)), None)
    collect("corrupt/bmp-pixel-offset-past-end", _put(bmp, 10, struct.pack("<I", len(bmp) + 10)), None)

    rgb = _pixels(32, 48, 7)
    tif = tiff_bytes(rgb)
    collect("corrupt/tiff-ifd-offset-past-end", _put(tif, 4, struct.pack("<I", len(tif) + 100)), UNDECODABLE)
    collect("corrupt/tiff-ifd-offset-0", _put(tif, 4, struct.pack("<I", 0)), UNDECODABLE)
    collect("corrupt/tiff-ifd-offset-4", _put(tif, 4, struct.pack("<I", 4)), UNDECODABLE)
    collect("corrupt/tiff-ifd-no-entries", _put(tif, 8, b"\0\0"), UNDECODABLE)
    collect("corrupt/tiff-ifd-65535-entries", _put(tif, 8, b"\xff\xff"), UNDECODABLE)
    many = b"II*\0\x08\0\0\0" + struct.pack("<H", 1001) + struct.pack("<HHII", 1, 3, 1, 0) * 1001 + bytes(4)
    collect("corrupt/tiff-ifd-1001-entries", many, UNDECODABLE)
    collect("corrupt/jpeg-3000-comment-markers", jpg[:2] + b"\xff\xfe\0\2" * 3000 + jpg[2:], UNDECODABLE)
    collect("corrupt/tiff-no-width", tiff_bytes(rgb, extra={256: None}), UNDECODABLE)
    collect("corrupt/tiff-width-no-values", tiff_bytes(rgb, extra={256: (3, [])}), UNDECODABLE)
    collect("corrupt/tiff-width0", tiff_bytes(rgb, width=0), UNDECODABLE)
    collect("corrupt/tiff-height0-long", tiff_bytes(rgb, long_dims=True, height=0), UNDECODABLE)
    collect("corrupt/tiff-width-ascii", tiff_bytes(rgb, extra={256: (2, list(b"48\0"))}), UNDECODABLE)
    collect("corrupt/tiff-spp0", tiff_bytes(rgb, extra={277: (3, [0])}), UNDECODABLE)
    bps_entry = tif.index(struct.pack("<HH", 258, 3))
    collect("corrupt/tiff-bitspersample-offset-past-end",
            _put(tif, bps_entry + 8, struct.pack("<I", len(tif) + 8)), UNDECODABLE)
    collect("corrupt/bigtiff-offset-size-4", b"II+\0\x04\0\0\0" + bytes(8) + bytes(40), UNDECODABLE)
    collect("corrupt/bigtiff-ifd-past-end", b"II+\0\x08\0\0\0" + struct.pack("<Q", 10**6) + bytes(40),
            UNDECODABLE)
    strip_entry = tif.index(struct.pack("<HHI", 273, 4, 1))
    collect("corrupt/tiff-strip-offset-past-end", _put(tif, strip_entry + 8, struct.pack("<I", len(tif) + 5)),
            None)
    collect("corrupt/tiff-larger-than-data", tiff_bytes(rgb, width=480, height=320), None)
    collect("corrupt/tiff-palette-without-colormap", tiff_bytes(rgb[..., 0], photometric=3), None)


def _bombs(collect: Callable[[str, bytes, str | None], None]) -> None:
    """Values small and within max_pixels that would cost the decoder far more than their size says, and
    values far shorter than what their header declares: refused from the coded data, before decoding."""
    for n in (101, 2000):
        collect(f"bomb/jpeg-progressive-{n}-scans", jpeg_with_scans(48, 32, n - 10), BOMB)
    collect("bomb/jpeg-progressive-6000x6000-2000-scans", jpeg_with_scans(48, 32, 1990, declare=(6000, 6000)),
            BOMB)
    # A fake EOI in a comment after the first scan must not end the count early.
    collect("bomb/jpeg-progressive-comment-with-fake-eoi", jpeg_with_scans(48, 32, 150, comment=b"\xff\xd9"),
            BOMB)
    collect("bomb/jpeg-sequential-one-scan-per-component-x50",
            handmade_jpeg(64, 64, components=3, scans=[[c] for c in (1, 2, 3)] * 50), BOMB)
    jpg, prog = _bases()["jpeg-baseline"], _bases()["jpeg-progressive"]
    collect("truncated/jpeg-declares-6000x6000", _put(jpg, _jpeg_sof(jpg) + 5, struct.pack(">HH", 6000, 6000)),
            TRUNCATED)
    collect("truncated/jpeg-progressive-declares-6000x6000",
            _put(prog, _jpeg_sof(prog) + 5, struct.pack(">HH", 6000, 6000)), TRUNCATED)
    collect("truncated/jpeg-handmade-6000x6000-no-blocks", handmade_jpeg(6000, 6000, blocks=1), TRUNCATED)
    collect("truncated/png-declares-6000x6000", _png_ihdr(_bases()["png-rgb"], 6000, 6000), TRUNCATED)


# --- hand-built JPEGs -----------------------------------------------------------------------------------------
def _segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body


def _bits_to_bytes(bits: str) -> bytes:
    bits += "1" * (-len(bits) % 8)  # pad with ones, as encoders do
    return int(bits, 2).to_bytes(len(bits) // 8, "big").replace(b"\xff", b"\xff\x00") if bits else b""


def handmade_jpeg(width: int, height: int, components: int = 1, precision: int = 8, sof: int = 0xC0,
                  scans: list[list[int]] | None = None, blocks: int | None = None) -> bytes:
    """A flat mid-gray JPEG built marker by marker: one-bit Huffman codes for a zero DC difference and for
    end-of-block, so each 8x8 block costs two bits (what a flat image costs with optimised tables).
    ``scans``: the component ids (1-based) of each scan; default one scan of all of them. ``blocks``: code
    only this many blocks per scan (fewer than the image has: a truncated image)."""
    one_code = bytes([1] + [0] * 15) + b"\x00"  # one symbol (0: zero DC difference / end of block), code "0"
    out = b"\xff\xd8" + _segment(0xDB, b"\x00" + bytes([1] * 64))
    comps = b"".join(bytes([c, 0x11, 0]) for c in range(1, components + 1))
    out += _segment(sof, struct.pack(">BHHB", precision, height, width, components) + comps)
    out += _segment(0xC4, b"\x00" + one_code) + _segment(0xC4, b"\x10" + one_code)
    all_blocks = -(-width // 8) * -(-height // 8)
    for scan in scans or [list(range(1, components + 1))]:
        head = bytes([len(scan)]) + b"".join(bytes([c, 0]) for c in scan) + b"\x00\x3f\x00"
        out += _segment(0xDA, head) + _bits_to_bytes("00" * len(scan) * (all_blocks if blocks is None else blocks))
    return out + b"\xff\xd9"


def _jpeg_scan_segments(jpg: bytes) -> tuple[int, int]:
    """(offset of the first SOS, offset of the EOI) of an encoder's JPEG."""
    return _jpeg_segments(jpg)[-1][1], jpg.rindex(b"\xff\xd9")


def jpeg_with_scans(width: int, height: int, extra: int, declare: tuple[int, int] | None = None,
                    comment: bytes = b"") -> bytes:
    """A progressive JPEG (Pillow) with ``extra`` more scans before its EOI: each an AC refinement of the
    luma whose data is a few end-of-band runs, so a few bytes make libjpeg visit every block again (100
    such scans add 2.2 s to the decode of a 6000x6000 image, 82 bytes each). ``declare``:
    patch the frame header to this size; ``comment``: a COM segment with these bytes after the first scan."""
    jpg = _pil(_pixels(height, width, 21), "RGB", "JPEG", progressive=True)
    if declare is not None:
        jpg = _put(jpg, _jpeg_sof(jpg) + 5, struct.pack(">HH", declare[1], declare[0]))
        width, height = declare
    blocks = -(-width // 8) * -(-height // 8)
    runs = -(-blocks // 32767)  # EOB14 with 14 more bits: a run of up to 32767 blocks
    eob14 = bytes([1] + [0] * 15) + b"\xe0"  # AC table 3: symbol 0xE0 (EOB14) coded "0"
    scan = (_segment(0xC4, b"\x13" + eob14) + _segment(0xDA, b"\x01\x01\x03\x01\x3f\x10")
            + _bits_to_bytes(("0" + "1" * 14) * runs))
    first, eoi = _jpeg_scan_segments(jpg)
    if comment:
        second = jpg.index(b"\xff\xc4", first)  # the table before the second scan
        jpg = jpg[:second] + _segment(0xFE, comment) + jpg[second:]
        eoi = jpg.rindex(b"\xff\xd9")
    return jpg[:eoi] + scan * extra + jpg[eoi:]


@functools.cache
def _build(max_bytes: int, max_pixels: int) -> tuple[tuple[Case, ...], tuple[tuple[str, bytes], ...]]:
    cases: list[Case] = []
    decodable: list[tuple[str, bytes]] = []

    def collect(name: str, data: bytes, reason: str | None) -> None:
        if reason is None:  # damage past the header: label it with what the decoder does
            reason = _verdict(data)
            if reason is None:
                decodable.append((name, data))
                return
        cases.append((name, data, reason))

    collect("empty/zero-length", b"", EMPTY)
    png = _bases()["png-rgb"]
    collect("oversized/png-padded", png + bytes(max_bytes + 1 - len(png)), TOO_LARGE)
    collect("oversized/random", np.random.default_rng(7).integers(0, 256, max_bytes + 1, np.uint8).tobytes(),
            TOO_LARGE)
    collect("oversized/zeros", bytes(max_bytes + 1), TOO_LARGE)
    collect("oversized/huge-png-padded", _png_ihdr(png, 100000, 100000) + bytes(max_bytes), TOO_LARGE)
    _truncations(collect)
    _huge(collect, max_pixels)
    _unsupported(collect)
    _unknown(collect)
    _corrupt(collect, max_pixels)
    _bombs(collect)
    names = [c[0] for c in cases] + [d[0] for d in decodable]
    assert len(names) == len(set(names)), "corpus case names must be unique"
    return tuple(cases), tuple(decodable)


def malformed_corpus(max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS) -> list[Case]:
    """(name, bytes, expected reason code) for every value the decode path must refuse."""
    return list(_build(max_bytes, max_pixels)[0])


def damaged_but_decodable(max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS) -> list[tuple[str, bytes]]:
    """Damaged values that OpenCV decodes anyway (garbage pixels, no error): not poison by the decode path."""
    return list(_build(max_bytes, max_pixels)[1])


# --- valid images ------------------------------------------------------------------------------------------
# mode → (encoder of a BGR array and an alpha plane, format, colour and channels that sniff reports)
_Encoder = Callable[[np.ndarray, np.ndarray], bytes]
MODES: dict[str, tuple[_Encoder, str, str, int]] = {
    "jpeg-rgb-opencv": (lambda c, a: _cv(".jpg", c), "jpeg", "rgb", 3),
    "jpeg-gray-opencv": (lambda c, a: _cv(".jpg", c[..., 0]), "jpeg", "gray", 1),
    "jpeg-rgb-progressive": (lambda c, a: _pil(c, "RGB", "JPEG", progressive=True), "jpeg", "rgb", 3),
    "jpeg-gray-progressive": (lambda c, a: _pil(c, "L", "JPEG", progressive=True), "jpeg", "gray", 1),
    "jpeg-rgb-444-optimized": (lambda c, a: _pil(c, "RGB", "JPEG", subsampling=0, optimize=True),
                               "jpeg", "rgb", 3),
    "jpeg-rgb-restart-markers": (lambda c, a: _cv(".jpg", c, cv2.IMWRITE_JPEG_RST_INTERVAL, 2),
                                 "jpeg", "rgb", 3),
    "png-rgb": (lambda c, a: _cv(".png", c), "png", "rgb", 3),
    "png-gray": (lambda c, a: _cv(".png", c[..., 0]), "png", "gray", 1),
    "png-rgba": (lambda c, a: _cv(".png", np.dstack([c, a])), "png", "rgba", 4),
    "png-gray-alpha": (lambda c, a: _pil(np.dstack([c, a]), "LA", "PNG"), "png", "gray_alpha", 2),
    "png-palette": (lambda c, a: _pil(c, "P", "PNG"), "png", "palette", 1),
    "png-palette-trns": (lambda c, a: _pil(c, "P", "PNG", transparency=0), "png", "palette", 1),
    "png-1bit": (lambda c, a: _pil(c, "1", "PNG"), "png", "gray", 1),
    "png-interlaced": (lambda c, a: _png_interlaced(c), "png", "rgb", 3),  # neither writer does Adam7
    "webp-lossy": (lambda c, a: _pil(c, "RGB", "WEBP", quality=75), "webp", "rgb", 3),
    "webp-lossless": (lambda c, a: _cv(".webp", c), "webp", "rgb", 3),
    "webp-lossless-alpha": (lambda c, a: _cv(".webp", np.dstack([c, a])), "webp", "rgba", 4),
    "webp-lossy-alpha": (lambda c, a: _pil(np.dstack([c, a]), "RGBA", "WEBP", quality=75), "webp", "rgba", 4),
    "bmp-rgb": (lambda c, a: _cv(".bmp", c), "bmp", "rgb", 3),
    "bmp-gray": (lambda c, a: _cv(".bmp", c[..., 0]), "bmp", "palette", 1),
    "bmp-rgba": (lambda c, a: _cv(".bmp", np.dstack([c, a])), "bmp", "rgba", 4),
    "bmp-palette": (lambda c, a: _pil(c, "P", "BMP"), "bmp", "palette", 1),
    "bmp-1bit": (lambda c, a: _pil(c, "1", "BMP"), "bmp", "palette", 1),
    "bmp-top-down": (lambda c, a: bmp_bytes(c, top_down=True), "bmp", "rgb", 3),
    "tiff-rgb": (lambda c, a: _cv(".tiff", c), "tiff", "rgb", 3),
    "tiff-gray": (lambda c, a: _cv(".tiff", c[..., 0]), "tiff", "gray", 1),
    "tiff-rgba": (lambda c, a: _cv(".tiff", np.dstack([c, a])), "tiff", "rgba", 4),
    "tiff-rgb-big-endian": (lambda c, a: tiff_bytes(c, ">"), "tiff", "rgb", 3),
    "tiff-gray-big-endian-long": (lambda c, a: tiff_bytes(c[..., 0], ">", long_dims=True), "tiff", "gray", 1),
    "tiff-rgb-pillow-lzw": (lambda c, a: _pil(c, "RGB", "TIFF", compression="tiff_lzw"), "tiff", "rgb", 3),
    "tiff-palette": (lambda c, a: _pil(c, "P", "TIFF"), "tiff", "palette", 1),
    "tiff-1bit": (lambda c, a: _pil(c, "1", "TIFF"), "tiff", "gray", 1),
    "tiff-ycbcr-jpeg": (lambda c, a: _pil(c, "RGB", "TIFF", compression="jpeg"), "tiff", "rgb", 3),
    "tiff-bigtiff": (lambda c, a: _pil(c, "RGB", "TIFF", big_tiff=True), "tiff", "rgb", 3),
    # 16 bits per sample: decoded to the high byte, which is c here (the low byte differs from it)
    "png-gray-16bit": (lambda c, a: _cv(".png", wide16(c[..., 0])), "png", "gray", 1),
    "png-rgb-16bit": (lambda c, a: _cv(".png", wide16(c)), "png", "rgb", 3),
    "png-rgba-16bit": (lambda c, a: _cv(".png", wide16(np.dstack([c, a]))), "png", "rgba", 4),
    "png-gray-alpha-16bit": (lambda c, a: _pil16_gray_alpha(c[..., 0], a), "png", "gray_alpha", 2),
    "tiff-gray-16bit": (lambda c, a: _cv(".tiff", wide16(c[..., 0])), "tiff", "gray", 1),
    "tiff-rgb-16bit": (lambda c, a: _cv(".tiff", wide16(c)), "tiff", "rgb", 3),
    "tiff-rgb-16bit-big-endian": (lambda c, a: tiff_bytes(wide16(c), ">"), "tiff", "rgb", 3),
}


def wide16(arr: np.ndarray) -> np.ndarray:
    """8-bit values as the high byte of 16-bit samples, with a low byte that differs (255 - v): the high
    byte and a rounded v * 255 / 65535 then disagree wherever v < 255 and the low byte is >= 128."""
    return (arr.astype(np.uint16) << 8) | (255 - arr).astype(np.uint16)


def _pil16_gray_alpha(gray: np.ndarray, alpha: np.ndarray) -> bytes:
    """16-bit gray + alpha PNG (colour type 4), which neither OpenCV nor Pillow writes: built by hand."""
    h, w = gray.shape
    pixels = np.dstack([wide16(gray), wide16(alpha.reshape(h, w))]).astype(">u2")
    raw = b"".join(b"\0" + row.tobytes() for row in pixels)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 4, 0, 0, 0)) \
        + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b"")


def _png_interlaced(bgr: np.ndarray) -> bytes:
    rgb = np.ascontiguousarray(bgr[..., ::-1])
    h, w, _ = rgb.shape
    raw = b""
    for y0, x0, dy, dx in ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2),
                           (1, 0, 2, 1)):
        sub = rgb[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\0" + row.tobytes() for row in sub)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 1)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw)) \
        + _png_chunk(b"IEND", b"")


def _make(mode: str, w: int, h: int, seed: int) -> tuple[str, bytes, dict]:
    encode, fmt, color, channels = MODES[mode]
    alpha = _pixels(h, w, seed + 1, 1) // 2 + 20  # never all opaque, or encoders drop the alpha channel
    data = encode(_pixels(h, w, seed), alpha)
    return f"{mode}-{w}x{h}", data, {"format": fmt, "width": w, "height": h, "color": color,
                                     "channels": channels, "bit_depth": 16 if "16bit" in mode else 8}


def good_image_specs(n: int = 40, seed: int = 0) -> list[tuple[str, bytes, dict]]:
    """Every mode once at an odd size, then random modes and sizes: (name, bytes, what sniff must read)."""
    rng = np.random.default_rng(seed)
    modes = list(MODES)
    out = [_make(mode, 37 + i, 23 + 2 * i, seed + i) for i, mode in enumerate(modes)]
    while len(out) < n:
        w, h = (int(v) for v in rng.integers(1, 200, 2))
        out.append(_make(modes[int(rng.integers(len(modes)))], w, h, int(rng.integers(1 << 30))))
    return out[:n]


def good_images(n: int = 40, seed: int = 0) -> list[tuple[str, bytes]]:
    """Valid images of varied sizes, formats (jpeg, png, webp, bmp, tiff) and modes: (name, bytes)."""
    return [(name, data) for name, data, _ in good_image_specs(n, seed)]


def tiny_valid_images() -> list[tuple[str, bytes]]:
    """1x1 images in every mode: valid, and a classic edge for header readers and decoders."""
    return [_make(mode, 1, 1, 11)[:2] for mode in MODES]

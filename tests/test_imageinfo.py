"""The decode stage's poison guard: header sniffing, limits, the malformed corpus through the decode path."""

from __future__ import annotations

import re
import struct

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.corpus import (MAX_BYTES, MAX_PIXELS, MODES, _pil, _pixels, bmp_bytes, damaged_but_decodable,
                          decode_like_worker, good_image_specs, handmade_jpeg, malformed_corpus, tiff_bytes,
                          tiny_valid_images)
from worker.errors import (DecodeBomb, EmptyValue, PoisonMessage, TooLarge, TruncatedImage, UndecodableImage,
                           UnsupportedImage)
from worker.decode.headers import COLORS, FORMATS, ImageInfo, check_limits, check_size, check_supported, sniff

try:
    from worker.decode.message import decode_image
except ImportError as exc:  # the lead's module: these tests run once it lands
    decode_image = None
    DECODE_MISSING = f"worker.decode.message.decode_image is not importable yet ({exc})"
else:
    DECODE_MISSING = ""

ERROR_OF = {"empty_value": EmptyValue, "too_large": TooLarge, "unsupported_image": UnsupportedImage,
            "undecodable_image": UndecodableImage, "truncated_image": TruncatedImage, "decode_bomb": DecodeBomb}
CORPUS = malformed_corpus()
GOOD = good_image_specs(len(MODES) + 30, seed=0)
needs_decode = pytest.mark.skipif(decode_image is None, reason=DECODE_MISSING)


def _decoded(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


# --- what sniff reads ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,data,expected", GOOD, ids=[g[0] for g in GOOD])
def test_sniff_reads_every_format_and_mode(name, data, expected):
    info = sniff(data)
    assert {k: getattr(info, k) for k in expected} == expected
    image = _decoded(data)
    assert image is not None and image.dtype == (np.uint16 if expected["bit_depth"] == 16 else np.uint8)
    assert image.shape[:2] == (info.height, info.width)


def test_every_mode_is_covered():
    assert {g[0].rsplit("-", 1)[0] for g in GOOD} == set(MODES)
    assert {g[2]["format"] for g in GOOD} == set(FORMATS)


def test_progressive_jpeg():
    data = _pil(_pixels(41, 67, 1), "RGB", "JPEG", progressive=True)
    assert b"\xff\xc2" in data
    assert sniff(data) == ImageInfo("jpeg", 67, 41, 3, 8, "rgb", 24)


def test_jpeg_skips_exif_fill_bytes_and_junk_before_markers():
    data = _pil(_pixels(30, 20, 2), "L", "JPEG")
    exif = b"\xff\xe1" + struct.pack(">H", 2 + 6 + 4000) + b"Exif\0\0" + bytes(4000)
    # 0xFF fill bytes before a marker are legal; stray bytes before one are skipped by libjpeg (a warning)
    messy = data[:2] + exif + b"\xff\xff\xff" + data[2:20] + b"\x00\x13" + data[20:]
    assert sniff(messy) == sniff(data) == ImageInfo("jpeg", 20, 30, 1, 8, "gray", 8)
    assert _decoded(messy).shape == (30, 20)


def test_png_gray_alpha_and_palette_and_1bit():
    rgb = _pixels(9, 13, 3)
    gray_alpha = _pil(np.dstack([rgb, rgb[..., 0]]), "LA", "PNG")
    assert sniff(gray_alpha) == ImageInfo("png", 13, 9, 2, 8, "gray_alpha", 16)
    assert _decoded(gray_alpha).shape == (9, 13, 4)  # OpenCV gives BGRA for gray+alpha
    assert sniff(_pil(rgb, "P", "PNG")) == ImageInfo("png", 13, 9, 1, 8, "palette", 8)
    assert sniff(_pil(rgb, "1", "PNG")) == ImageInfo("png", 13, 9, 1, 8, "gray", 1)
    assert _decoded(_pil(rgb, "P", "PNG")).shape == (9, 13, 3)  # OpenCV expands the palette


def test_bmp_top_down_and_bottom_up():
    bgr = _pixels(7, 11, 4)
    top_down, bottom_up = bmp_bytes(bgr, top_down=True), bmp_bytes(bgr)
    assert struct.unpack_from("<i", top_down, 22)[0] == -7
    assert sniff(top_down) == sniff(bottom_up) == ImageInfo("bmp", 11, 7, 3, 8, "rgb", 24)
    assert np.array_equal(_decoded(top_down), bgr) and np.array_equal(_decoded(bottom_up), bgr)


@pytest.mark.parametrize("long_dims", [False, True])
def test_big_endian_tiff(long_dims):
    bgr = _pixels(5, 300, 5)
    data = tiff_bytes(bgr, ">", long_dims=long_dims)
    assert data[:4] == b"MM\0*"
    assert sniff(data) == ImageInfo("tiff", 300, 5, 3, 8, "rgb", 24)
    assert np.array_equal(_decoded(data), bgr)


def test_bigtiff_is_read():
    data = _pil(_pixels(6, 10, 6), "RGB", "TIFF", big_tiff=True)
    assert data[:4] == b"II+\0"
    assert sniff(data) == ImageInfo("tiff", 10, 6, 3, 8, "rgb", 24)


def test_depths_and_colour_models_that_decode_refuses():
    rgb = _pixels(8, 12, 7)
    sixteen = [cv2.imencode(".png", rgb.astype(np.uint16))[1].tobytes(),
               cv2.imencode(".tiff", rgb[..., 0].astype(np.uint16))[1].tobytes(),
               tiff_bytes(rgb.astype(np.uint16), ">")]
    for data in sixteen:
        assert sniff(data).bit_depth == 16
        check_supported(sniff(data))  # 16-bit PNG and TIFF decode to their high byte
    cmyk = sniff(_pil(rgb, "CMYK", "JPEG"))
    assert (cmyk.color, cmyk.channels) == ("cmyk", 4)
    assert sniff(_pil(rgb, "CMYK", "TIFF")).color == "cmyk"
    twelve = sniff(handmade_jpeg(16, 8, precision=12, sof=0xC1))
    assert (twelve.bit_depth, twelve.format) == (12, "jpeg")
    for info in (cmyk, twelve, ImageInfo("jpeg", 8, 8, 1, 16, "gray", 16), ImageInfo("tiff", 8, 8, 1, 32, "gray", 32)):
        with pytest.raises(UnsupportedImage):
            check_supported(info)
    check_supported(sniff(_pil(rgb, "1", "TIFF")))  # 1-bit unpacks to 8: fine


def test_a_real_12bit_jpeg_is_one_opencv_cannot_decode():
    """Why 12-bit JPEG stays unsupported_image: OpenCV reads 8-bit JPEG samples only and gives nothing for
    a valid 12-bit file, in any mode (the same file at 8 bits decodes to its flat gray)."""
    for flag in (cv2.IMREAD_COLOR, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH, cv2.IMREAD_UNCHANGED):
        assert cv2.imdecode(np.frombuffer(handmade_jpeg(16, 8, precision=12, sof=0xC1), np.uint8), flag) is None
        eight = cv2.imdecode(np.frombuffer(handmade_jpeg(16, 8, precision=8, sof=0xC1), np.uint8), flag)
        assert eight.dtype == np.uint8 and eight.shape[:2] == (8, 16) and set(np.unique(eight)) == {128}


@pytest.mark.parametrize("name,data", tiny_valid_images(), ids=[t[0] for t in tiny_valid_images()])
def test_tiny_images_are_valid(name, data):
    info = sniff(data)
    assert (info.width, info.height) == (1, 1)
    assert decode_like_worker(data).shape[:2] == (1, 1)


# --- limits ----------------------------------------------------------------------------------------------
def test_check_size_boundary():
    check_size(0, 10)
    check_size(10, 10)
    with pytest.raises(TooLarge, match=r"11 bytes, over max_bytes=10") as exc:
        check_size(11, 10)
    assert exc.value.reason == "too_large"


def test_check_limits_boundary():
    check_limits(ImageInfo("png", 8000, 5000, 3, 8, "rgb", 24), 40_000_000)
    with pytest.raises(TooLarge, match=r"image 40000x40000 exceeds max_pixels=40000000"):
        check_limits(ImageInfo("jpeg", 40000, 40000, 3, 8, "rgb", 24), 40_000_000)
    with pytest.raises(TooLarge, match=r"image 8001x5000 exceeds max_pixels=40000000"):
        check_limits(ImageInfo("png", 8001, 5000, 3, 8, "rgb", 24), 40_000_000)


def test_empty_and_none_values():
    for value in (b"", None, bytearray(), memoryview(b"")):
        with pytest.raises(EmptyValue, match="empty message value"):
            sniff(value)


def test_sniff_takes_bytearray_and_memoryview():
    data = GOOD[0][1]
    assert sniff(bytearray(data)) == sniff(memoryview(data)) == sniff(data)


# --- the malformed corpus --------------------------------------------------------------------------------
def test_corpus_composition():
    names = [c[0] for c in CORPUS]
    assert len(CORPUS) >= 200 and len(names) == len(set(names))
    reasons = {c[2] for c in CORPUS}
    assert reasons == set(ERROR_OF)
    assert all(isinstance(c[1], bytes) for c in CORPUS)
    assert not {n for n, _ in damaged_but_decodable()} & set(names)
    assert malformed_corpus() == CORPUS  # deterministic


_UNSUPPORTED_HINTS = {"tiff-float32": "floating point",
                      "tiff-int32": "signed", "tiff-signed": "signed", "tiff-mixed": "(8, 8, 16)",
                      "tiff-cmyk": "CMYK", "jpeg-cmyk": "CMYK", "jpeg-ycck": "YCCK", "jpeg-12bit": "12-bit",
                      "jpeg-16bit": "16-bit", "jpeg-hierarchical": "hierarchical", "bmp-embedded-jpeg": "JPEG",
                      "bmp-embedded-png": "PNG", "bmp-os2": "12 bytes", "bmp-header-20": "20 bytes",
                      "riff-wave": "WAVE"}


def _useful_number(name: str, data: bytes) -> str | None:
    """The piece of the message that tells an operator what was wrong with this case, when we know it."""
    group, detail = name.split("/", 1)
    header_level = _sniff_raises(data)
    if group == "empty":
        return "empty message value"
    if group == "oversized":
        return f"{len(data)} bytes, over max_bytes={MAX_BYTES}"
    if group == "unknown":
        return data[:8].hex()
    if group == "huge":
        w, h = re.search(r"(\d+)x-?(\d+)$", detail).groups()
        return f"image {w}x{h} exceeds max_pixels={MAX_PIXELS}"
    if group == "truncated" and header_level:
        return str(len(data))
    if group == "bomb":
        return "max_jpeg_scans=100"
    if group == "unsupported":
        return next(hint for prefix, hint in _UNSUPPORTED_HINTS.items() if detail.startswith(prefix))
    if group == "corrupt" and header_level:
        m = re.search(r"png-ihdr-(\d+x\d+)$", detail)
        return m.group(1) if m else ("CRC" if "crc" in detail else "header")
    return None


def _sniff_raises(data: bytes) -> bool:
    try:
        sniff(data)
    except PoisonMessage:
        return True
    return False


@pytest.mark.parametrize("name,data,reason", CORPUS, ids=[c[0] for c in CORPUS])
def test_corpus_case_through_reference_path(name, data, reason):
    with pytest.raises(ERROR_OF[reason]) as exc:
        decode_like_worker(data, MAX_BYTES, MAX_PIXELS)
    assert exc.value.reason == reason
    hint = _useful_number(name, data)
    if hint is not None:
        assert hint in str(exc.value), f"{name}: {exc.value}"


@needs_decode
@pytest.mark.parametrize("name,data,reason", CORPUS, ids=[c[0] for c in CORPUS])
def test_corpus_case_through_decode_image(name, data, reason):
    with pytest.raises(ERROR_OF[reason]) as exc:
        decode_image(data, MAX_BYTES, MAX_PIXELS)
    assert exc.value.reason == reason


@needs_decode
def test_valid_and_damaged_but_decodable_images_pass_decode_image():
    for name, data, expected in GOOD:
        image = decode_image(data, MAX_BYTES, MAX_PIXELS)
        assert image.dtype == np.uint8 and image.shape[:2] == (expected["height"], expected["width"]), name
    for name, data in tiny_valid_images() + damaged_but_decodable():
        assert decode_image(data, MAX_BYTES, MAX_PIXELS).dtype == np.uint8, name


def test_damaged_but_decodable_are_what_opencv_accepts():
    """Faults past the header that OpenCV decodes into garbage pixels: they cannot be told apart here."""
    for name, data in damaged_but_decodable():
        assert decode_like_worker(data).dtype == np.uint8, name


# --- property tests: nothing but PoisonMessage, whatever the bytes ----------------------------------------
SEEDS = [data for _, data in tiny_valid_images()] + [g[1] for g in GOOD if len(g[1]) < 6000][:12]
MAGICS = [b"\xff\xd8", b"\xff\xd8\xff\xc0\x00\x11", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
          b"RIFF\xff\xff\xff\x7fWEBP", b"RIFF\x00\x01\x00\x00WEBPVP8X", b"BM", b"II*\x00", b"MM\x00*",
          b"II+\x00\x08\x00\x00\x00"]
EXTREMES = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        limit = min(len(data), 80) if draw(st.booleans()) else len(data)  # headers live up front
        at = draw(st.integers(0, limit - 1))
        op = draw(st.sampled_from(["cut", "flip", "set", "insert", "delete", "int"]))
        if op == "cut":
            del data[at:]
        elif op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        else:
            size, order = draw(st.sampled_from([(2, "big"), (2, "little"), (4, "big"), (4, "little")]))
            value = draw(st.sampled_from(EXTREMES)) % (1 << 8 * size)
            data[at:at + size] = value.to_bytes(size, order)
    return bytes(data)


ANY_BYTES = st.one_of(st.binary(max_size=600),
                      st.builds(bytes.__add__, st.sampled_from(MAGICS), st.binary(max_size=300)),
                      mutated_images())
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(ANY_BYTES)
def test_sniff_returns_info_or_raises_poison(data):
    try:
        info = sniff(data)
    except PoisonMessage as exc:
        assert exc.poison and exc.reason in ERROR_OF and str(exc)
        return
    assert info.format in FORMATS and info.color in COLORS
    assert info.width > 0 and info.height > 0 and info.channels > 0 and info.bit_depth >= 8


def _check_decoder(decode, data: bytes) -> None:
    max_pixels = 1 << 22  # keeps OpenCV's work on mutated headers small
    try:
        image = decode(data, MAX_BYTES, max_pixels)
    except PoisonMessage as exc:
        assert exc.reason in ERROR_OF and str(exc)
        return
    info = sniff(data)
    assert image.dtype == np.uint8 and image.shape[:2] == (info.height, info.width)


@PROPERTY
@given(ANY_BYTES)
def test_reference_decode_returns_array_or_raises_poison(data):
    _check_decoder(decode_like_worker, data)


@needs_decode
@PROPERTY
@given(ANY_BYTES)
def test_decode_image_returns_array_or_raises_poison(data):
    _check_decoder(decode_image, data)

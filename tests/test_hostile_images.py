"""Decode-time bombs and grossly short data, refused from the coded data before any pixel is decoded; and
the honest images (flat, tiny for their size, with trailers) that the same checks must let through."""

from __future__ import annotations

import io
import struct

import cv2
import numpy as np
import pytest
from PIL import Image

from tests.corpus import _jpeg_sof, _pil, _pixels, _png_ihdr, _put, handmade_jpeg, jpeg_with_scans
from worker.errors import DecodeBomb, TruncatedImage, UndecodableImage
from worker.decode import message as decode_module
from worker.decode.message import decode_message, gpu_decodable, inspect_message
from worker.decode.headers import DEFAULT_MAX_JPEG_SCANS, check_coded_data, sniff
from worker.models.spec import ModelSpec, PipelineSpec, Preprocess
from worker.settings import Settings

LIMITS = (1 << 24, 40_000_000)  # max_bytes, max_pixels (the worker's default)
PIPE = PipelineSpec((ModelSpec(name="m", path="bundled:channel_means", preprocess=Preprocess(width=8, height=8)),))


def _sos_count(jpg: bytes) -> int:
    """Scans of an encoder's or this module's JPEG, counted independently: every SOS segment header (the
    test files hold no 0xFFDA inside other segments, and fill bytes are not used)."""
    return jpg.count(b"\xff\xda")


def _pil_jpeg(arr: np.ndarray, **kw) -> bytes:
    out = io.BytesIO()
    Image.fromarray(arr).save(out, "JPEG", **kw)
    return out.getvalue()


# --- scans --------------------------------------------------------------------------------------------------
def test_the_default_limit_is_the_settings_default():
    assert Settings().max_jpeg_scans == DEFAULT_MAX_JPEG_SCANS == 100


@pytest.mark.parametrize("extra", [0, 1, 40, 300])
def test_scan_limit_is_exact(extra):
    jpg = jpeg_with_scans(48, 32, extra)
    scans = _sos_count(jpg)
    assert scans == 10 + extra  # Pillow's progressive colour JPEG has 10 scans
    inspect_message(jpg, None, *LIMITS, max_jpeg_scans=scans)
    with pytest.raises(DecodeBomb, match=rf"more than max_jpeg_scans={scans - 1} scans") as exc:
        inspect_message(jpg, None, *LIMITS, max_jpeg_scans=scans - 1)
    assert exc.value.reason == "decode_bomb"


def test_encoders_progressive_jpegs_are_far_below_the_limit():
    rgb, gray = _pixels(120, 160, 3), _pixels(120, 160, 4, 1)
    for data in (_pil(rgb, "RGB", "JPEG", progressive=True), _pil(gray, "L", "JPEG", progressive=True),
                 _pil(rgb, "RGB", "JPEG", progressive=True, optimize=True, subsampling=0),
                 cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()):
        assert _sos_count(data) <= 10
        assert decode_message(data, None, PIPE, *LIMITS).inputs[0].shape == (8, 8, 3)


def test_a_bomb_never_reaches_the_decoder(monkeypatch):
    def refuse(*_):
        raise AssertionError("cv2.imdecode called on a decode bomb")

    monkeypatch.setattr(decode_module.cv2, "imdecode", refuse)
    bomb = jpeg_with_scans(48, 32, 1990, declare=(6000, 6000))  # 2000 scans declaring 6000x6000
    assert len(bomb) < 200_000 and _sos_count(bomb) == 2000
    with pytest.raises(DecodeBomb, match="JPEG 6000x6000 has more than max_jpeg_scans=100 scans"):
        decode_message(bomb, None, PIPE, *LIMITS)
    with pytest.raises(DecodeBomb):
        decode_message(bomb, None, PIPE, *LIMITS, reduced=True)


def test_markers_between_scans_cannot_hide_scans():
    """A comment holding a fake EOI after the first scan, and 0xFF fill bytes before SOS markers: the walk
    skips segments by their length and fill bytes like libjpeg does, so every scan is still counted."""
    jpg = jpeg_with_scans(48, 32, 150, comment=b"\xff\xd9 fake end \xff\xda fake scan")
    with pytest.raises(DecodeBomb):
        inspect_message(jpg, None, *LIMITS)
    filled = jpeg_with_scans(48, 32, 5).replace(b"\xff\xda", b"\xff\xff\xff\xda")
    info = sniff(filled)
    check_coded_data(filled, info, 15)
    with pytest.raises(DecodeBomb):
        check_coded_data(filled, info, 14)
    assert cv2.imdecode(np.frombuffer(filled, np.uint8), cv2.IMREAD_COLOR).shape == (32, 48, 3)


def test_sequential_jpegs_of_one_scan_per_component_are_counted():
    three = handmade_jpeg(64, 64, components=3, scans=[[1], [2], [3]])
    inspect_message(three, None, *LIMITS, max_jpeg_scans=3)
    with pytest.raises(DecodeBomb):
        inspect_message(three, None, *LIMITS, max_jpeg_scans=2)
    assert cv2.imdecode(np.frombuffer(three, np.uint8), cv2.IMREAD_COLOR).shape == (64, 64, 3)
    # one interleaved scan: libjpeg refuses a second one, so only the end marker is looked at
    inspect_message(handmade_jpeg(64, 64, components=3), None, *LIMITS, max_jpeg_scans=1)


def test_trailers_after_the_end_marker_are_not_counted():
    """Multi-picture files (MPF: a second JPEG after the first one's EOI) and camera trailers holding
    0xFFDA bytes: only the scans before the first image's EOI count."""
    rgb = _pixels(32, 48, 5)
    second = _pil(rgb, "RGB", "JPEG", progressive=True)  # 10 scans
    for first in (cv2.imencode(".jpg", rgb)[1].tobytes(), _pil(rgb, "RGB", "JPEG", progressive=True)):
        scans = _sos_count(first)
        for trailer in (second * 20, b"\xff\xda" * 500 + bytes(100)):
            inspect_message(first + trailer, None, *LIMITS, max_jpeg_scans=scans)
            assert decode_message(first + trailer, None, PIPE, *LIMITS).inputs[0].shape == (8, 8, 3)


def test_an_exif_thumbnail_before_the_frame_does_not_count():
    rgb = _pixels(32, 48, 6)
    thumb = _pil(rgb[:8, :8], "RGB", "JPEG", progressive=True)
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + len(thumb)) + thumb
    jpg = cv2.imencode(".jpg", rgb)[1].tobytes()
    with_thumb = jpg[:2] + app1 + jpg[2:]
    inspect_message(with_thumb, None, *LIMITS, max_jpeg_scans=1)


# --- data too short for the declared pixels -------------------------------------------------------------
def test_a_tiny_jpeg_declaring_6000x6000_is_truncated_not_a_gray_result(monkeypatch):
    small = cv2.imencode(".jpg", _pixels(32, 48, 1), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    big = _put(small, _jpeg_sof(small) + 5, struct.pack(">HH", 6000, 6000))
    assert len(big) < 2000
    # what OpenCV makes of it: a 6000x6000 gray fill, no error
    decoded = cv2.imdecode(np.frombuffer(big, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert decoded.shape == (6000, 6000) and (decoded[3000:] == 128).all()
    for data in (big, handmade_jpeg(6000, 6000, blocks=1000), handmade_jpeg(6000, 6000, sof=0xC2, blocks=1)):
        with pytest.raises(TruncatedImage, match="6000x6000 has .* bytes of scan data for 36000000 pixels") as e:
            inspect_message(data, None, *LIMITS)
        assert e.value.reason == "truncated_image" and isinstance(e.value, UndecodableImage)


def test_flat_images_at_the_lowest_honest_rate_pass():
    """The floor: two bits per 8x8 block in a sequential scan (one-bit codes for a zero DC difference and
    for end-of-block), one in a progressive DC scan. A flat 6000x6000 gray at quality 1 is ~141 KB; the
    check refuses below 1 byte per 2048 pixels (17 578 bytes here)."""
    handmade = handmade_jpeg(6000, 6000)  # exactly the floor of a sequential JPEG: 140 625 bytes of scan
    assert 140_625 < len(handmade) < 141_000
    check_coded_data(handmade, sniff(handmade))
    flat = np.full((6000, 6000), 77, np.uint8)
    for kw in ({"quality": 1}, {"quality": 1, "optimize": True}, {"quality": 1, "progressive": True}):
        data = _pil_jpeg(flat, **kw)
        assert len(data) < 430_000
        inspect_message(data, None, *LIMITS)
    colour = _pil_jpeg(np.full((3000, 2000, 3), (10, 200, 90), np.uint8), quality=1, optimize=True)
    inspect_message(colour, None, *LIMITS)
    small = _pil_jpeg(np.full((1500, 2000), 77, np.uint8), quality=1, optimize=True)
    level = cv2.imdecode(np.frombuffer(small, np.uint8), cv2.IMREAD_GRAYSCALE)[0, 0]  # 64: quality 1's DC step
    assert (decode_message(small, None, PIPE, *LIMITS).inputs[0] == level).all()


def test_arithmetic_coded_jpegs_have_no_floor():
    """Arithmetic coding (SOF9/SOF10) can code a flat block in well under a bit: not bounded (rare)."""
    data = handmade_jpeg(6000, 6000, sof=0xC9, blocks=1)
    check_coded_data(data, sniff(data))


def test_a_jpeg_cut_short_is_left_to_opencv_which_refuses_it():
    jpg = cv2.imencode(".jpg", _pixels(240, 320, 7), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    for cut in (jpg[:len(jpg) * 2 // 3], jpg[:-2]):
        encoded = inspect_message(cut, None, *LIMITS)
        assert not gpu_decodable(encoded)
        with pytest.raises(UndecodableImage) as exc:
            decode_message(cut, None, PIPE, *LIMITS)
        assert exc.value.reason == "undecodable_image"


def test_png_shorter_than_deflate_allows():
    png = cv2.imencode(".png", _pixels(32, 48, 8))[1].tobytes()
    with pytest.raises(TruncatedImage, match=r"PNG 6000x6000 is \d+ bytes; its 108000000 bytes of pixels"):
        inspect_message(_png_ihdr(png, 6000, 6000), None, *LIMITS)
    for flat in (np.zeros((6000, 6000), np.uint8), np.zeros((3000, 3000, 3), np.uint16)):
        data = cv2.imencode(".png", flat, [cv2.IMWRITE_PNG_COMPRESSION, 9])[1].tobytes()
        raw = flat.size * flat.itemsize
        assert raw / len(data) > 900  # close to deflate's 1032:1, and still let through
        inspect_message(data, None, *LIMITS)

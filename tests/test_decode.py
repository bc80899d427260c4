"""The decode stage: envelopes, EXIF orientation, DCT-domain reduced decoding, per-model outputs, 16-bit
samples."""

from __future__ import annotations

import base64
import json
import struct
import zlib

import cv2
import numpy as np
import pytest

from tests.helpers import exif_rotated_jpeg
from worker.errors import MalformedEnvelope, TooLarge
from worker.decode.message import (decode_encoded, decode_image, decode_message, gpu_decodable, inspect_message,
                                reduction_factor, unwrap_envelope)
from worker.decode.headers import sniff
from worker.models.spec import ModelSpec, PipelineSpec, Preprocess
from worker.samples import encode, synth_image


def pipeline(*pres: Preprocess) -> PipelineSpec:
    return PipelineSpec(tuple(ModelSpec(name=f"m{i}", path="bundled:channel_means", preprocess=p)
                              for i, p in enumerate(pres)))


def test_envelope_and_correlation_id():
    png = encode(synth_image(np.random.default_rng(0), 8, 8, 3), "png")
    env = json.dumps({"image": base64.b64encode(png).decode(), "correlation_id": "abc"}).encode()
    assert unwrap_envelope(env, None) == (png, "abc")
    assert unwrap_envelope(png, [("Correlation-Id", b"h-1")]) == (png, "h-1")
    with pytest.raises(MalformedEnvelope, match="does not parse"):
        unwrap_envelope(b"{not json", None)
    with pytest.raises(MalformedEnvelope, match="non-empty base64 string field 'image'; fields present: \\['img'\\]"):
        unwrap_envelope(b'{"img": "x"}', None)
    with pytest.raises(MalformedEnvelope, match="not valid base64"):
        unwrap_envelope(b'{"image": "***"}', None)
    with pytest.raises(MalformedEnvelope, match="must be an object"):
        unwrap_envelope(b"[1]", [("content-type", b"application/json")])


def test_exif_orientation_is_applied():
    jpeg = exif_rotated_jpeg()  # 40x20 on disk, EXIF orientation 6: upright it is 20x40
    decoded = decode_image(jpeg, 10**7, 10**7)
    assert decoded.shape == (40, 20, 3)
    out = decode_message(jpeg, None, pipeline(Preprocess(width=20, height=40)), 10**7, 10**7)
    assert (out.width, out.height) == (40, 20)  # as stored; the pixels are upright
    assert out.inputs[0].shape == (40, 20, 3)


def test_reduced_decoding_picks_the_largest_factor_that_covers_every_model():
    jpeg = encode(synth_image(np.random.default_rng(1), 1280, 960, 3), "jpeg")
    info = sniff(jpeg)
    assert reduction_factor(info, [(224, 224)]) == 4  # 320x240 still covers 224x224
    assert reduction_factor(info, [(224, 224), (640, 480)]) == 2
    assert reduction_factor(info, [(1000, 900)]) == 1
    assert reduction_factor(sniff(encode(synth_image(np.random.default_rng(1), 64, 64, 3), "png")), [(8, 8)]) == 1
    pipe = pipeline(Preprocess(width=224, height=224))
    full = decode_message(jpeg, None, pipe, 10**8, 10**8, reduced=False).inputs[0].astype(np.float32)
    reduced = decode_message(jpeg, None, pipe, 10**8, 10**8, reduced=True).inputs[0].astype(np.float32)
    assert reduced.shape == full.shape == (224, 224, 3)
    assert np.abs(full - reduced).mean() < 6.0  # the same picture, up to JPEG's DCT-scaling error


def test_one_input_per_model_and_limits():
    png = encode(synth_image(np.random.default_rng(2), 100, 50, 4), "png")
    out = decode_message(png, None, pipeline(Preprocess(width=32, height=32),
                                             Preprocess(width=16, height=8, color="gray")), 10**7, 10**7)
    assert [x.shape for x in out.inputs] == [(32, 32, 3), (8, 16, 1)]
    assert (out.width, out.height, out.format) == (100, 50, "png")
    with pytest.raises(TooLarge, match="exceeds max_pixels=4999"):
        decode_message(png, None, pipeline(Preprocess(width=8, height=8)), 10**7, 4999)
    with pytest.raises(TooLarge):
        decode_message(png, None, pipeline(Preprocess(width=8, height=8)), 100, 10**7)


# --- 16 bits per sample ----------------------------------------------------------------------------------
# Known values over the whole range; for some (255, 511, 4095) a rounded v * 255 / 65535 is one higher than
# the high byte.
LEVELS = np.array([0, 1, 128, 255, 256, 383, 511, 4095, 32767, 32768, 32895, 65279, 65280, 65535], np.uint16)


def _sixteen(channels: int) -> np.ndarray:
    gray = np.stack([np.roll(LEVELS, k) for k in range(6)])  # 6 x 14
    if channels == 1:
        return gray
    return np.dstack([gray, gray[::-1], np.roll(gray, 3, axis=1)])  # B, G, R planes differ


def _write(ext: str, arr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, arr)
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("ext", [".png", ".tiff"])
@pytest.mark.parametrize("channels", [1, 3])
def test_16bit_rows_are_the_high_byte_of_each_sample(ext, channels):
    arr = _sixteen(channels)
    data = _write(ext, arr)
    info = sniff(data)
    assert info.bit_depth == 16 and (info.width, info.height) == (14, 6)
    high = (arr // 256).astype(np.uint8)  # expected 8-bit values (BGR order, as written)
    rgb = high[..., ::-1] if channels == 3 else np.dstack([high] * 3)
    pre = [Preprocess(width=14, height=6), Preprocess(width=14, height=6, color="bgr")]
    if channels == 1:
        pre.append(Preprocess(width=14, height=6, color="gray"))
    pipe = pipeline(*pre)
    for reduced in (False, True):  # decoder=cpu and cpu-reduced
        out = decode_message(data, None, pipe, 10**6, 10**6, reduced=reduced)
        assert (out.width, out.height, out.format) == (14, 6, ext[1:])
        assert np.array_equal(out.inputs[0], rgb)
        assert np.array_equal(out.inputs[1], rgb[..., ::-1])
        if channels == 1:
            assert np.array_equal(out.inputs[2][..., 0], high)
    # the check path of decoder=nvimgcodec: checked on the event loop, decoded by OpenCV in the pool
    encoded = inspect_message(data, None, 10**6, 10**6)
    assert not gpu_decodable(encoded)
    assert np.array_equal(decode_encoded(encoded, pipe, 10**6, 10**6)[0], rgb)


def test_16bit_png_matches_opencvs_own_8bit_reading_but_tiff_rgb_does_not():
    """Why the worker converts itself: for PNG, OpenCV's 8-bit reading (libpng's strip_16) keeps the high
    byte as we do; for an RGB TIFF it rounds v * 255 / 65535 instead (libtiff's RGBA reader), so the same
    samples would give different pixels by format. Ours give the high byte for both."""
    arr = _sixteen(3)
    png, tiff = _write(".png", arr), _write(".tiff", arr)
    high = (arr // 256).astype(np.uint8)
    assert np.array_equal(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR), high)
    assert not np.array_equal(cv2.imdecode(np.frombuffer(tiff, np.uint8), cv2.IMREAD_COLOR), high)
    assert np.array_equal(decode_image(png, 10**6, 10**6), high)
    assert np.array_equal(decode_image(tiff, 10**6, 10**6), high)


def test_16bit_alpha_is_dropped_and_exif_orientation_applied():
    arr = _sixteen(3)
    rgba = np.dstack([arr, np.full(arr.shape[:2], 40000, np.uint16)])
    assert np.array_equal(decode_image(_write(".png", rgba), 10**6, 10**6), (arr // 256).astype(np.uint8))
    # eXIf chunk with orientation 6 (rotate 90 degrees clockwise): IMREAD_UNCHANGED would ignore it
    png = _write(".png", arr)
    exif = b"MM\0*\0\0\0\x08" + struct.pack(">HHHII", 1, 0x0112, 3, 1, 6 << 16) + bytes(4)
    at = png.index(b"IDAT") - 4
    rotated = png[:at] + struct.pack(">I", len(exif)) + b"eXIf" + exif \
        + struct.pack(">I", zlib.crc32(b"eXIf" + exif)) + png[at:]
    upright = np.rot90((arr // 256).astype(np.uint8), k=-1)
    assert np.array_equal(decode_image(rotated, 10**6, 10**6), upright)

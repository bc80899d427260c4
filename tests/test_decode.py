"""The decode stage: envelopes, EXIF orientation, DCT-domain reduced decoding, per-model outputs."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from tests.helpers import exif_rotated_jpeg
from worker.errors import MalformedEnvelope, TooLarge
from worker.flow.decode import decode_image, decode_message, reduction_factor, unwrap_envelope
from worker.flow.imageinfo import sniff
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

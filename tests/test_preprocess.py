"""prepare() and normalize() against independent NumPy references.

Resampling itself is OpenCV's; these tests pin what we decide around it: colour conversion and order,
which interpolation, letterbox geometry and padding, identity sizes, layout, dtype and normalisation.
Solid-colour images make the expected pixels exact whatever the interpolation.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.errors import ConfigError, UnsupportedImage
from worker.models.preprocess import letterbox_geometry, normalize, prepare
from worker.models.spec import Preprocess

RNG = np.random.default_rng(7)
BGR = (10, 120, 230)  # distinct per channel, so a swap shows


def solid(h: int, w: int, bgr=BGR) -> np.ndarray:
    return np.broadcast_to(np.array(bgr, np.uint8), (h, w, 3)).copy()


def gray_of(bgr) -> int:
    return int(cv2.cvtColor(np.array([[bgr]], np.uint8), cv2.COLOR_BGR2GRAY)[0, 0])


@pytest.mark.parametrize("color", ["rgb", "bgr", "gray"])
@pytest.mark.parametrize("source", ["bgr", "bgra", "gray2d", "gray3d"])
@pytest.mark.parametrize("size", [(48, 80), (64, 64), (100, 30)])
def test_stretch_colour_and_shape(color, source, size):
    pre = Preprocess(width=64, height=64, color=color)
    h, w = size
    img = {"bgr": solid(h, w), "bgra": np.dstack([solid(h, w), np.full((h, w), 7, np.uint8)]),
           "gray2d": np.full((h, w), 99, np.uint8), "gray3d": np.full((h, w, 1), 99, np.uint8)}[source]
    out = prepare(img, pre)
    assert out.dtype == np.uint8 and out.shape == pre.hwc_shape and out.flags.c_contiguous
    if source.startswith("gray"):
        expected = [99] * pre.channels
    elif color == "gray":
        expected = [gray_of(BGR)]
    else:
        expected = list(BGR if color == "bgr" else BGR[::-1])
    assert (out == np.array(expected, np.uint8)).all()


@pytest.mark.parametrize("shape,interp", [((128, 96), cv2.INTER_AREA), ((32, 40), cv2.INTER_LINEAR),
                                           ((128, 40), cv2.INTER_LINEAR)])
def test_stretch_interpolation_choice(shape, interp):
    img = RNG.integers(0, 256, (*shape, 3), dtype=np.uint8)
    pre = Preprocess(width=64, height=64, color="bgr")
    assert np.array_equal(prepare(img, pre), cv2.resize(img, (64, 64), interpolation=interp))


@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
def test_identity_size_is_not_resampled(resize):
    img = RNG.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    rgb = prepare(img, Preprocess(width=50, height=40, resize=resize))
    assert np.array_equal(rgb, img[:, :, ::-1])
    strided = np.repeat(img, 2, axis=1)[:, ::2]  # same pixels, not C-contiguous
    bgr = prepare(strided, Preprocess(width=50, height=40, resize=resize, color="bgr"))
    assert np.array_equal(bgr, img) and bgr.flags.c_contiguous


@pytest.mark.parametrize("h,w", [(30, 60), (60, 30), (64, 64), (10, 200), (333, 17), (1, 1)])
@pytest.mark.parametrize("color", ["rgb", "gray"])
def test_letterbox_geometry_and_padding(h, w, color):
    pre = Preprocess(width=64, height=48, resize="letterbox", color=color, pad_value=114)
    scale, top, left, nh, nw = letterbox_geometry(h, w, pre)
    assert scale == min(64 / w, 48 / h)
    assert (nh, nw) == (min(48, max(1, int(np.floor(h * scale + 0.5)))),
                        min(64, max(1, int(np.floor(w * scale + 0.5)))))
    assert top == (48 - nh) // 2 and left == (64 - nw) // 2
    out = prepare(solid(h, w), pre)
    inside = np.zeros((48, 64), bool)
    inside[top:top + nh, left:left + nw] = True
    fill = [gray_of(BGR)] if color == "gray" else list(BGR[::-1])
    assert (out[inside] == np.array(fill, np.uint8)).all()
    assert (out[~inside] == 114).all()


def test_letterbox_content_is_the_resized_image():
    img = RNG.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    pre = Preprocess(width=64, height=64, resize="letterbox", color="bgr")
    _, top, left, nh, nw = letterbox_geometry(90, 120, pre)
    assert (top, left, nh, nw) == (8, 0, 48, 64)
    out = prepare(img, pre)
    expected = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    assert np.array_equal(out[top:top + nh, left:left + nw], expected)


@settings(max_examples=200, deadline=None)
@given(h=st.integers(1, 5000), w=st.integers(1, 5000), th=st.integers(1, 1024), tw=st.integers(1, 1024))
def test_letterbox_geometry_properties(h, w, th, tw):
    pre = Preprocess(width=tw, height=th, resize="letterbox")
    scale, top, left, nh, nw = letterbox_geometry(h, w, pre)
    assert 1 <= nh <= th and 1 <= nw <= tw
    assert nh == th or nw == tw  # fits one side exactly
    assert abs(nh - h * scale) <= 0.5 + 1e-9 or nh == 1
    assert abs(nw - w * scale) <= 0.5 + 1e-9 or nw == 1
    assert 0 <= (th - nh) - 2 * top <= 1 and 0 <= (tw - nw) - 2 * left <= 1


def test_bad_inputs_are_poison_with_a_reason():
    pre = Preprocess(width=8, height=8)
    with pytest.raises(UnsupportedImage, match="uint8"):
        prepare(np.zeros((4, 4, 3), np.uint16), pre)
    with pytest.raises(UnsupportedImage, match="shape"):
        prepare(np.zeros((4, 4, 2), np.uint8), pre)
    with pytest.raises(ConfigError, match="pad_value"):
        prepare(np.zeros((4, 4, 3), np.uint8), Preprocess(width=8, height=8, resize="letterbox", pad_value=300))


def normalize_reference(batch: np.ndarray, pre: Preprocess) -> np.ndarray:
    """Per channel, one at a time: a different route to the same float32 numbers."""
    n, h, w, c = batch.shape
    if pre.dtype == "uint8":
        out = batch.copy()
    else:
        out = np.empty(batch.shape, np.float32)
        for ch in range(c):
            x = batch[..., ch].astype(np.float32) * np.float32(pre.scale)
            if pre.mean:
                x = x - np.float32(pre.mean[ch % len(pre.mean)])
            if pre.std:
                x = x / np.float32(pre.std[ch % len(pre.std)])
            out[..., ch] = x
        out = out.astype(np.float16) if pre.dtype == "float16" else out
    return np.stack([out[..., ch] for ch in range(c)], axis=1) if pre.layout == "nchw" else out


NORMALIZE_CASES = [
    dict(color=color, layout=layout, dtype=dtype, **norm)
    for color in ("rgb", "gray")
    for layout in ("nchw", "nhwc")
    for dtype in ("float32", "float16")
    for norm in ({}, {"scale": 1 / 255}, {"scale": 1 / 255, "mean": (0.485, 0.456, 0.406)[: 1 if color == "gray" else 3],
                                           "std": (0.229, 0.224, 0.225)[: 1 if color == "gray" else 3]},
                 {"mean": (127.5,), "std": (127.5,)})
] + [dict(color=c, layout=lay, dtype="uint8") for c in ("rgb", "gray") for lay in ("nchw", "nhwc")]


@pytest.mark.parametrize("case", NORMALIZE_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_normalize_matches_reference(case):
    pre = Preprocess(width=5, height=4, **case)
    batch = RNG.integers(0, 256, (3, *pre.hwc_shape), dtype=np.uint8)
    out = normalize(batch, pre)
    assert out.dtype == np.dtype(pre.dtype) and out.shape == (3, *pre.model_input_shape)
    assert out.flags.c_contiguous
    assert np.array_equal(out, normalize_reference(batch, pre))


def test_normalize_rejects_the_wrong_shape():
    with pytest.raises(ValueError, match="uint8"):
        normalize(np.zeros((1, 4, 5, 1), np.uint8), Preprocess(width=5, height=4))

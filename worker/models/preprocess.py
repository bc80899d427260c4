"""Pre-processing: what the decode threads do to an image, and the reference of what the device does.

The work is split so that tensors cross to the GPU as uint8 (a quarter of the bytes of float32):

- ``prepare`` runs on the CPU, in the decode thread pool (OpenCV releases the GIL): colour conversion
  and resize, giving one uint8 HWC image of exactly ``pre.hwc_shape`` in the colour order ``pre.color``.
- ``normalize`` is the NumPy reference of the device-side step (layout, dtype, ``(x * scale - mean) / std``)
  that worker.models.graph puts in front of the model, so that it runs inside ONNX Runtime / TensorRT.
  The engines never call it on the hot path; tests and the CPU debugging tools do.

Conventions of ``prepare`` (chosen so results are reproducible and cheap):

1. Input is uint8, (H, W), (H, W, 1), (H, W, 3) BGR or (H, W, 4) BGRA, as the decoder gives it.
2. Channel reduction happens before the resize (BGR/BGRA -> gray, BGRA -> BGR/RGB), so the resize moves
   fewer bytes; channel expansion (gray -> 3 channels) and the BGR -> RGB swap happen after it, on the
   smaller image. Both orders give the same pixels for swaps and expansion (they are per-pixel copies).
3. Resample with ``cv2.INTER_AREA`` when no side grows (anti-aliased shrink), ``cv2.INTER_LINEAR``
   otherwise; no resample at all when the size already matches.
4. ``letterbox`` scales by ``min(W / w, H / h)``, rounds each side to the nearest pixel (at least 1, at
   most the target), centres the result (odd padding leaves the extra row/column at the bottom/right) and
   fills the rest with ``pre.pad_value``.
"""

from __future__ import annotations

import cv2
import numpy as np

from worker.errors import ConfigError, UnsupportedImage
from worker.models.spec import Preprocess


def letterbox_geometry(h: int, w: int, pre: Preprocess) -> tuple[float, int, int, int, int]:
    """Where an h x w image lands in the letterboxed canvas: (scale, pad_top, pad_left, new_h, new_w).

    Clients that map model outputs (boxes, keypoints) back to the original image need exactly these
    numbers: original = (canvas - pad) / scale.
    """
    if h < 1 or w < 1:
        raise UnsupportedImage(f"image has an empty side ({w}x{h}); nothing to resize")
    scale = min(pre.width / w, pre.height / h)
    # floor(x + 0.5), not round(): Python's round() goes to the even neighbour on .5 ties.
    new_w = min(pre.width, max(1, int(w * scale + 0.5)))
    new_h = min(pre.height, max(1, int(h * scale + 0.5)))
    return scale, (pre.height - new_h) // 2, (pre.width - new_w) // 2, new_h, new_w


def placement(h: int, w: int, pre: Preprocess) -> tuple[int, int, int, int]:
    """(top, left, new_h, new_w): where an h x w image lands in the model's input canvas, and at what size.
    The CPU path (``prepare``) and the GPU resize kernel (worker.decode.resize_kernel) both use it."""
    if pre.resize == "stretch":
        return 0, 0, pre.height, pre.width
    _, top, left, new_h, new_w = letterbox_geometry(h, w, pre)
    return top, left, new_h, new_w


def _resize(image: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    h, w = image.shape[:2]
    if (h, w) == (new_h, new_w):
        return image
    interpolation = cv2.INTER_AREA if new_h <= h and new_w <= w else cv2.INTER_LINEAR
    out = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    # cv2 drops a trailing channel axis of 1; callers only pass 2-D or 3-channel images, but be sure.
    return out.reshape((new_h, new_w) + image.shape[2:])


def _to_channels(image: np.ndarray, pre: Preprocess) -> tuple[np.ndarray, bool]:
    """Reduce channels before the resize. Returns (image, already_in_rgb_order)."""
    if image.dtype != np.uint8:
        raise UnsupportedImage(f"pre-processing expects uint8 pixels, got {image.dtype} "
                               f"(the decoder should have converted or rejected it)")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return image, False
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise UnsupportedImage(f"pre-processing expects a gray, BGR or BGRA image, got shape {image.shape}")
    if image.shape[2] == 4:
        if pre.color == "gray":
            return cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY), False
        # One pass drops alpha and, for rgb, swaps the order too.
        code = cv2.COLOR_BGRA2RGB if pre.color == "rgb" else cv2.COLOR_BGRA2BGR
        return cv2.cvtColor(image, code), pre.color == "rgb"
    if pre.color == "gray":
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), False
    return image, False


def prepare(image: np.ndarray, pre: Preprocess) -> np.ndarray:
    """One decoded image -> uint8, C-contiguous, shape ``pre.hwc_shape``, colour order ``pre.color``."""
    image, in_rgb = _to_channels(image, pre)
    h, w = image.shape[:2]
    if pre.resize == "stretch":
        out = _resize(image, pre.height, pre.width)
    else:
        if not 0 <= pre.pad_value <= 255:
            raise ConfigError(f"preprocess.pad_value={pre.pad_value} must be within 0..255 (uint8 canvas)")
        top, left, new_h, new_w = placement(h, w, pre)
        out = np.full((pre.height, pre.width) + image.shape[2:], pre.pad_value, dtype=np.uint8)
        out[top:top + new_h, left:left + new_w] = _resize(image, new_h, new_w)
    if pre.color == "gray":
        out = out.reshape(pre.hwc_shape)
    elif out.ndim == 2:
        out = cv2.cvtColor(out, cv2.COLOR_GRAY2BGR)  # replicate gray into all three channels
    elif pre.color == "rgb" and not in_rgb:
        out = cv2.cvtColor(out, cv2.COLOR_BGR2RGB)
    # The identity paths may hand back the caller's array, possibly strided (a crop, a channel view);
    # C order lets the batcher copy it into its buffer in one memcpy. Fresh arrays pass through as is.
    return np.ascontiguousarray(out)


def _per_channel(values: tuple[float, ...]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def normalize(batch: np.ndarray, pre: Preprocess) -> np.ndarray:
    """Reference of the device-side step: uint8 (N, H, W, C) -> the model's input tensor.

    Computes ``((x * scale) - mean) / std`` per channel in float32, in that order and with those float32
    constants, exactly as the ONNX nodes of worker.models.graph do; then the layout and the dtype.
    """
    expected = pre.hwc_shape
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[1:] != expected:
        raise ValueError(f"normalize expects uint8 (N, {', '.join(map(str, expected))}), "
                         f"got {batch.dtype} {batch.shape}")
    if pre.dtype == "uint8":
        x = batch
    else:
        x = batch.astype(np.float32)
        if pre.scale != 1.0:
            x = x * np.float32(pre.scale)
        if pre.mean:
            x = x - _per_channel(pre.mean)
        if pre.std:
            x = x / _per_channel(pre.std)
    if pre.layout == "nchw":
        x = x.transpose(0, 3, 1, 2)
    if pre.dtype == "float16":
        x = x.astype(np.float16)
    return np.ascontiguousarray(x)

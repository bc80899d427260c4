"""Generated sample images for `worker demo`, the bench and tests: varied sizes, formats and modes.

Content is smooth gradients plus shapes plus noise, seeded, so JPEG sizes and decode costs are close to
those of photographs rather than of flat colour.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

FORMATS = ("jpeg", "png", "webp", "bmp", "tiff")
_EXT = {"jpeg": ".jpg", "png": ".png", "webp": ".webp", "bmp": ".bmp", "tiff": ".tiff"}


def synth_image(rng: np.random.Generator, width: int, height: int, channels: int) -> np.ndarray:
    """A uint8 image (BGR, BGRA or gray) with gradients, a few shapes and sensor-like noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.empty((height, width, 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(0.5, 4.0), rng.uniform(0.5, 4.0), rng.uniform(0, 6.28)
        base[..., c] = 127.5 + 100 * np.sin(fx * 6.28 * x / width + phase) * np.cos(fy * 6.28 * y / height)
    img = base.clip(0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(2, 6))):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.circle(img, centre, int(rng.integers(2, max(3, min(width, height) // 3))), colour, -1)
    noise = rng.normal(0, 6, img.shape)
    img = (img.astype(np.float32) + noise).clip(0, 255).astype(np.uint8)
    if channels == 1:
        return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    if channels == 4:
        alpha = rng.integers(128, 256, (height, width, 1), dtype=np.uint8)
        return np.concatenate([img, alpha], axis=2)
    return img


def encode(image: np.ndarray, fmt: str, quality: int = 90) -> bytes:
    params: list[int] = []
    if fmt == "jpeg":
        params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    elif fmt == "webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, 101]  # 101: lossless, so tests can compare exact pixels
    ok, buf = cv2.imencode(_EXT[fmt], image, params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {image.shape} image as {fmt}")
    return buf.tobytes()


def sample_images(n: int, seed: int = 0, formats: Sequence[str] = FORMATS,
                  sizes: Sequence[tuple[int, int]] | None = None) -> list[tuple[str, bytes]]:
    """``n`` (name, encoded bytes) pairs cycling through formats and modes, with varied sizes."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        fmt = formats[i % len(formats)]
        # JPEG and BMP carry no alpha in OpenCV's encoders: use gray or colour for them.
        channels = (1, 3, 4)[int(rng.integers(0, 3))]
        if fmt in ("jpeg", "bmp") and channels == 4:
            channels = 3
        w, h = sizes[i % len(sizes)] if sizes else (int(rng.integers(24, 400)), int(rng.integers(24, 300)))
        out.append((f"sample-{i:05d}{_EXT[fmt]}", encode(synth_image(rng, w, h, channels), fmt)))
    return out

"""Decode stage: message value → one pre-processed uint8 tensor per model. Runs in a bounded thread pool.

OpenCV releases the GIL while it decodes and resizes, so a thread pool scales over cores without the
pickling cost of processes. Everything here is synchronous and raises ``PoisonMessage`` subclasses for
bad input, each with a specific reason code and a message that says what was wrong.

Order of checks, cheapest first, so a decompression bomb is refused before any pixel is allocated:
size of the value → envelope → header (format, dimensions, depth, colour model) → coded data against the
header (JPEG scan count and end marker, bytes enough for the pixels) → full decode → decoded dimensions
equal the header's.

16-bit PNG and TIFF are decoded as uint16 and keep the high byte of each sample (``v >> 8``): what libpng's
``png_set_strip_16`` and so OpenCV's own 8-bit reading of a 16-bit PNG give, and the same for every format
and channel count (OpenCV's 8-bit reading of a 16-bit RGB TIFF rounds ``v * 255 / 65535`` instead, one
higher or lower for a quarter of all values). Each 8-bit value gets 256 consecutive 16-bit ones, and data
widened from 8 bits (``v * 257``) comes back exactly; 12-bit data stored in 16-bit samples comes out dark
(0-15): there is no per-model choice of scaling yet.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

# OpenCV's own pixel limit is 2**30; ours (max_pixels) is checked earlier from the header. Set theirs
# too, before cv2 is imported, so that no path through OpenCV can allocate more than a sane image.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 28))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

# OpenCV logs a multi-line error for every bad image it is given; each of those is already reported
# by us, once, as a structured log line and a DLQ record with the reason, so its own logger stays quiet.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
# Our decode pool is the parallelism (decode_threads per intake process, sized with the intake count to
# the CPUs the pod may use). OpenCV's own pool inside each call (a thread per core of the node, per
# process) would add K intakes x cores threads; on an H200 host (16 cores) one thread against OpenCV's
# default made no measurable difference to throughput (docs/benchmarks.md, runs 8-9): thread hygiene,
# not a speed-up.
cv2.setNumThreads(1)

from worker.errors import MalformedEnvelope, UndecodableImage, UnsupportedImage  # noqa: E402
from worker.decode.headers import (DEFAULT_MAX_JPEG_SCANS, ImageInfo, check_coded_data, check_limits,  # noqa: E402
                                   check_size, check_supported, sniff)
from worker.models.preprocess import prepare  # noqa: E402
from worker.models.spec import PipelineSpec  # noqa: E402

CORRELATION_HEADERS = ("correlation-id", "correlation_id", "x-correlation-id", "traceparent")
# Decoding to BGR (or gray, when every model wants gray) rather than IMREAD_UNCHANGED: models never use
# alpha, palette and gray inputs come out ready to use, and OpenCV applies the EXIF orientation, so phone
# photos are upright (IMREAD_UNCHANGED ignores it).
_COLOR_FLAGS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                8: cv2.IMREAD_REDUCED_COLOR_8}
_GRAY_FLAGS = {1: cv2.IMREAD_GRAYSCALE, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
               8: cv2.IMREAD_REDUCED_GRAYSCALE_8}


@dataclass(frozen=True)
class Decoded:
    inputs: tuple[np.ndarray, ...]  # one uint8 HWC array per model of the pipeline
    width: int
    height: int
    format: str
    correlation_id: str | None
    decode_s: float


@dataclass(frozen=True)
class Encoded:
    """A message checked up to its image header (size, envelope, format, dimensions), not decoded: what
    the GPU thread decodes itself when ``decoder=nvimgcodec``."""

    data: bytes | memoryview  # a view of a ring slot in the GPU process (worker.gpu.link)
    info: ImageInfo
    correlation_id: str | None
    decode_s: float  # time of the checks

    @property
    def width(self) -> int:
        return self.info.width

    @property
    def height(self) -> int:
        return self.info.height

    @property
    def format(self) -> str:
        return self.info.format


def header_value(headers: Sequence[tuple[str, bytes]] | None, names: Sequence[str]) -> str | None:
    for key, value in headers or ():
        if key.lower() in names and value is not None:
            return value.decode("utf-8", "replace")
    return None


def unwrap_envelope(value: bytes, headers: Sequence[tuple[str, bytes]] | None) -> tuple[bytes, str | None]:
    """Return (image bytes, correlation id).

    A value is either the encoded image itself, or a JSON envelope (header ``content-type:
    application/json``, or a value starting with ``{``): ``{"image": "<base64>", "correlation_id": "..."}``.
    """
    correlation = header_value(headers, CORRELATION_HEADERS)
    if not is_envelope(value, headers):
        return value, correlation
    try:
        doc = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedEnvelope(f"JSON envelope does not parse: {exc}") from None
    if not isinstance(doc, dict):
        raise MalformedEnvelope(f"JSON envelope must be an object, got {type(doc).__name__}")
    image = doc.get("image")
    if not isinstance(image, str) or not image:
        raise MalformedEnvelope("JSON envelope needs a non-empty base64 string field 'image'; "
                                f"fields present: {sorted(doc)}")
    try:
        data = base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedEnvelope(f"envelope field 'image' is not valid base64: {exc}") from None
    cid = doc.get("correlation_id", correlation)
    if cid is not None and not isinstance(cid, (str, int)):
        raise MalformedEnvelope(f"envelope field 'correlation_id' must be a string, got {type(cid).__name__}")
    return data, (str(cid) if cid is not None else None)


def reduction_factor(info: ImageInfo, targets: Sequence[tuple[int, int]]) -> int:
    """Largest DCT-domain reduction (1/2, 1/4, 1/8) that still leaves every model's input size covered.

    libjpeg can decode a JPEG at 1/2, 1/4 or 1/8 scale by skipping DCT coefficients: several times less
    work when a 12-megapixel photo feeds a 224x224 model.
    """
    if info.format != "jpeg":
        return 1
    need_w = max(w for w, _ in targets)
    need_h = max(h for _, h in targets)
    for factor in (8, 4, 2):
        if info.width // factor >= need_w and info.height // factor >= need_h:
            return factor
    return 1


def inspect(data: bytes, max_bytes: int, max_pixels: int,
            max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS) -> ImageInfo:
    """Checks short of decoding: size, format, dimensions against max_pixels, sample depth, colour model,
    then the coded data against the header (scans, end marker, enough bytes for the pixels)."""
    check_size(len(data), max_bytes)
    info = sniff(data)
    check_limits(info, max_pixels)
    check_supported(info)
    check_coded_data(data, info, max_jpeg_scans)
    return info


def size_mismatch(info: ImageInfo, h: int, w: int) -> str:
    """Why a decoded h x w image does not match its header (either decoder), or "" when it does. Swapped
    sides are fine: the decoder applied the EXIF orientation."""
    if (h, w) in ((info.height, info.width), (info.width, info.height)):
        return ""
    return f"{info.format} header says {info.width}x{info.height} but decoded {w}x{h}"


def decode_image(data: bytes, max_bytes: int, max_pixels: int, reduce: int = 1,
                 info: ImageInfo | None = None, gray: bool = False) -> np.ndarray:
    """Bytes → uint8 array, BGR (H, W, 3), or gray (H, W) if ``gray``. Raises PoisonMessage."""
    info = info or inspect(data, max_bytes, max_pixels)
    flag = (_GRAY_FLAGS if gray else _COLOR_FLAGS)[reduce]
    if info.bit_depth == 16:
        # ANYDEPTH keeps uint16 (converted below, the same way for every format); unlike IMREAD_UNCHANGED
        # it still applies the EXIF orientation and gives gray or BGR.
        flag |= cv2.IMREAD_ANYDEPTH
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    except cv2.error as exc:
        raise UndecodableImage(f"{info.format} {info.width}x{info.height}: OpenCV failed: {exc.msg.strip()}") \
            from None
    if image is None:
        raise UndecodableImage(f"{info.format} {info.width}x{info.height} header is valid but the image data "
                               "could not be decoded (truncated or corrupt)")
    if image.dtype == np.uint16 and info.bit_depth == 16:
        image = np.right_shift(image, 8, out=image).astype(np.uint8)  # in place: one 8-bit copy, no temporary
    if image.dtype != np.uint8:
        raise UnsupportedImage(f"{info.format} decoded to {image.dtype}; only 8- and 16-bit images are supported")
    h, w = image.shape[:2]
    mismatch = size_mismatch(info, h, w) if reduce == 1 else ""
    if mismatch:
        raise UndecodableImage(mismatch)
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels not in (1, 3, 4):
        raise UnsupportedImage(f"{info.format} image has {channels} channels; supported: gray, RGB, RGBA")
    return image


def is_envelope(value: bytes | None, headers: Sequence[tuple[str, bytes]] | None) -> bool:
    """Whether ``unwrap_envelope`` would parse JSON (base64 of up to max_bytes: work for the pool, not
    the event loop)."""
    if (value or b"")[:1] == b"{":
        return True
    return (header_value(headers, ("content-type",)) or "").split(";")[0].strip().lower() == "application/json"


def inspect_message(value: bytes | None, headers: Sequence[tuple[str, bytes]] | None, max_bytes: int,
                    max_pixels: int, max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS) -> Encoded:
    """Every check short of decoding: value size, envelope, image header against the limits, coded data
    against the header. A raw image costs ~10 us here (a 76 KB baseline JPEG; a progressive one of 10
    scans ~20 us), cheap enough for the event loop."""
    started = time.perf_counter()
    value = value or b""
    check_size(len(value), max_bytes)  # before the envelope: base64 inflates nothing we must read
    data, correlation = unwrap_envelope(value, headers)
    info = inspect(data, max_bytes, max_pixels, max_jpeg_scans)
    return Encoded(data, info, correlation, time.perf_counter() - started)


def gpu_decodable(encoded: Encoded) -> bool:
    """Whether decoder=nvimgcodec sends this image to the GPU: a JPEG (what nvJPEG accelerates) that is
    complete, i.e. has an end-of-image marker after its last start-of-scan. nvJPEG decodes a truncated
    JPEG without complaint (the missing rows come out gray) where OpenCV refuses it; sending those to
    OpenCV keeps the verdicts, and so the DLQ, the same for both decoders (``inspect`` refuses only the
    grossly short ones, ``truncated_image``, and more scans than max_jpeg_scans, below nvImageCodec's own
    limit of 256). 12- and 16-bit JPEGs never get here: ``check_supported`` refuses them. Everything else
    (PNG, BMP, TIFF, WebP, 16-bit included) is decoded by OpenCV in the pool, as with decoder=cpu:
    nvImageCodec decodes those formats on the CPU anyway, more leniently than OpenCV
    (tests/gpu/test_gpu_decode.py)."""
    if encoded.info.format != "jpeg":
        return False
    data = encoded.data
    # Nearly every JPEG ends in its EOI: then no scan can follow it, and the backward search for the last
    # SOS below (through the whole entropy-coded data, most of an image: 15% of an intake's event loop on
    # an H100 host, docs/benchmarks.md run 28) is not needed. ``inspect`` found the first SOS already.
    if data.endswith(b"\xff\xd9"):
        return encoded.info.data_at > 0
    sos = data.rfind(b"\xff\xda")  # entropy-coded data cannot hold 0xFFD9 or 0xFFDA: 0xFF is stuffed
    return sos > 0 and data.rfind(b"\xff\xd9") > sos


def decode_encoded(encoded: Encoded, pipeline: PipelineSpec, max_bytes: int, max_pixels: int,
                   reduced: bool = False) -> tuple[np.ndarray, ...]:
    """A checked message -> one pre-processed uint8 HWC array per model (OpenCV). Raises PoisonMessage."""
    info = encoded.info
    reduce = 1
    if reduced:
        reduce = reduction_factor(info, [(m.preprocess.width, m.preprocess.height) for m in pipeline.models])
    gray = all(m.preprocess.color == "gray" for m in pipeline.models)
    image = decode_image(encoded.data, max_bytes, max_pixels, reduce, info, gray)
    return tuple(prepare(image, m.preprocess) for m in pipeline.models)


def decode_message(value: bytes | None, headers: Sequence[tuple[str, bytes]] | None, pipeline: PipelineSpec,
                   max_bytes: int, max_pixels: int, reduced: bool = False,
                   max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS) -> Decoded:
    """The whole decode stage for one message (runs in the decode pool)."""
    started = time.perf_counter()
    encoded = inspect_message(value, headers, max_bytes, max_pixels, max_jpeg_scans)
    inputs = decode_encoded(encoded, pipeline, max_bytes, max_pixels, reduced)
    return Decoded(inputs, encoded.width, encoded.height, encoded.format, encoded.correlation_id,
                   time.perf_counter() - started)

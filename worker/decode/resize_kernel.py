"""The device half of pre-processing for GPU-decoded images: one CUDA kernel, compiled at start-up.

nvImageCodec leaves each decoded image in device memory at its own size (RGB, interleaved, pitched).
The models want ``pre.hwc_shape`` uint8 rows in one batch buffer. ``resize_rows`` does, per output
pixel, what ``worker.models.preprocess.prepare`` does on the CPU, so both decoders feed the same model
the same image (within rounding; the GPU tests compare them):

- placement: stretch, or letterbox (``letterbox_geometry``; the rest of the canvas is ``pad_value``);
- resampling: area averaging when no side grows (OpenCV's ``INTER_AREA``: each output pixel is the
  mean of the source area it covers, fractional edges weighted), bilinear with half-pixel centres
  otherwise (``INTER_LINEAR``), a plain copy at equal size;
- colour: RGB kept, or swapped to BGR, or gray with OpenCV's fixed-point weights (0.299, 0.587, 0.114).

The CPU path reduces channels before resizing and OpenCV rounds in fixed point: pixels may differ by
a few levels, never more (tests/gpu/test_gpu_decode.py bounds it).

One launch per model per batch: a descriptor table (one ``SOURCE_DTYPE`` row per image: where its
pixels are, its size, where it lands, which batch row) is copied to the device on the stream first,
and block row ``blockIdx.y`` handles image ``y``. Compiled with NVRTC for the device's exact
architecture (no CUDA toolkit needed at run time, only the NVRTC library of ``cuda-bindings``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from worker.errors import ConfigError
from worker.models.preprocess import placement
from worker.models.spec import Preprocess

# Must match ``struct Source`` below, field for field (8-byte pointer first: no padding, 40 bytes).
SOURCE_DTYPE = np.dtype([("ptr", "<u8"), ("pitch", "<i4"), ("height", "<i4"), ("width", "<i4"),
                         ("top", "<i4"), ("left", "<i4"), ("new_h", "<i4"), ("new_w", "<i4"), ("row", "<i4")])
COLOR_CODES = {"rgb": 0, "bgr": 1, "gray": 2}
BLOCK = 256

SOURCE = r"""
struct Source {
    unsigned long long ptr;  // decoded image: RGB, interleaved, rows `pitch` bytes apart
    int pitch, height, width;
    int top, left, new_h, new_w;  // where it lands in the out_h x out_w canvas, and at what size
    int row;                      // batch row it is written to
};

__device__ __forceinline__ unsigned char to_u8(float v) {
    return (unsigned char)__float2int_rn(fminf(fmaxf(v, 0.0f), 255.0f));
}

extern "C" __global__ void resize_rows(const Source* sources, unsigned char* out, int out_h, int out_w,
                                       int out_c, int color, int pad_value) {
    const Source s = sources[blockIdx.y];
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= out_h * out_w) return;
    const int y = idx / out_w, x = idx - (idx / out_w) * out_w;
    unsigned char* dst = out + ((size_t)s.row * out_h * out_w + idx) * out_c;
    const int ry = y - s.top, rx = x - s.left;
    if (ry < 0 || rx < 0 || ry >= s.new_h || rx >= s.new_w) {
        for (int c = 0; c < out_c; ++c) dst[c] = (unsigned char)pad_value;
        return;
    }
    const unsigned char* src = (const unsigned char*)s.ptr;
    const float sy = (float)s.height / s.new_h, sx = (float)s.width / s.new_w;
    float r = 0.f, g = 0.f, b = 0.f;
    if (s.new_h <= s.height && s.new_w <= s.width) {
        // Area: the source rectangle [x0, x1) x [y0, y1) this pixel covers, edge pixels weighted by overlap.
        const float y0 = ry * sy, y1 = y0 + sy, x0 = rx * sx, x1 = x0 + sx;
        const int iy1 = min((int)ceilf(y1 - 1e-4f), s.height), ix1 = min((int)ceilf(x1 - 1e-4f), s.width);
        for (int iy = (int)floorf(y0); iy < iy1; ++iy) {
            const float wy = fminf(y1, iy + 1.f) - fmaxf(y0, (float)iy);
            const unsigned char* line = src + (size_t)iy * s.pitch;
            for (int ix = (int)floorf(x0); ix < ix1; ++ix) {
                const float w = wy * (fminf(x1, ix + 1.f) - fmaxf(x0, (float)ix));
                const unsigned char* p = line + ix * 3;
                r += w * p[0]; g += w * p[1]; b += w * p[2];
            }
        }
        const float inv = 1.f / (sy * sx);
        r *= inv; g *= inv; b *= inv;
    } else {
        // Bilinear, half-pixel centres, edges clamped (OpenCV's INTER_LINEAR).
        float fy = fmaxf((ry + 0.5f) * sy - 0.5f, 0.f), fx = fmaxf((rx + 0.5f) * sx - 0.5f, 0.f);
        int y0 = min((int)fy, s.height - 1), x0 = min((int)fx, s.width - 1);
        const int y1 = min(y0 + 1, s.height - 1), x1 = min(x0 + 1, s.width - 1);
        const float dy = fminf(fy - y0, 1.f), dx = fminf(fx - x0, 1.f);
        const unsigned char* p00 = src + (size_t)y0 * s.pitch + x0 * 3;
        const unsigned char* p01 = src + (size_t)y0 * s.pitch + x1 * 3;
        const unsigned char* p10 = src + (size_t)y1 * s.pitch + x0 * 3;
        const unsigned char* p11 = src + (size_t)y1 * s.pitch + x1 * 3;
        const float w00 = (1.f - dy) * (1.f - dx), w01 = (1.f - dy) * dx, w10 = dy * (1.f - dx), w11 = dy * dx;
        r = w00 * p00[0] + w01 * p01[0] + w10 * p10[0] + w11 * p11[0];
        g = w00 * p00[1] + w01 * p01[1] + w10 * p10[1] + w11 * p11[1];
        b = w00 * p00[2] + w01 * p01[2] + w10 * p10[2] + w11 * p11[2];
    }
    if (color == 2) {
        // OpenCV's BGR2GRAY in fixed point (weights 0.299, 0.587, 0.114 in 14 bits), on rounded channels
        dst[0] = (unsigned char)((to_u8(r) * 4899 + to_u8(g) * 9617 + to_u8(b) * 1868 + 8192) >> 14);
    } else if (color == 1) {
        dst[0] = to_u8(b); dst[1] = to_u8(g); dst[2] = to_u8(r);
    } else {
        dst[0] = to_u8(r); dst[1] = to_u8(g); dst[2] = to_u8(b);
    }
}
"""


def fill_sources(table: np.ndarray, images: Sequence[tuple[int, int, int, int]], rows: Sequence[int],
                 pre: Preprocess) -> np.ndarray:
    """Write one descriptor per image into ``table`` (``SOURCE_DTYPE``) and return the filled part.
    ``images`` holds (device pointer, row pitch in bytes, height, width) of RGB images; image ``j`` goes
    to batch row ``rows[j]``."""
    if len(images) > len(table) or len(rows) != len(images):
        raise ValueError(f"{len(images)} images, {len(rows)} rows, for a descriptor table of {len(table)}")
    for j, ((ptr, pitch, height, width), row) in enumerate(zip(images, rows)):
        if pitch < width * 3:
            raise ValueError(f"image {j}: row pitch {pitch} < width {width} x 3 channels")
        top, left, new_h, new_w = placement(height, width, pre)
        table[j] = (ptr, pitch, height, width, top, left, new_h, new_w, row)
    return table[:len(images)]


def nvrtc_compile(source: str, name: str, arch: tuple[int, int]) -> bytes:
    """CUDA C source -> a cubin for ``sm_<arch>`` with NVRTC (cuda-bindings)."""
    try:
        from cuda.bindings import nvrtc
    except ImportError as exc:
        raise ConfigError(f"decoder=nvimgcodec compiles its resize kernel with NVRTC: install cuda-bindings and "
                          f"nvidia-cuda-nvrtc (the gpu-decode extra) ({exc})") from None

    def check(result: Any, what: str, prog: Any = None) -> Any:
        err, *rest = result
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            log = ""
            if prog is not None:
                _, size = nvrtc.nvrtcGetProgramLogSize(prog)
                buf = b" " * size
                nvrtc.nvrtcGetProgramLog(prog, buf)
                log = buf.decode(errors="replace").strip()
            raise ConfigError(f"NVRTC {what} failed ({err}): {log}")
        return rest[0] if len(rest) == 1 else rest

    try:  # the first call loads libnvrtc (cuda-pathfinder looks in NVIDIA's wheels, then the system)
        created = nvrtc.nvrtcCreateProgram(source.encode(), f"{name}.cu".encode(), 0, [], [])
    except Exception as exc:  # noqa: BLE001 - DynamicLibNotFoundError and kin: no usable NVRTC here
        raise ConfigError(f"NVRTC is not usable: {type(exc).__name__}: {exc}; install nvidia-cuda-nvrtc "
                          f"(the gpu-decode extra) or a CUDA toolkit") from None
    prog = check(created, "create")
    try:
        options = [f"--gpu-architecture=sm_{arch[0]}{arch[1]}".encode(), b"--std=c++17", b"-default-device"]
        check(nvrtc.nvrtcCompileProgram(prog, len(options), options), "compile", prog)
        size = check(nvrtc.nvrtcGetCUBINSize(prog), "cubin size")
        cubin = b" " * size
        check(nvrtc.nvrtcGetCUBIN(prog, cubin), "cubin")
        return cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


class ResizeKernel:
    """``resize_rows`` loaded into the GPU thread's context; every launch is queued on its stream."""

    def __init__(self, runtime: Any) -> None:
        import pycuda.driver as cuda

        from worker.engines.cuda import cuda_errors

        self.runtime = runtime
        cubin = nvrtc_compile(SOURCE, "resize_rows", runtime.compute_capability)
        with cuda_errors("loading the resize kernel", runtime.device_name):
            self._module = cuda.module_from_buffer(cubin)
            self._function = self._module.get_function("resize_rows")
            self._function.prepare("PPiiiii")

    def launch(self, sources: int, count: int, out: int, pre: Preprocess) -> None:
        """Queue the resize of ``count`` images described at device address ``sources`` into ``out``."""
        from worker.engines.cuda import cuda_errors

        h, w, c = pre.hwc_shape
        grid = ((h * w + BLOCK - 1) // BLOCK, count)
        with cuda_errors("launching the resize kernel", self.runtime.device_name):
            self._function.prepared_async_call(grid, (BLOCK, 1, 1), self.runtime.stream, sources, out, h, w, c,
                                               COLOR_CODES[pre.color], int(pre.pad_value))

"""decoder=nvimgcodec on a real NVIDIA GPU: the resize kernel against OpenCV's pre-processing, nvImageCodec's
rows against the CPU decoder, the malformed corpus's verdicts, and Kafka -> nvImageCodec -> models -> Kafka.

Differences are printed (-s) and bounded; the bounds are what two JPEG decoders and two resamplers may
differ by (IDCT and chroma upsampling, float vs. fixed-point weights), not tuned to a run."""

from __future__ import annotations

import gc

from types import SimpleNamespace

import numpy as np
import pytest

from tests.gpu.test_gpu_runtime import IMAGENET, WHY_NOT, on_own_thread
from tests.helpers import (
    check_demo_result,
    exif_rotated_jpeg,
    produce,
    result_doc,
    source_of,
)
from tests.test_end_to_end import lossless_images, run_until
from worker.broker import create_topics
from worker.decode.message import decode_encoded, gpu_decodable, inspect_message
from worker.models import default_pipeline_path
from worker.models.preprocess import prepare
from worker.models.spec import ModelSpec, PipelineSpec, Preprocess, load_pipeline
from worker.samples import encode, synth_image
from worker.settings import Settings


def _why_no_nvimgcodec() -> str:
    if WHY_NOT:
        return WHY_NOT
    try:
        from cuda.bindings import nvrtc  # noqa: F401
        from nvidia import nvimgcodec  # noqa: F401
    except ImportError as exc:
        return f"nvImageCodec or cuda-bindings is not importable ({exc}); install the gpu-decode extra"
    return ""


WHY = _why_no_nvimgcodec()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(WHY), reason=f"needs an NVIDIA GPU and nvImageCodec: {WHY}")]

LIMITS = (1 << 24, 1 << 26)
CASES = {
    "imagenet-stretch": IMAGENET,
    "letterbox-bgr": Preprocess(width=224, height=160, resize="letterbox", pad_value=114, color="bgr"),
    "gray-64": Preprocess(width=64, height=64, color="gray"),
    "upscale": Preprocess(width=300, height=200),
    "mixed-up-down": Preprocess(width=700, height=100),
}


def _pipeline(pres: dict[str, Preprocess]) -> PipelineSpec:
    return PipelineSpec(models=tuple(ModelSpec(name=n, path="unused", preprocess=p) for n, p in pres.items()))


def _with_device(fn):
    """Run ``fn(runtime)`` on a thread of its own holding a started CUDA runtime."""
    from worker.engines import create_runtime

    def work():
        runtime = create_runtime(Settings(device="cuda"))
        runtime.start()
        try:
            return fn(runtime)
        finally:
            gc.collect()  # decoder objects in reference cycles free their device memory while the context lives
            runtime.stop()

    return on_own_thread(work)


def _diff(got: np.ndarray, want: np.ndarray) -> tuple[float, int, float]:
    d = np.abs(got.astype(np.int16) - want.astype(np.int16))
    return float(d.mean()), int(d.max()), float(np.percentile(d, 99.9))


def test_resize_kernel_matches_opencv_prepare_on_the_same_pixels():
    """The kernel alone: OpenCV's decoded RGB pixels copied to the device, resized by the kernel, against
    ``prepare`` of the same pixels on the CPU."""
    from worker.decode.resize_kernel import SOURCE_DTYPE, ResizeKernel, fill_sources

    rng = np.random.default_rng(2)
    sources = [synth_image(rng, w, h, 3) for w, h in ((640, 480), (97, 61), (224, 224), (50, 400))]

    def work(runtime):
        kernel = ResizeKernel(runtime)
        src_bufs = []
        for bgr in sources:
            rgb = runtime.host_buffer(bgr.shape, np.uint8)  # pinned, one per source: the copies are async
            rgb[...] = bgr[:, :, ::-1]
            buf = runtime.device_buffer(rgb.nbytes, "source")
            runtime.to_device(buf.ptr, rgb)
            src_bufs.append((buf.ptr, rgb.shape[1] * 3, rgb.shape[0], rgb.shape[1]))
        runtime.synchronize()
        table = runtime.host_buffer((len(sources),), SOURCE_DTYPE)
        table_dev = runtime.device_buffer(table.nbytes, "table")
        out = {}
        for name, pre in CASES.items():
            rows = runtime.device_buffer(len(sources) * int(np.prod(pre.hwc_shape)), name)
            filled = fill_sources(table, src_bufs, list(range(len(sources))), pre)
            runtime.to_device(table_dev.ptr, filled.view(np.uint8))
            kernel.launch(table_dev.ptr, len(sources), rows.ptr, pre)
            host = runtime.host_buffer((len(sources), *pre.hwc_shape), np.uint8)
            runtime.to_host(host, rows.ptr)
            runtime.synchronize()
            out[name] = host.copy()
        return out

    got = _with_device(work)
    worst = []
    for name, pre in CASES.items():
        for j, bgr in enumerate(sources):
            want = prepare(bgr, pre)
            mean, mx, p999 = _diff(got[name][j], want)
            print(f"{name:18s} source {bgr.shape[1]}x{bgr.shape[0]}: mean |diff| {mean:.3f}, max {mx}, p99.9 {p999}")
            worst.append((mx, name, j))
            assert mean < 0.3, (name, j)
            assert mx <= 1, (name, j)  # float weights vs OpenCV's fixed point; gray after vs before resizing
    print("worst:", max(worst))


def _decode_rows(pipeline: PipelineSpec, payloads: list[bytes], limits: tuple[int, int] = LIMITS,
                 backend: str = "default", views: bool = False):
    """Every payload through NvImageCodecDecoder.decode as Encoded (whatever gpu_decodable says). With
    ``views``: warmed up first (which finds out whether nvImageCodec takes views), each JPEG a memoryview
    of a writable buffer, as the GPU process's link hands them over (a view of the ring slot)."""
    from worker.decode.nvimgcodec import NvImageCodecDecoder

    encoded = [inspect_message(p, None, *limits) for p in payloads]
    if views:
        encoded = [type(e)(memoryview(bytearray(e.data)), e.info, e.correlation_id, e.decode_s) for e in encoded]

    def work(runtime):
        bufs = [runtime.device_buffer(len(payloads) * int(np.prod(m.preprocess.hwc_shape)), m.name)
                for m in pipeline.models]
        engines = [SimpleNamespace(spec=m, device_input=b.ptr) for m, b in zip(pipeline.models, bufs)]
        decoder = NvImageCodecDecoder(runtime, engines, len(payloads), pipeline, *limits, backend=backend)
        try:
            if views:
                decoder.warm_up(1)
                print(f"\nnvImageCodec takes views: {decoder._views}")
            kept, rejected = decoder.decode(encoded)
            hosts = [runtime.host_buffer((len(payloads), *m.preprocess.hwc_shape), np.uint8) for m in pipeline.models]
            for h, b in zip(hosts, bufs):
                runtime.to_host(h, b.ptr)
            runtime.synchronize()
            return kept, rejected, [h.copy() for h in hosts], decoder.fallbacks
        finally:
            decoder.close()

    return encoded, _with_device(work)


def test_after_warm_up_the_batches_alive_at_once_decode_into_the_warm_up_buffers():
    """warm_up(3): three batches staged back to back (two in flight and the prefetched one, as the GPU
    thread holds them) decode into images the warm-up allocated; none is allocated on the hot path. The
    stage times of those batches, against a decoder warmed with one batch, are printed (information)."""
    import time

    from worker.decode.nvimgcodec import NvImageCodecDecoder

    pipeline = _pipeline({"imagenet": IMAGENET})
    rng = np.random.default_rng(5)
    encoded = [inspect_message(encode(synth_image(rng, 640, 480, 3), "jpeg"), None, *LIMITS) for _ in range(16)]

    def ptr(image) -> int:
        return int(image.__cuda_array_interface__["data"][0])

    def work(runtime):
        buf = runtime.device_buffer(len(encoded) * int(np.prod(IMAGENET.hwc_shape)), "rows")
        engines = [SimpleNamespace(spec=pipeline.models[0], device_input=buf.ptr)]
        out = {}
        for batches in (1, 3):
            decoder = NvImageCodecDecoder(runtime, engines, len(encoded), pipeline, *LIMITS)
            try:
                decoder.warm_up(batches)
                warm = {ptr(image) for image in decoder._free}
                staged, ms = [], []
                for _ in range(3):
                    t = time.perf_counter()
                    staged.append(decoder.stage(encoded))
                    decoder.write(staged[-1])
                    runtime.synchronize()
                    ms.append(round((time.perf_counter() - t) * 1000, 2))
                out[batches] = (warm, [{ptr(image) for image in s.images} for s in staged], ms)
                for s in staged:
                    decoder.release(s)
            finally:
                decoder.close()
        return out

    out = _with_device(work)
    for batches, (warm, used, ms) in out.items():
        print(f"\nwarm_up({batches}): {len(warm)} images pooled; the next three batches' stage+write ms: {ms}")
    warm, used, _ = out[3]
    assert len(warm) == 3 * len(encoded)
    assert all(len(u) == len(encoded) and u <= warm for u in used)
    assert len(set().union(*used)) == 3 * len(encoded)  # three batches alive at once: three sets of buffers


# nvimgcodec_backend: every choice decodes the same rows. On the H200 (nvImageCodec 0.9) the CUDA backend
# alone cannot be created: that is a ConfigError naming the setting (the worker then decodes on the CPU)
@pytest.mark.parametrize("backend", ["default", "hardware", "cuda"])
def test_nvimgcodec_rows_are_close_to_the_cpu_decoders(backend):
    from worker.errors import ConfigError

    rng = np.random.default_rng(9)
    jpegs = [encode(synth_image(rng, 640, 480, 3), "jpeg") for _ in range(6)]
    jpegs.append(encode(synth_image(rng, 333, 517, 1), "jpeg"))  # gray JPEG, odd sizes
    pngs = [encode(synth_image(rng, 120, 90, c), "png") for c in (1, 3, 4)]
    pipeline = _pipeline(CASES)
    try:
        encoded, (kept, rejected, rows, fallbacks) = _decode_rows(pipeline, jpegs + pngs, backend=backend)
    except ConfigError as exc:
        assert f"nvimgcodec_backend={backend}" in str(exc) and "could not create a decoder" in str(exc)
        pytest.skip(f"this GPU has no nvImageCodec decoder for backend={backend}: {exc}")
    assert not rejected and sorted(kept) == list(range(len(encoded)))
    row_of = {item: row for row, item in enumerate(kept)}  # CPU-decoded (fallback) rows come first
    print(f"\nfallbacks to OpenCV: {fallbacks} of {len(encoded)}")
    for j, enc in enumerate(encoded):
        want = decode_encoded(enc, pipeline, *LIMITS)  # decoder=cpu
        for m, model in enumerate(pipeline.models):
            mean, mx, p999 = _diff(rows[m][row_of[j]], want[m])
            print(f"{enc.format} {enc.width}x{enc.height} -> {model.name:18s} mean |diff| {mean:.3f}, max {mx}, "
                  f"p99.9 {p999}")
            if enc.format == "png":
                assert mx <= 2  # lossless: only the resampler differs
            else:
                assert mean < 1.0 and p999 <= 4  # nvJPEG vs libjpeg-turbo: IDCT and chroma upsampling


def test_jpegs_handed_over_as_views_decode_to_the_same_rows_as_bytes():
    """The GPU process's link hands each JPEG to the decoder as a view of its ring slot (no copy; run 25).
    Whether this nvImageCodec decodes through the view or the decoder copies it first (``_views``, found at
    warm-up), the rows are exactly those of the same JPEGs as bytes."""
    rng = np.random.default_rng(11)
    jpegs = [encode(synth_image(rng, 640, 480, 3), "jpeg") for _ in range(5)]
    pipeline = _pipeline({"imagenet": IMAGENET})
    _, (kept, rejected, rows, fallbacks) = _decode_rows(pipeline, jpegs)
    _, (kept_v, rejected_v, rows_v, fallbacks_v) = _decode_rows(pipeline, jpegs, views=True)
    assert (kept_v, rejected_v, fallbacks_v) == (kept, rejected, fallbacks) == (list(range(5)), [], 0)
    np.testing.assert_array_equal(rows_v[0], rows[0])


def test_exif_orientation_is_applied_on_the_gpu_too():
    pipeline = _pipeline({"upright": Preprocess(width=20, height=40)})
    encoded, (kept, rejected, rows, fallbacks) = _decode_rows(pipeline, [exif_rotated_jpeg()])
    want = decode_encoded(encoded[0], pipeline, *LIMITS)[0]
    mean, mx, _ = _diff(rows[0][0], want)
    print(f"\nEXIF 6: mean |diff| {mean:.3f}, max {mx}, fallbacks {fallbacks}")
    assert kept == [0] and mean < 2.0


def test_malformed_inputs_get_the_cpu_decoders_verdicts():
    """Everything that passes the header checks goes to the GPU decoder: what OpenCV refuses must still be
    refused (with OpenCV's reason, via the fallback), what OpenCV decodes must not be refused."""
    from tests.corpus import (
        MAX_BYTES,
        MAX_PIXELS,
        damaged_but_decodable,
        malformed_corpus,
    )
    from worker.errors import PoisonMessage

    cases: list[tuple[str, bytes, str | None]] = []
    others = 0
    for name, data, reason in [*malformed_corpus(), *((n, d, None) for n, d in damaged_but_decodable())]:
        try:
            enc = inspect_message(data, None, MAX_BYTES, MAX_PIXELS)
        except PoisonMessage:
            continue  # refused before any decoder sees it
        if gpu_decodable(enc):
            cases.append((name, data, reason))
        else:
            others += 1  # decoded by OpenCV in the pool, as with decoder=cpu
    pipeline = _pipeline({"m": Preprocess(width=32, height=32)})
    payloads = [data for _, data, _ in cases]
    encoded, (kept, rejected, _, fallbacks) = _decode_rows(pipeline, payloads, (MAX_BYTES, MAX_PIXELS))
    got = {i: exc.reason for i, exc in rejected}
    mismatches = [(name, want, got.get(i)) for i, (name, _, want) in enumerate(cases) if got.get(i) != want]
    print(f"\n{len(cases)} cases go to the GPU decoder ({others} others to OpenCV); {len(rejected)} refused; "
          f"{fallbacks} via OpenCV; mismatches: {mismatches}")
    assert cases and not mismatches


@pytest.mark.parametrize("decoder, card_below", [("nvimgcodec", 0), ("hybrid", 0), ("hybrid", 64)])
async def test_kafka_nvimgcodec_kafka_n_in_n_out(settings, decoder, card_below):
    """Lossless 64x64 images through the demo pipeline (decoded by OpenCV in the pool, copied into device
    rows: results exact), plus 640x480 JPEGs decoded on the GPU (close to the CPU decoder); with hybrid,
    JPEGs decoded by a free decode thread instead (cpu-reduced) are close to that decoder; with
    hybrid_card_below, the card takes the JPEGs while fewer than that wait at the GPU thread."""
    n_lossless, n_jpeg = 400, 200
    settings = settings.replace(device="cuda", decoder=decoder, max_batch_size=64, hybrid_card_below=card_below)
    await create_topics(settings.bootstrap_servers, [(settings.input_topic, 4), (settings.output_topic, 4),
                                                    (settings.dlq_topic, 1)])
    blobs, pixels = lossless_images(n_lossless, seed=5)
    rng = np.random.default_rng(6)
    jpeg_pixels = [synth_image(rng, 640, 480, 3) for _ in range(n_jpeg)]
    jpegs = [encode(p, "jpeg") for p in jpeg_pixels]
    coords = await produce(settings.bootstrap_servers, settings.input_topic, blobs + jpegs, 4)
    n = n_lossless + n_jpeg
    (records,), worker, code = await run_until(settings, {settings.output_topic: n})
    assert code == 0 and worker.gpu.decodes_on_device
    assert len(records) == n and {source_of(r) for r in records} == set(coords)
    index = {c: i for i, c in enumerate(coords)}
    pipeline = load_pipeline(default_pipeline_path())
    worst = 0.0
    for rec in records:
        i = index[source_of(rec)]
        doc = result_doc(rec)
        if i < n_lossless:
            check_demo_result(doc, pixels[i])
        else:
            enc = inspect_message(jpegs[i - n_lossless], None, *LIMITS)
            means = np.array(doc["models"]["channel_means"]["outputs"]["means"]["data"], np.float32)
            diffs = []
            for reduced in ([False, True] if decoder == "hybrid" else [False]):
                want = decode_encoded(enc, pipeline, *LIMITS, reduced)
                ref = want[0].reshape(-1, 3).mean(axis=0)  # RGB rows of the CPU decoder
                diffs.append(float(np.abs(means - ref).max()))
            worst = max(worst, min(diffs))
    sizes = [result_doc(r)["batch_size"] for r in records]
    print(f"\n{n} results, decoded on {worker.gpu.runtime.device_name}: mean batch {sum(sizes) / len(sizes):.1f}, "
          f"OpenCV fallbacks {worker.gpu.device_decoder.fallbacks if worker.gpu.device_decoder else '?'}; "
          f"JPEG channel means vs CPU decoder: max |diff| {worst:.3f}")
    assert worst < 1.5

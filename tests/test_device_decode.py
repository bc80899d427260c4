"""decoder=nvimgcodec without a GPU: the pure parts (descriptor table, size checks), the decoder's
orchestration against fakes of nvImageCodec and the CUDA runtime (row order, OpenCV fallback, poison),
the GPU thread's path for images decoded on the device, and the start-up fallback to CPU decoding,
end to end through the real broker. The CUDA side runs in tests/gpu/test_gpu_decode.py."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import re
import sys
import threading
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from tests.helpers import check_demo_result, produce, result_doc, source_of
from tests.test_end_to_end import lossless_images, run_until
from worker import log
from worker.broker import create_topics
from worker.engines.base import HOST_SETS, CpuRuntime
from worker.decode.nvimgcodec import (
    NvImageCodecDecoder,
    decoded_size_problem,
    decoder_factory,
    decoder_kwargs,
    warm_up_jpeg,
)
from worker.decode.resize_kernel import SOURCE, SOURCE_DTYPE, fill_sources
from worker.errors import ConfigError, ModelRejectedInput, PoisonMessage, UndecodableImage
from worker.decode.message import Encoded, decode_encoded, gpu_decodable, inspect_message
from worker.gpu.thread import GpuThread
from worker.gpu.requests import InferenceRequest, InferenceResult
from worker.metrics import Metrics
from worker.models import default_pipeline_path
from worker.models.spec import Preprocess, load_pipeline
from worker.samples import encode, synth_image

PIPELINE = load_pipeline(default_pipeline_path())


@pytest.fixture(autouse=True)
def _log_to_this_tests_stderr():
    log.configure("json", "warning", stream=sys.stderr)


# --- the descriptor table ---------------------------------------------------------------------------

def test_descriptor_dtype_matches_the_kernels_struct_field_for_field():
    body = re.search(r"struct Source \{(.*?)\};", SOURCE, re.DOTALL).group(1)
    fields = []
    for line in body.splitlines():
        decl = line.split("//")[0].strip().rstrip(";")
        if decl:
            ctype, names = decl.split(" ", 1) if not decl.startswith("unsigned") else ("u64", decl.split()[-1])
            fields += [(n.strip(), ctype) for n in names.split(",")]
    assert [n for n, _ in fields] == list(SOURCE_DTYPE.names)
    assert fields[0][1] == "u64" and all(t == "int" for _, t in fields[1:])
    assert SOURCE_DTYPE.itemsize == 8 + 4 * (len(fields) - 1) == 40  # no padding: C lays it out the same


def test_fill_sources_places_stretched_and_letterboxed_images_in_the_given_rows():
    table = np.zeros(4, SOURCE_DTYPE)
    images = [(0x1000, 640 * 3, 480, 640), (0x2000, 2048, 100, 50)]
    stretch = Preprocess(width=224, height=224)
    filled = fill_sources(table, images, [2, 0], stretch)
    assert len(filled) == 2
    assert filled[0].tolist() == (0x1000, 1920, 480, 640, 0, 0, 224, 224, 2)
    assert filled[1].tolist() == (0x2000, 2048, 100, 50, 0, 0, 224, 224, 0)
    box = Preprocess(width=224, height=224, resize="letterbox", pad_value=114)
    filled = fill_sources(table, images, [0, 1], box)
    assert filled[0].tolist()[4:] == (28, 0, 168, 224, 0)  # 640x480 -> 224x168, centred vertically
    assert filled[1].tolist()[4:] == (0, 56, 224, 112, 1)  # 50x100 -> 112x224, centred horizontally


def test_fill_sources_refuses_a_pitch_shorter_than_a_row_and_too_many_images():
    with pytest.raises(ValueError, match="pitch 100 < width 50"):
        fill_sources(np.zeros(2, SOURCE_DTYPE), [(1, 100, 10, 50)], [0], Preprocess(width=8, height=8))
    with pytest.raises(ValueError, match="3 images"):
        fill_sources(np.zeros(2, SOURCE_DTYPE), [(1, 30, 1, 10)] * 3, [0, 1, 2], Preprocess(width=8, height=8))


def _encoded(data: bytes) -> Encoded:
    return inspect_message(data, None, 1 << 24, 1 << 26)


def test_only_complete_jpegs_go_to_the_gpu_decoder():
    from PIL import Image

    jpeg = encode(synth_image(np.random.default_rng(4), 64, 48, 3), "jpeg")
    assert gpu_decodable(_encoded(jpeg))
    assert gpu_decodable(_encoded(jpeg + b"trailing bytes some cameras append"))
    assert not gpu_decodable(_encoded(jpeg[:len(jpeg) * 2 // 3]))  # truncated: OpenCV refuses it, nvJPEG would not
    assert not gpu_decodable(_encoded(encode(synth_image(np.random.default_rng(4), 64, 48, 3), "png")))
    # a photo with an EXIF thumbnail (a whole JPEG, end marker included) cut inside the main image's scan
    thumb = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(thumb, "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 1
    app1 = b"Exif\0\0" + exif.tobytes()[6:] + thumb.getvalue()
    photo = jpeg[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + jpeg[2:]
    assert gpu_decodable(_encoded(photo))
    assert not gpu_decodable(_encoded(photo[:len(photo) - 300]))


def test_a_jpeg_ending_in_its_end_marker_is_judged_without_searching_and_as_before():
    """The shortcut for a JPEG that ends in EOI gives what the search from the end gives, for every cut
    of a JPEG and of a photo with a thumbnail, with and without bytes after the end."""
    def searched(data: bytes) -> bool:  # the rule the shortcut must keep: an EOI after the last SOS
        sos = data.rfind(b"\xff\xda")
        return sos > 0 and data.rfind(b"\xff\xd9") > sos

    jpeg = encode(synth_image(np.random.default_rng(5), 96, 64, 3), "jpeg")
    first_sos = jpeg.find(b"\xff\xda")
    for end in range(first_sos + 40, len(jpeg) + 1, 7):
        for data in (jpeg[:end], jpeg[:end] + b"\xff\xd9", jpeg[:end] + b"tail"):
            try:
                encoded = _encoded(data)
            except PoisonMessage:
                continue  # refused before the GPU's question comes up
            assert gpu_decodable(encoded) == searched(data), (end, data[-6:])


def test_decoded_size_must_match_the_header_or_its_rotation():
    enc = _encoded(encode(np.zeros((30, 40, 3), np.uint8), "jpeg"))
    assert decoded_size_problem(enc, (30, 40, 3)) == ""
    assert decoded_size_problem(enc, (40, 30, 3)) == ""  # EXIF orientation applied
    assert "header says 40x30 but decoded 20x30" in decoded_size_problem(enc, (30, 20, 3))
    assert "expected H x W x 3 RGB" in decoded_size_problem(enc, (30, 40, 4))


# --- NvImageCodecDecoder against fakes of nvImageCodec and the runtime --------------------------------

class FakeImage:
    def __init__(self, ptr: int, h: int, w: int, pitch: int | None = None) -> None:
        self.shape = (h, w, 3)
        strides = None if pitch is None else (pitch, 3, 1)
        self.__cuda_array_interface__ = {"data": (ptr, False), "shape": self.shape, "strides": strides}


class FakeNv:
    """nvImageCodec as the decoder uses it: CodeStream refuses the values in ``refuse``; decode gives
    None for values that start with the PNG signature (as if it lacked the codec), an image otherwise."""

    def __init__(self, views: bool = True) -> None:
        self.calls: list[int] = []
        self.refuse: set[bytes] = set()
        self.views = views  # whether CodeStream takes a memoryview (else TypeError, as pybind11 refuses a type)
        self.sources: list[type] = []  # the type of each CodeStream's argument

    def CodeStream(self, data: bytes | memoryview):
        self.sources.append(type(data))
        if isinstance(data, memoryview):
            if not self.views:
                raise TypeError("__init__(): incompatible constructor arguments")
            data = bytes(data)  # what the real one reads through the view
        if data in self.refuse:
            raise RuntimeError("cannot parse")
        return data

    def decode(self, streams, images=None, params=None, cuda_stream=0):
        self.calls.append(len(streams))
        out = []
        for k, data in enumerate(streams):
            if data.startswith(b"\x89PNG"):
                out.append(None)
                continue
            info = _encoded(data).info
            out.append(FakeImage(0x10000 * (len(self.calls) * 100 + k), info.height, info.width))
        return out


class FakeRuntime:
    kind = "cuda"
    device_name = "fake"
    stream_handle = 7

    def __init__(self) -> None:
        self.copies: list[tuple[int, np.ndarray]] = []
        self.buffers: list[np.ndarray] = []
        self.synchronized = 0

    def host_buffer(self, shape, dtype):
        self.buffers.append(np.zeros(shape, dtype))
        return self.buffers[-1]

    def synchronize(self) -> None:
        self.synchronized += 1

    def to_device(self, dst: int, src: np.ndarray, what: str = "") -> None:
        self.copies.append((dst, src.copy()))


class FakeKernel:
    def __init__(self) -> None:
        self.launches: list[tuple[int, int, int, Preprocess]] = []

    def launch(self, sources: int, count: int, out: int, pre: Preprocess) -> None:
        self.launches.append((sources, count, out, pre))


def _fake_decoder(max_batch: int = 8) -> tuple[NvImageCodecDecoder, FakeRuntime, FakeKernel]:
    dec = NvImageCodecDecoder.__new__(NvImageCodecDecoder)  # __init__ needs CUDA; set what decode uses
    rt, kernel, nv = FakeRuntime(), FakeKernel(), FakeNv()
    engines = [SimpleNamespace(spec=m, device_input=0x100000 * (i + 1)) for i, m in enumerate(PIPELINE.models)]
    dec.runtime, dec.engines, dec.max_batch = rt, engines, max_batch
    dec.pipeline, dec.max_bytes, dec.max_pixels = PIPELINE, 1 << 24, 1 << 26
    dec.fallbacks, dec._nv, dec._decoder, dec._params, dec._kernel = 0, nv, nv, None, kernel
    dec._tables = itertools.cycle([[np.zeros(max_batch, SOURCE_DTYPE) for _ in engines] for _ in range(HOST_SETS)])
    dec._device_tables = [SimpleNamespace(ptr=0x900000 + i) for i in range(len(engines))]
    dec._pinned_free, dec._free, dec._last, dec._pool_batches = [], [], None, 2
    dec.backend, dec.options = "default", ""
    dec._pools, dec._staging = threading.Lock(), threading.Lock()
    return dec, rt, kernel


def test_nvimgcodec_backend_setting_becomes_the_decoders_backends_and_options():
    from worker import settings as settings_mod

    nv = SimpleNamespace(BackendKind=SimpleNamespace(HW_GPU_ONLY="hw", GPU_ONLY="gpu"),
                         Backend=lambda kind: ("backend", kind))
    assert decoder_kwargs(nv) == {}  # nvImageCodec's own choice, as before the setting
    assert decoder_kwargs(nv, "hardware") == {"backends": [("backend", "hw")]}
    opts = "nvjpeg_hw_decoder:preallocate_buffers=true"
    assert decoder_kwargs(nv, "cuda", opts) == {"backends": [("backend", "gpu")], "options": opts}
    with pytest.raises(ConfigError, match="nvimgcodec_backend='hybrid' is not one of"):
        decoder_kwargs(nv, "hybrid")
    s = settings_mod.load({}, environ={"WORKER_NVIMGCODEC_BACKEND": "Hardware", "WORKER_NVIMGCODEC_OPTIONS": opts})
    assert decoder_kwargs(nv, s.nvimgcodec_backend, s.nvimgcodec_options)["backends"] == [("backend", "hw")]
    with pytest.raises(ConfigError, match="nvimgcodec_backend"):
        settings_mod.load({}, environ={"WORKER_NVIMGCODEC_BACKEND": "fast"})


def test_rows_follow_request_order_across_gpu_decoded_fallback_and_poison_images():
    rng = np.random.default_rng(3)
    jpeg = [encode(synth_image(rng, 80, 60, 3), "jpeg") for _ in range(3)]
    png_image = synth_image(rng, 64, 64, 3)
    png = encode(png_image, "png")  # the fake nvImageCodec "cannot" decode PNG: OpenCV does it
    corrupt = _encoded(png)  # a valid PNG header, then nothing OpenCV can decode
    corrupt = Encoded(png[:60] + b"\0" * 40, corrupt.info, None, 0.0)
    pooled = tuple(np.full(m.preprocess.hwc_shape, 7, np.uint8) for m in PIPELINE.models)  # decoded in the pool
    items = [_encoded(jpeg[0]), _encoded(png), corrupt, _encoded(jpeg[1]), _encoded(jpeg[2]), _encoded(jpeg[0]),
             pooled]
    dec, rt, kernel = _fake_decoder()
    dec._nv.refuse.add(jpeg[2])  # nvImageCodec cannot parse it; OpenCV can

    kept, rejected = dec.decode(items)

    # rows: the CPU-decoded images first (the PNG, the JPEG nvImageCodec refused, the pool's), in request
    # order, then the three decoded on the device
    assert kept == [1, 4, 6, 0, 3, 5]
    assert [i for i, _ in rejected] == [2]
    assert dec._last.fallbacks == 2  # counted per batch too: the GPU thread reports it as a metric
    assert isinstance(rejected[0][1], UndecodableImage)
    assert dec.fallbacks == 2  # the PNG, and the JPEG nvImageCodec could not parse
    # per model: one table copy and one launch for the three GPU-decoded JPEGs, rows 3, 4, 5
    tables = [(dst, src.view(SOURCE_DTYPE)) for dst, src in rt.copies if 0x900000 <= dst < 0x900010]
    assert len(tables) == len(kernel.launches) == len(PIPELINE.models)
    for (dst, table), (sources, count, out, pre), engine in zip(tables, kernel.launches, dec.engines):
        assert sources == dst and count == 3 and out == engine.device_input and pre is engine.spec.preprocess
        assert table["row"].tolist() == [3, 4, 5]
        assert table["height"].tolist() == [60, 60, 60] and table["width"].tolist() == [80, 80, 80]
        assert table["pitch"].tolist() == [240, 240, 240]
    # CPU-decoded images: OpenCV's pre-processed pixels, rows 0..2 of every model in one copy
    want_png = decode_encoded(_encoded(png), PIPELINE, 1 << 24, 1 << 26)
    want_jpeg = decode_encoded(_encoded(jpeg[2]), PIPELINE, 1 << 24, 1 << 26)
    for m, engine in enumerate(dec.engines):
        copies = [(dst, src) for dst, src in rt.copies if engine.device_input <= dst < engine.device_input + 0x100000]
        assert len(copies) == 1 and copies[0][0] == engine.device_input
        rows = copies[0][1]
        assert rows.shape == (3, *engine.spec.preprocess.hwc_shape)
        for got, want in zip(rows, (want_png[m], want_jpeg[m], pooled[m])):
            np.testing.assert_array_equal(got.reshape(-1), want.reshape(-1))


def test_a_staged_batch_records_its_steps_and_they_add_up_to_its_host_time():
    """The early-batch log's ``decode_steps_ms``: code streams, nvImageCodec's call, the per-image loop
    and the CPU rows' copy, back to back (their sum is the stage's time), plus the thread's own CPU."""
    dec, _, _ = _fake_decoder()
    jpeg = _encoded(encode(np.zeros((20, 30, 3), np.uint8), "jpeg"))
    pooled = tuple(np.full(m.preprocess.hwc_shape, 9, np.uint8) for m in PIPELINE.models)
    staged = dec.stage([jpeg, pooled, jpeg])
    assert set(staged.steps) == {"streams", "nvimgcodec", "images", "rows", "cpu"}
    assert all(v >= 0 for v in staged.steps.values())
    wall = sum(v for k, v in staged.steps.items() if k != "cpu")
    assert wall == pytest.approx(staged.host_s, abs=1e-9)
    dec.release(staged)


def test_cpu_decoded_rows_keep_their_pinned_set_until_released():
    dec, rt, _ = _fake_decoder()
    pooled = tuple(np.full(m.preprocess.hwc_shape, 9, np.uint8) for m in PIPELINE.models)
    first = dec.stage([pooled])
    second = dec.stage([pooled])  # staged while the first is in flight: its own rows
    assert first.pinned is not None and second.pinned is not None
    assert all(a is not b for a, b in zip(first.pinned, second.pinned))
    first_set = first.pinned
    dec.release(first)
    assert first.pinned is None  # handed back on release ...
    third = dec.stage([pooled])
    assert third.pinned is first_set
    dec.release(second)
    dec.release(third)
    assert len(dec._pinned_free) == 2  # ... and reused: two sets were ever made


def test_warm_up_leaves_images_and_a_pinned_row_set_for_every_batch_alive_at_once():
    """Three batches alive at once (two in flight, one prefetched) after ``warm_up(3)``: each reuses
    images of the pool and takes a pinned row set from it; nothing is allocated for them. Before, the
    warm-up left one batch's images, so the second and third real batches allocated on the hot path."""
    dec, rt, _ = _fake_decoder(max_batch=4)
    calls: list = []
    real = dec._decoder.decode

    def spy(streams, images=None, params=None, cuda_stream=0):
        calls.append((len(streams), images))
        return real(streams, images=images, params=params, cuda_stream=cuda_stream)

    dec._decoder = SimpleNamespace(decode=spy)
    dec.warm_up(3)
    assert [n for n, _ in calls] == [4, 4, 4] and rt.synchronized == 1  # full batches, then one wait
    warm = {id(image) for image in dec._free}
    assert len(warm) == 12 and len(dec._pinned_free) == 3
    pinned = [id(s) for s in dec._pinned_free]
    made = len(rt.buffers)
    jpeg = _encoded(encode(np.zeros((20, 30, 3), np.uint8), "jpeg"))
    rows = tuple(np.full(m.preprocess.hwc_shape, 9, np.uint8) for m in PIPELINE.models)
    staged = [dec.stage([jpeg] * 4) for _ in range(3)] + [dec.stage([rows]) for _ in range(3)]
    reused = [images for _, images in calls[3:]]
    assert len(reused) == 3 and all(images is not None and {id(i) for i in images} <= warm for images in reused)
    assert sorted(id(s.pinned) for s in staged[3:]) == sorted(pinned)
    assert len(rt.buffers) == made  # no pinned set allocated for a real batch
    for s in staged:
        dec.release(s)
    assert len(dec._free) == 12  # the pool keeps all three batches' images


def test_jpegs_in_place_when_nvimgcodec_takes_views_else_copied_and_the_same_rows_either_way():
    """The GPU process's link hands each JPEG over as a view of its ring slot (no copy). ``warm_up`` finds
    out whether this nvImageCodec makes code streams over views; if not (TypeError), each is copied
    into bytes first, and the batch's rows are the same."""
    jpeg = encode(np.full((20, 30, 3), 90, np.uint8), "jpeg")
    rows = {}
    for views in (True, False):
        dec, rt, kernel = _fake_decoder(max_batch=4)
        dec._nv = dec._decoder = FakeNv(views=views)
        dec.warm_up(1)
        assert dec._views is views
        dec._nv.sources.clear()
        slot = bytearray(jpeg)  # a writable buffer, like a ring slot's
        item = _encoded(jpeg)
        item = type(item)(memoryview(slot), item.info, None, 0.0)
        kept, rejected = dec.decode([item, item])
        assert (kept, rejected) == ([0, 1], [])
        assert dec._nv.sources == [memoryview if views else bytes] * 2  # the view itself, or a copy
        assert dec.fallbacks == 0
        table = [src.view(SOURCE_DTYPE) for dst, src in rt.copies if 0x900000 <= dst < 0x900010][-1]
        rows[views] = (table["height"].tolist(), table["width"].tolist(), len(kernel.launches))
    assert rows[True] == rows[False]


def test_views_that_make_code_streams_but_do_not_decode_are_dropped_at_warm_up():
    """An nvImageCodec that takes a view but cannot decode through it: warned, and the warm-up runs
    again with copies, which work: the worker starts, copying."""
    dec, _, _ = _fake_decoder(max_batch=4)
    nv = FakeNv()
    real = nv.decode

    def decode(streams, images=None, params=None, cuda_stream=0):
        if memoryview in nv.sources[-len(streams):]:
            return [None] * len(streams)  # as if it read nothing through the view
        return real(streams, images=images, params=params, cuda_stream=cuda_stream)

    nv.decode = decode
    dec._nv = dec._decoder = nv
    dec.warm_up(2)
    assert dec._views is False and dec.fallbacks == 0
    assert len(dec._free) == 8 and len(dec._pinned_free) == 2  # the warm-up's pools, as with copies alone


def test_a_warm_up_nvimgcodec_cannot_decode_is_a_config_error_after_the_stream_is_done_with_its_images():
    dec, rt, _ = _fake_decoder(max_batch=4)
    dec._nv.refuse.add(warm_up_jpeg())  # nvImageCodec cannot parse it: OpenCV would, which is no warm-up
    with pytest.raises(ConfigError, match="could not decode a plain baseline JPEG at start-up"):
        dec.warm_up(3)
    assert rt.synchronized == 1  # waited for before anything goes back to the pools
    assert dec._pinned_free  # the first batch's row set (the fallback's) was released, not leaked


def test_warm_up_jpeg_is_a_large_baseline_jpeg_of_the_asked_size():
    data = warm_up_jpeg()
    info = _encoded(data).info
    assert (info.format, info.width, info.height, info.jpeg_sof) == ("jpeg", 640, 480, 0xC0)
    # noise: far more bitstream than a photo of that size (the bundled samples: ~76 KB)
    assert len(data) > 200_000
    assert warm_up_jpeg() == data  # the same every start


def test_decoded_images_are_held_for_the_next_batch_and_passed_back_for_reuse():
    dec, _, _ = _fake_decoder()
    seen: list = []
    real = dec._decoder.decode

    def spy(streams, images=None, params=None, cuda_stream=0):
        seen.append((images, cuda_stream))
        return real(streams, images=images, params=params, cuda_stream=cuda_stream)

    dec._decoder = SimpleNamespace(decode=spy)
    jpeg = _encoded(encode(np.zeros((20, 30, 3), np.uint8), "jpeg"))
    dec.decode([jpeg, jpeg])
    held = list(dec._last.images)
    dec.decode([jpeg])
    assert seen[0] == (None, 7)  # our stream, nothing to reuse yet
    assert seen[1][0] == held[:1] and seen[1][1] == 7


# --- the GPU thread with a device decoder ------------------------------------------------------------

class ResidentEngine:
    """Rows written by the fake decoder; ``enqueue_resident`` sums them; a row of 13s is a model error."""

    def __init__(self, spec, max_batch: int) -> None:
        self.spec = spec
        self.rows = np.zeros((max_batch, *spec.preprocess.hwc_shape), np.uint8)
        self.device_input = 0
        self.batch_sizes: list[int] = []

    def activate(self, runtime, max_batch_size: int) -> None:
        pass

    def enqueue(self, batch):
        raise AssertionError("images decoded on the device must not go through enqueue(batch)")

    def enqueue_resident(self, n: int):
        self.batch_sizes.append(n)
        flat = self.rows[:n].reshape(n, -1)
        if np.all(flat == 13, axis=1).any():
            raise ValueError("model cannot take this input")
        sums = flat.astype(np.int64).sum(axis=1)
        return lambda: {"sum": sums}

    def deactivate(self) -> None:
        pass


class _Staged(tuple):
    fallbacks = 0


class FillDecoder:
    """Writes each value into its row; 99 is an image it rejects. ``events`` logs the calls."""

    fallbacks = 0

    def __init__(self, engine: ResidentEngine) -> None:
        self.engine = engine
        self.closed = False
        self.events: list[tuple[str, tuple]] = []
        self.warmed: int | None = None

    def warm_up(self, batches: int = 1) -> None:
        self.warmed = batches

    def reserve(self) -> None:
        pass

    def stage(self, items):
        staged = _Staged(items)
        staged.fallbacks = sum(1 for v in staged if isinstance(v, int) and v == 5)  # as if OpenCV decoded the 5s
        staged.steps = {"nvimgcodec": 0.002, "cpu": 0.001}  # as NvImageCodecDecoder's Staged records them
        self.events.append(("stage", staged))
        return staged

    def write(self, staged):
        self.events.append(("write", staged))
        kept, rejected = [], []
        for i, value in enumerate(staged):
            if isinstance(value, int) and value == 99:
                rejected.append((i, UndecodableImage("corrupt image data")))
                continue
            self.engine.rows[len(kept)] = value if isinstance(value, int) else value[0]  # rows: one per model
            kept.append(i)
        return kept, rejected

    def release(self, staged) -> None:
        self.events.append(("release", staged))

    def close(self) -> None:
        self.closed = True


async def test_gpu_thread_runs_device_decoded_rows_rejects_poison_and_isolates_model_errors():
    engine = ResidentEngine(PIPELINE.models[0], 8)
    decoder = FillDecoder(engine)
    metrics = Metrics()
    gpu = GpuThread(CpuRuntime(), [engine], max_batch_size=8, max_wait_ms=2000, warmup=False, metrics=metrics,
                    device_decoder=lambda runtime, engines, max_batch: decoder)
    await gpu.start()
    try:
        assert gpu.decodes_on_device
        assert metrics.registry.get_sample_value("worker_gpu_decoding") == 1
        loop = asyncio.get_running_loop()
        values = [1, 99, 2, 13, 3, 4, 5, 6]
        futures = [loop.create_future() for _ in values]
        for v, fut in zip(values, futures):
            gpu.submit(InferenceRequest(None, fut, loop, {"value": v}, encoded=v))
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
    finally:
        gpu.stop()
    size = int(np.prod(engine.spec.preprocess.hwc_shape))
    assert engine.batch_sizes[0] == 7  # the batch without the rejected image, then item by item
    assert engine.batch_sizes[1:] == [1] * 7
    for v, out in zip(values, outcomes):
        if v == 99:
            assert isinstance(out, UndecodableImage) and out.reason == "undecodable_image"
        elif v == 13:
            assert isinstance(out, ModelRejectedInput)
        else:
            assert isinstance(out, InferenceResult) and int(out.outputs[0]["sum"]) == v * size
    assert decoder.closed
    # the 5 was "decoded by OpenCV" twice: in the batch, and again when the batch was retried item by item
    assert metrics.registry.get_sample_value("worker_gpu_decode_fallbacks_total") == 2


@pytest.mark.parametrize("in_flight", [1, 2])
async def test_the_next_full_batch_is_decoded_while_the_device_runs_the_current_one(in_flight):
    engine = ResidentEngine(PIPELINE.models[0], 4)
    decoder = FillDecoder(engine)
    gpu = GpuThread(CpuRuntime(), [engine], max_batch_size=4, max_wait_ms=2000, warmup=True,
                    device_decoder=lambda runtime, engines, max_batch: decoder, batches_in_flight=in_flight)
    gpu._warm_up = lambda: None  # the engines' own warm-up (host rows) is not what this test is about
    loop = asyncio.get_running_loop()
    values = list(range(1, 13))
    futures = [loop.create_future() for _ in values]
    for v, fut in zip(values, futures):  # queued before the thread starts: three full batches waiting
        gpu.submit(InferenceRequest(None, fut, loop, {"value": v}, encoded=v))
    await gpu.start()
    try:
        outcomes = await asyncio.gather(*futures)
    finally:
        gpu.stop()
    size = int(np.prod(engine.spec.preprocess.hwc_shape))
    assert [int(o.outputs[0]["sum"]) for o in outcomes] == [v * size for v in values]
    assert engine.batch_sizes == [4, 4, 4]
    batches = [(1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11, 12)]
    if in_flight == 1:
        assert decoder.events == [
            ("stage", batches[0]), ("write", batches[0]), ("stage", batches[1]), ("release", batches[0]),
            ("write", batches[1]), ("stage", batches[2]), ("release", batches[1]),
            ("write", batches[2]), ("release", batches[2])]
    else:  # the next batch is written (queued) before the previous one is finished and released
        assert decoder.events == [
            ("stage", batches[0]), ("write", batches[0]), ("stage", batches[1]),
            ("write", batches[1]), ("stage", batches[2]), ("release", batches[0]),
            ("write", batches[2]), ("release", batches[1]), ("release", batches[2])]
    # the decoder's warm-up made as many batches as were ever alive at once (staged, not yet released)
    alive = peak = 0
    for event, _ in decoder.events:
        alive += {"stage": 1, "release": -1}.get(event, 0)
        peak = max(peak, alive)
    assert decoder.warmed == peak == in_flight + 1


async def test_the_first_batches_are_logged_at_info_with_where_their_time_went(monkeypatch):
    """Run 23's slow first batches (60-417 ms on an H100, not explained by the bench's totals): each of
    the first EARLY_BATCHES_LOGGED batches says how its time split between decode, enqueue and the wait."""
    import worker.gpu.thread as thread

    monkeypatch.setattr(thread, "EARLY_BATCHES_LOGGED", 2)
    stream = io.StringIO()
    log.configure("json", "info", stream=stream)
    engine = ResidentEngine(PIPELINE.models[0], 4)
    decoder = FillDecoder(engine)
    gpu = GpuThread(CpuRuntime(), [engine], max_batch_size=4, max_wait_ms=2000, warmup=False,
                    device_decoder=lambda runtime, engines, max_batch: decoder)
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in range(12)]
    for v, fut in enumerate(futures, 1):  # three full batches
        gpu.submit(InferenceRequest(None, fut, loop, {"value": v}, encoded=v))
    await gpu.start()
    try:
        await asyncio.gather(*futures)
    finally:
        gpu.stop()
    batches = [line for line in map(json.loads, stream.getvalue().splitlines()) if line["event"] == "batch"]
    assert [(b["number"], b["size"], b["decoded"], b["level"]) for b in batches] == [
        (1, 4, "card", "info"), (2, 4, "card", "info")]  # the third at debug: not written at info
    for b in batches:
        assert set(b["phases_ms"]) == {"decode", "enqueue", "wait"}
        assert all(ms >= 0 for ms in b["phases_ms"].values())
        assert sum(b["phases_ms"].values()) <= b["inference_ms"] + 0.01  # its parts, within its own time
        assert b["decode_steps_ms"] == {"nvimgcodec": 2.0, "cpu": 1.0}  # the decoder's own steps, in ms


async def test_batches_by_decoder_keeps_card_jpegs_and_cpu_rows_apart_when_each_fills_a_batch():
    """gpu_batches_by_decoder: four rows (decoded in an intake) and four JPEGs for the card, interleaved;
    with batches of 4 each kind runs as a batch of its own (the row batch never calls the decoder)."""
    engine = ResidentEngine(PIPELINE.models[0], 4)
    decoder = FillDecoder(engine)
    metrics = Metrics()
    gpu = GpuThread(CpuRuntime(), [engine], max_batch_size=4, max_wait_ms=2000, warmup=False, metrics=metrics,
                    device_decoder=lambda runtime, engines, max_batch: decoder, batches_by_decoder=True)
    loop = asyncio.get_running_loop()
    size = int(np.prod(engine.spec.preprocess.hwc_shape))
    values = [1, 2, 3, 4, 5, 6, 7, 8]
    futures = [loop.create_future() for _ in values]
    for v, fut in zip(values, futures):  # odd values as card JPEGs, even ones as CPU-decoded rows
        if v % 2:
            gpu.submit(InferenceRequest(None, fut, loop, {"value": v}, encoded=v))
        else:
            rows = [np.full(engine.spec.preprocess.hwc_shape, v, np.uint8)]
            gpu.submit(InferenceRequest(rows, fut, loop, {"value": v}))
    await gpu.start()
    try:
        outcomes = await asyncio.gather(*futures)
    finally:
        gpu.stop()
    assert [int(o.outputs[0]["sum"]) for o in outcomes] == [v * size for v in values]
    staged = [tuple(v if not isinstance(v, list) else int(v[0].flat[0]) for v in items)
              for what, items in decoder.events if what == "stage"]
    assert staged == [(1, 3, 5, 7), (2, 4, 6, 8)]  # one batch per kind, not two mixed ones
    batches = {kind: metrics.registry.get_sample_value("worker_gpu_batches_total", {"decoded": kind})
               for kind in ("card", "rows", "mixed")}
    assert batches == {"card": 1, "rows": 1, "mixed": None}  # what the bench reports per kind of batch
    assert metrics.registry.get_sample_value("worker_gpu_batch_seconds_total", {"decoded": "rows"}) > 0


async def test_a_decoder_that_cannot_start_leaves_decoding_to_the_cpu():
    def unavailable(runtime, engines, max_batch):
        raise ConfigError("decoder=nvimgcodec needs a CUDA device; this runtime is the CPU")

    engine = ResidentEngine(PIPELINE.models[0], 4)
    metrics = Metrics()
    gpu = GpuThread(CpuRuntime(), [engine], max_batch_size=4, max_wait_ms=1, warmup=False, metrics=metrics,
                    device_decoder=unavailable)
    await gpu.start()
    try:
        assert not gpu.decodes_on_device and gpu.alive()
        assert metrics.registry.get_sample_value("worker_gpu_decoding") == 0  # the fall back shows
    finally:
        gpu.stop()
    assert decoder_factory(SimpleNamespace(decoder="cpu-reduced"), PIPELINE) is None


async def test_decoder_nvimgcodec_without_a_gpu_falls_back_to_cpu_decoding_end_to_end(settings):
    settings = settings.replace(decoder="nvimgcodec", device="cpu")
    await create_topics(settings.bootstrap_servers, [(settings.input_topic, 2), (settings.output_topic, 2),
                                                    (settings.dlq_topic, 1)])
    blobs, pixels = lossless_images(60, seed=11)
    bad = encode(np.zeros((64, 64, 3), np.uint8), "png")[:70]  # header intact, data cut
    coords = await produce(settings.bootstrap_servers, settings.input_topic, [*blobs, bad], 2)
    (results, dlq), worker, code = await run_until(settings, {settings.output_topic: 60, settings.dlq_topic: 1})
    assert code == 0 and not worker.gpu.decodes_on_device
    index = {c: i for i, c in enumerate(coords)}
    assert {source_of(r) for r in results} == set(coords[:60])
    for rec in results:
        check_demo_result(result_doc(rec), pixels[index[source_of(rec)]])
    assert source_of(dlq[0]) == coords[60]


def test_cpu_reference_of_a_jpeg_row_is_what_opencv_gives():
    """The rows the fallback writes are ``prepare`` of OpenCV's decode: pinned down here so that the
    GPU test's comparison (kernel vs. this) compares against the CPU decoder the worker really runs."""
    image = synth_image(np.random.default_rng(5), 64, 64, 3)
    data = encode(image, "png")
    (row, *_), = [decode_encoded(_encoded(data), PIPELINE, 1 << 24, 1 << 26)]
    np.testing.assert_array_equal(row, cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
                                  if PIPELINE.models[0].preprocess.color == "rgb" else image)


# --- decoder=hybrid: an intake's free decode threads take JPEGs, the rest go to the card -------------

class _RecordingGpu:
    """Stands in for the GPU client: records each request and answers it as poison (to the DLQ), so the
    handler finishes without a result to build."""

    decodes_on_device = True

    def __init__(self) -> None:
        self.requests: list[InferenceRequest] = []

    async def put(self, request: InferenceRequest) -> None:
        self.requests.append(request)
        request.future.set_exception(ModelRejectedInput("answered by the test"))


class _NullPublisher:
    async def publish(self, topic, record) -> None:
        pass


async def test_hybrid_decodes_on_the_cpu_while_a_decode_thread_is_free_and_sends_bytes_otherwise(
        monkeypatch, settings):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import worker.intake.handle as handle_module
    from worker.intake.handle import MessageHandler
    from worker.policy.offsets import OffsetTracker

    release = threading.Event()
    real = handle_module.decode_encoded

    def slow_decode(*args, **kwargs):
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(handle_module, "decode_encoded", slow_decode)
    # room for hybrid_queue_per_thread; the rule at the peak (hybrid_card_below 0: as with a backlog at the GPU)
    settings = settings.replace(decoder="hybrid", decode_workers=1, hybrid_card_below=0)
    gpu = _RecordingGpu()
    counts = {"published": 0, "dead_lettered": 0, "failed": 0}
    failures: list[BaseException] = []
    pool = ThreadPoolExecutor(1)
    handler = MessageHandler(settings, PIPELINE, gpu, _NullPublisher(), OffsetTracker(), Metrics(), counts, pool,
                             failures.append)
    jpeg = encode(synth_image(np.random.default_rng(3), 640, 480, 3), "jpeg")  # downscaled 4x by cpu-reduced
    png = encode(synth_image(np.random.default_rng(4), 96, 64, 3), "png")
    room = settings.hybrid_queue_per_thread
    msgs = [SimpleNamespace(topic="in", partition=0, offset=i, timestamp=0, key=None, value=v, headers=[])
            for i, v in enumerate([jpeg] * (room + 2) + [png])]
    from aiokafka import TopicPartition
    tp = TopicPartition("in", 0)
    try:
        held = [asyncio.create_task(handler.handle(tp, m)) for m in msgs[:room]]
        while handler._cpu_busy < room:  # the first JPEGs fill the pool's room (one decoding, the rest queued)
            await asyncio.sleep(0.001)
        # no room: its bytes go to the card (its handling then waits for the decodes before it, so the
        # decodes are released once the card's request is out, not after: each would wait its 10 s)
        card = asyncio.create_task(handler.handle(tp, msgs[room]))
        while not any(r.context["offset"] == room for r in gpu.requests):
            await asyncio.sleep(0.001)
        release.set()
        await asyncio.gather(*held, card)
        await handler.handle(tp, msgs[room + 1])  # room again: decoded here
        await handler.handle(tp, msgs[room + 2])  # not a JPEG: always the CPU, as with nvimgcodec
    finally:
        pool.shutdown()
    assert not failures
    by_offset = {r.context["offset"]: r for r in gpu.requests}
    assert by_offset[room].encoded is not None and by_offset[room].inputs is None
    for offset in [*range(room), room + 1, room + 2]:
        req = by_offset[offset]
        assert req.encoded is None and req.inputs[0].shape == PIPELINE.models[0].preprocess.hwc_shape
    # the JPEGs decoded here are decoded downscaled (cpu-reduced), the PNG full size
    encoded_jpeg = inspect_message(jpeg, None, settings.max_bytes, settings.max_pixels)
    reduced = decode_encoded(encoded_jpeg, PIPELINE, settings.max_bytes, settings.max_pixels, True)
    full = decode_encoded(encoded_jpeg, PIPELINE, settings.max_bytes, settings.max_pixels, False)
    assert any(not np.array_equal(a, b) for a, b in zip(reduced, full))  # the two paths differ here
    for got, want in zip(by_offset[0].inputs, reduced):
        np.testing.assert_array_equal(got, want)
    png_full = decode_encoded(inspect_message(png, None, settings.max_bytes, settings.max_pixels), PIPELINE,
                              settings.max_bytes, settings.max_pixels, False)
    for got, want in zip(by_offset[room + 2].inputs, png_full):
        np.testing.assert_array_equal(got, want)
    assert counts["dead_lettered"] == room + 3 and handler._cpu_busy == 0


async def test_hybrid_gives_the_room_back_when_a_batch_is_cut_before_its_cpu_share_is_submitted(settings):
    """A revoke or drain cancels handle_batch while it hands a JPEG to the card (the GPU's ring full):
    the CPU share counted so far must not stay counted, or the intake's CPU share shrinks for good."""
    from concurrent.futures import ThreadPoolExecutor

    from aiokafka import TopicPartition

    from worker.intake.handle import MessageHandler
    from worker.policy.offsets import OffsetTracker

    class _FullGpu(_RecordingGpu):
        async def put(self, request):  # a ring with no free slot: waits for ever
            await asyncio.Event().wait()

    settings = settings.replace(decoder="hybrid", decode_workers=1, hybrid_card_below=0)  # the rule at the peak
    pool = ThreadPoolExecutor(1)
    handler = MessageHandler(settings, PIPELINE, _FullGpu(), _NullPublisher(), OffsetTracker(), Metrics(),
                             {"published": 0, "dead_lettered": 0, "failed": 0}, pool, lambda exc: None)
    jpeg = encode(synth_image(np.random.default_rng(3), 64, 48, 3), "jpeg")
    room = settings.hybrid_queue_per_thread
    msgs = [SimpleNamespace(topic="in", partition=0, offset=i, timestamp=0, key=None, value=jpeg, headers=[])
            for i in range(room + 1)]  # room for the first ones, the last one to the (full) card
    try:
        task = asyncio.create_task(handler.handle_batch(TopicPartition("in", 0), [(m, None) for m in msgs]))
        while handler._cpu_busy < room:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.01)  # now waiting in the card's put
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        pool.shutdown()
    assert handler._cpu_busy == 0


class _BackloggedGpu(_RecordingGpu):
    """A GPU client whose count of this intake's images waiting at the GPU process the test sets."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0

    def queue_depth(self) -> int:
        return self.depth


async def test_hybrid_card_below_sends_jpegs_to_the_card_until_the_gpu_process_has_a_backlog(settings):
    """hybrid_card_below=8: with fewer than 8 of the intake's images at the GPU process, a JPEG goes to the
    card though a decode thread is free; at 8 and above the decode threads take it, as without the setting.
    Other formats are decoded here either way. 0 (the default) keeps the decode threads first."""
    from concurrent.futures import ThreadPoolExecutor

    from aiokafka import TopicPartition

    from worker.intake.handle import MessageHandler
    from worker.policy.offsets import OffsetTracker

    jpeg = encode(synth_image(np.random.default_rng(3), 96, 64, 3), "jpeg")
    png = encode(synth_image(np.random.default_rng(4), 96, 64, 3), "png")
    tp = TopicPartition("in", 0)

    async def routes(card_below: int, depths: list[int], values: list[bytes]) -> list[bool]:
        gpu = _BackloggedGpu()
        pool = ThreadPoolExecutor(1)
        handler = MessageHandler(settings.replace(decoder="hybrid", decode_workers=1, hybrid_card_below=card_below),
                                 PIPELINE, gpu, _NullPublisher(), OffsetTracker(), Metrics(),
                                 {"published": 0, "dead_lettered": 0, "failed": 0}, pool, lambda exc: None)
        try:
            for i, (depth, value) in enumerate(zip(depths, values)):
                gpu.depth = depth
                msg = SimpleNamespace(topic="in", partition=0, offset=i, timestamp=0, key=None, value=value,
                                      headers=[])
                await handler.handle(tp, msg)
        finally:
            pool.shutdown()
        assert handler._cpu_busy == 0
        return [r.encoded is not None for r in sorted(gpu.requests, key=lambda r: r.context["offset"])]

    depths = [0, 7, 8, 30, 0]
    assert await routes(8, depths, [jpeg] * 4 + [png]) == [True, True, False, False, False]
    assert await routes(0, depths, [jpeg] * 4 + [png]) == [False, False, False, False, False]


async def test_nvimgcodec_alone_never_decodes_jpegs_on_the_cpu(settings):
    from concurrent.futures import ThreadPoolExecutor

    from aiokafka import TopicPartition

    from worker.intake.handle import MessageHandler
    from worker.policy.offsets import OffsetTracker

    gpu = _RecordingGpu()
    pool = ThreadPoolExecutor(4)
    handler = MessageHandler(settings.replace(decoder="nvimgcodec"), PIPELINE, gpu, _NullPublisher(), OffsetTracker(),
                             Metrics(), {"published": 0, "dead_lettered": 0, "failed": 0}, pool, lambda exc: None)
    jpeg = encode(synth_image(np.random.default_rng(3), 96, 64, 3), "jpeg")
    try:
        for i in range(3):
            msg = SimpleNamespace(topic="in", partition=0, offset=i, timestamp=0, key=None, value=jpeg, headers=[])
            await handler.handle(TopicPartition("in", 0), msg)
    finally:
        pool.shutdown()
    assert [r.encoded is not None for r in gpu.requests] == [True, True, True]


async def test_a_polls_first_results_go_out_while_its_last_records_wait_for_ring_room(settings):
    """A poll can bring more records than the GPU's ring has slots: the records answered first are
    published (here: dead-lettered) while the rest still wait to be handed over. Before, a partition's
    results waited until its last record found room, several GPU batches with a long max_wait_ms."""
    from concurrent.futures import ThreadPoolExecutor

    from aiokafka import TopicPartition

    from worker.intake.handle import MessageHandler
    from worker.policy.offsets import OffsetTracker

    class _TwoSlotGpu(_RecordingGpu):
        """A ring of two slots; the test answers what is in it."""

        def __init__(self) -> None:
            super().__init__()
            self.slots = asyncio.Semaphore(2)

        async def put(self, request):
            await self.slots.acquire()
            self.requests.append(request)

        def answer_all(self) -> None:
            for request in self.requests:
                if not request.future.done():
                    request.future.set_exception(ModelRejectedInput("answered by the test"))
                    self.slots.release()

    gpu, failures = _TwoSlotGpu(), []
    tracker = OffsetTracker()
    pool = ThreadPoolExecutor(1)
    handler = MessageHandler(settings.replace(decoder="nvimgcodec"), PIPELINE, gpu, _NullPublisher(), tracker,
                             Metrics(), {"published": 0, "dead_lettered": 0, "failed": 0}, pool,
                             failures.append)
    jpeg = encode(synth_image(np.random.default_rng(3), 96, 64, 3), "jpeg")
    tp = TopicPartition("in", 0)
    msgs = [SimpleNamespace(topic="in", partition=0, offset=i, timestamp=0, key=None, value=jpeg, headers=[])
            for i in range(6)]
    generations = [tracker.start(tp, m.offset) for m in msgs]
    try:
        task = asyncio.create_task(handler.handle_batch(tp, list(zip(msgs, generations))))
        while len(gpu.requests) < 2:
            await asyncio.sleep(0.001)
        gpu.answer_all()  # the first GPU batch: offsets 0 and 1
        for _ in range(2000):  # (with the hand-over first, this never comes: the test times out)
            if tracker.committable(tp) == 2:
                break
            await asyncio.sleep(0.001)
        assert tracker.committable(tp) == 2, "the first records' DLQ records waited for the last ones' room"
        # offsets 0 and 1 are dead-lettered and finished while 4 and 5 have not been handed over
        assert [r.context["offset"] for r in gpu.requests] == [0, 1, 2, 3]
        while len(gpu.requests) < 6:
            gpu.answer_all()
            await asyncio.sleep(0.001)
        gpu.answer_all()
        await asyncio.wait_for(task, 10)
    finally:
        pool.shutdown()
    assert not failures and tracker.committable(tp) == 6

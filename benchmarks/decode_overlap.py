"""Does nvImageCodec's JPEG decode overlap ResNet-50 inference on the card? (a device experiment)

Why it exists: with ``decoder=nvimgcodec`` the GPU thread decodes batch N+1 while the device runs batch N,
and yet the GPU thread alone reached only ~0.68x the engine API. This separates the parts, one batch of
``--batch`` 640x480 JPEGs at a time, on a thread that takes the device like the GPU thread:

- ``infer_alone``: ``enqueue_resident`` + synchronize (the rows already decoded on the device);
- ``decode_alone``: stage + write + synchronize; ``decode_parts_alone`` splits the host time into
  CodeStream creation, the ``Decoder.decode`` call and reading each image's device pointer;
- ``decode_beside_infer``: the decode call made right after the inference was enqueued (same thread);
- ``gpu_thread_pattern``: what GpuThread does per batch (write, enqueue, stage the next, synchronize);
- ``decode_thread``: a second thread of the process (the same primary context pushed there) decodes
  while the first only writes, enqueues and synchronizes: does a second host thread buy overlap?
- ``infer_alone_cuda_graph``: ONNX Runtime's CUDA graph (``enable_cuda_graph``), inference alone.
- ``decode_other_process``: another process (its own CUDA context) decodes batches with the same
  nvImageCodec settings, first alone, then while this one runs inference: does decoding in another
  context overlap inference (the card time-slices contexts, but its JPEG engines are not SMs)? Its rows:
  the other process's decode ms per batch alone and beside inference, and inference's ms per batch beside it.

``--trace FILE``: the decode beside inference under PyTorch's profiler (CUPTI: every CUDA call and
kernel of the process, whichever library made it), summarised in the JSON; the run ends there.
``NONBLOCK=1`` creates the runtime's streams with CU_STREAM_NON_BLOCKING (to rule out implicit
synchronisation with the legacy default stream). Run on the GPU machine:
``python3 -m benchmarks.decode_overlap --json out.json``. Results: docs/benchmarks.md ("decode and
inference on one card").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def _nonblocking_streams() -> None:
    import pycuda.driver as cuda

    make = cuda.Stream
    cuda.Stream = lambda *a, **k: make(1)  # CU_STREAM_NON_BLOCKING; CudaRuntime.start calls cuda.Stream()


def _jpegs(n: int) -> list[bytes]:
    from worker.samples import encode, synth_image

    rng = np.random.default_rng(0)
    return [encode(synth_image(rng, 640, 480, 3), "jpeg", 90) for _ in range(n)]


def _decode_in_own_process(backend: str, options: str, batch: int, seconds: float, ready: Any, go: Any,
                           out: Any) -> None:
    """The other process of ``decode_other_process``: its own primary context (one per process), a
    stream, nvImageCodec as the worker configures it; decodes batches for ``seconds`` after ``go``,
    timing each (decode call + stream synchronize) on CLOCK_MONOTONIC, which both processes share."""
    import pycuda.driver as cuda

    cuda.init()
    context = cuda.Device(0).retain_primary_context()
    context.push()
    try:
        from nvidia import nvimgcodec

        from worker.decode.nvimgcodec import decoder_kwargs

        stream = cuda.Stream()
        decoder = nvimgcodec.Decoder(device_id=0, **decoder_kwargs(nvimgcodec, backend, options))
        params = nvimgcodec.DecodeParams(apply_exif_orientation=True, color_spec=nvimgcodec.ColorSpec.SRGB,
                                         sample_format=nvimgcodec.SampleFormat.I_RGB)
        data = _jpegs(batch)
        images = None  # reused, as the worker does: no allocation (or free) per batch

        def decode() -> None:
            nonlocal images
            images = list(decoder.decode([nvimgcodec.CodeStream(d) for d in data], images=images,
                                         params=params, cuda_stream=stream.handle))
            stream.synchronize()

        for _ in range(3):  # warm-up: codecs initialised, buffers allocated
            decode()
        ready.set()
        go.wait()
        spans: list[tuple[float, float]] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.monotonic()
            decode()
            spans.append((t, time.monotonic()))
        out.put(spans)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent's row
        out.put(f"{type(exc).__name__}: {exc}"[:800])
    finally:
        cuda.Context.pop()


def _other_process_row(settings: Any, infer_step: Callable[[], None], batch: int, seconds: float) -> dict[str, Any]:
    """``decode_other_process``: the other process decodes alone for ``seconds``, then beside this one's
    inference for ``seconds``; each of its batches is counted in the window it started in."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    ready, go, out = ctx.Event(), ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_decode_in_own_process, args=(str(settings.nvimgcodec_backend),
                        settings.nvimgcodec_options, batch, 2 * seconds + 0.5, ready, go, out), daemon=True)
    child.start()
    try:
        if not ready.wait(120):
            return {"error": "the decoding process did not get ready in 120 s"}
        go.set()
        time.sleep(seconds)
        t0, n = time.monotonic(), 0
        while time.monotonic() - t0 < seconds:
            infer_step()
            n += 1
        t1 = time.monotonic()
        spans = out.get(timeout=120)
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
    if isinstance(spans, str):
        return {"error": spans}

    def ms(rows: list[tuple[float, float]]) -> float | None:
        return round(1000 * float(np.mean([b - a for a, b in rows])), 2) if rows else None

    return {"decode_ms_alone": ms([s for s in spans if s[0] < t0]),
            "decode_ms_beside_inference": ms([s for s in spans if t0 <= s[0] and s[1] <= t1]),
            "infer_ms_beside_decode": round(1000 * (t1 - t0) / max(n, 1), 2), "infer_batches": n}


def _trace(step: Callable[[], None], path: str, iterations: int = 6) -> dict[str, Any]:
    """``step`` (inference enqueued, then the decode call) under PyTorch's profiler, where torch is
    importable: CUPTI records every CUDA runtime and driver call and every kernel of the process, whichever
    library made it (ONNX Runtime, nvImageCodec, nvJPEG). Writes the Chrome trace to ``path`` and returns,
    per API call and per kernel, count and total ms, plus the last iteration's timeline: what the decode
    call waits on (a device-wide synchronisation, a free, the legacy stream) shows there."""
    try:
        from torch.profiler import ProfilerActivity, profile
    except ImportError as exc:
        return {"error": f"no torch here: {exc}"}
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iterations):
            step()
    prof.export_chrome_trace(path)
    events = [e for e in json.load(open(path)).get("traceEvents", []) if e.get("ph") == "X"]
    on_device = ("kernel", "gpu_memcpy", "gpu_memset")
    summary: dict[str, dict[str, list[float]]] = {}
    for e in events:
        cat = e.get("cat", "")
        if cat in ("cuda_runtime", "cuda_driver", *on_device):
            stream = f" [stream {e.get('args', {}).get('stream')}]" if cat in on_device else ""
            row = summary.setdefault(cat, {}).setdefault(e["name"][:90] + stream, [0, 0.0])
            row[0] += 1
            row[1] += e.get("dur", 0) / 1000.0
    top = {cat: dict(sorted(((k, [int(v[0]), round(v[1], 3)]) for k, v in rows.items()),
                            key=lambda kv: -kv[1][1])[:25])
           for cat, rows in summary.items()}
    device = sorted((e for e in events if e.get("cat") in on_device), key=lambda e: e["ts"])
    t0 = device[-1]["ts"] - 40_000 if device else 0  # the last ~40 ms of device work: one iteration
    tail = [[round((e["ts"] - t0) / 1000, 3), round(e.get("dur", 0) / 1000, 3), e.get("cat"), e["name"][:60],
             e.get("args", {}).get("stream")] for e in device if e["ts"] >= t0]
    host = sorted((e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver") and e["ts"] >= t0
                   and e.get("dur", 0) > 200), key=lambda e: e["ts"])
    return {"iterations": iterations, "calls": top, "device_timeline_last_40ms": tail[:400],
            "host_calls_over_0_2ms_last_40ms": [[round((e["ts"] - t0) / 1000, 3), round(e["dur"] / 1000, 3),
                                                  e["name"][:80]] for e in host]}


def run(batch: int, seconds: float, trace: str = "") -> dict[str, Any]:
    from worker import log
    from worker.decode.message import inspect_message
    from worker.decode.nvimgcodec import NvImageCodecDecoder
    from worker.engines import create_engine, create_runtime
    from worker.models import resnet50_pipeline_path
    from worker.models.spec import load_pipeline
    from worker.settings import load

    log.configure("console", "warning")
    # WORKER_* variables apply (WORKER_NVIMGCODEC_BACKEND, WORKER_NVIMGCODEC_OPTIONS: the decoder's A/B)
    settings = load().replace(device="cuda", decoder="nvimgcodec", max_batch_size=batch)
    pipeline = load_pipeline(resnet50_pipeline_path())
    jpegs = _jpegs(256)
    encoded = [inspect_message(b, None, settings.max_bytes, settings.max_pixels) for b in jpegs]
    batches = [[encoded[(k * batch + j) % len(encoded)] for j in range(batch)] for k in range(4)]
    out: dict[str, Any] = {"batch": batch, "nonblocking_streams": os.environ.get("NONBLOCK") == "1",
                           "nvimgcodec_backend": str(settings.nvimgcodec_backend),
                           "nvimgcodec_options": settings.nvimgcodec_options}

    rt = create_runtime(settings)
    rt.start()
    eng = create_engine(pipeline.models[0], settings)
    eng.activate(rt, batch)
    dec = NvImageCodecDecoder(rt, [eng], batch, pipeline, settings.max_bytes, settings.max_pixels,
                              settings.nvimgcodec_backend, settings.nvimgcodec_options)
    dec.warm_up()
    nv = dec._nv

    def loop(name: str, step: Callable[[int], None], secs: float = seconds) -> dict[str, Any]:
        try:
            step(0)
            rt.synchronize()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < secs:
                step(n)
                n += 1
            rt.synchronize()
        except Exception as exc:  # noqa: BLE001 - the row records it, the others still run
            import traceback

            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:800], "traceback": traceback.format_exc()[-3000:]}
            print(name, out[name], flush=True)
            return out[name]
        wall = time.perf_counter() - t0
        out[name] = {"batches": n, "ms_per_batch": round(1000 * wall / n, 2), "images_per_s": round(n * batch / wall)}
        print(name, out[name], flush=True)
        return out[name]

    def timed_decode(items: list) -> tuple[list, tuple[float, ...]]:
        t0 = time.perf_counter()
        streams = [nv.CodeStream(it.data) for it in items]
        t1 = time.perf_counter()
        images = list(dec._decoder.decode(streams, params=dec._params, cuda_stream=rt.decode_stream_handle))
        t2 = time.perf_counter()
        for im in images:
            im.__cuda_array_interface__["data"][0]
        return images, (t1 - t0, t2 - t1, time.perf_counter() - t2)

    def mean_ms(parts: list[tuple[float, ...]]) -> list[float]:
        if not parts:
            return []
        return [round(1000 * float(np.mean([p[k] for p in parts])), 2) for k in range(len(parts[0]))]

    staged = dec.stage(batches[0])
    dec.write(staged)
    rt.synchronize()

    def infer(i: int) -> None:
        collect = eng.enqueue_resident(batch)
        rt.synchronize()
        collect()

    loop("infer_alone", infer)
    dec.release(staged)

    def decode_only(i: int) -> None:
        dec.decode(batches[i % 4])
        rt.synchronize()

    loop("decode_alone", decode_only)
    parts: list[tuple[float, ...]] = []

    def decode_parts(i: int) -> None:
        images, p = timed_decode(batches[i % 4])
        rt.decode_stream.synchronize()  # the images are dropped only once decoded
        parts.append(p)
        del images

    row = loop("decode_parts_alone", decode_parts)  # first: an assignment evaluates its right side first
    row["parts_ms"] = dict(zip(("codestream", "decode_call", "pointers"), mean_ms(parts)))
    parts.clear()

    def beside(i: int) -> None:
        collect = eng.enqueue_resident(batch)
        images, p = timed_decode(batches[i % 4])
        t = time.perf_counter()
        rt.synchronize()
        rt.decode_stream.synchronize()
        del images
        parts.append((*p, time.perf_counter() - t))
        collect()

    row = loop("decode_beside_infer", beside)
    row["parts_ms"] = dict(zip(("codestream", "decode_call", "pointers", "sync"), mean_ms(parts)))
    if trace:
        out["trace"] = _trace(lambda: beside(0), trace)
        print("trace", json.dumps(out["trace"])[:4000], flush=True)
        dec.close()  # the trace is the whole run: the rows after this one are not measured
        eng.deactivate()
        rt.stop()
        return out
    nxt = [dec.stage(batches[0])]

    def gpu_thread_pattern(i: int) -> None:
        cur = nxt[0]
        dec.write(cur)
        collect = eng.enqueue_resident(batch)
        nxt[0] = dec.stage(batches[(i + 1) % 4])
        rt.synchronize()
        collect()
        dec.release(cur)

    loop("gpu_thread_pattern", gpu_thread_pattern)
    rt.synchronize()
    dec.release(nxt[0])

    # A second host thread decoding (experiment only: the product keeps one thread on the device).
    checked = rt._check_thread
    rt._check_thread = lambda: None  # the decode thread records its event on the decode stream
    lock, ready, stop = threading.Lock(), queue.Queue(maxsize=2), threading.Event()
    decode_ms: list[float] = []

    def decoder_thread() -> None:
        import pycuda.driver as cuda

        rt._context.push()
        try:
            k = 0
            while not stop.is_set():
                t = time.perf_counter()
                with lock:
                    s = dec.stage(batches[k % 4])
                decode_ms.append(1000 * (time.perf_counter() - t))
                k += 1
                while not stop.is_set():
                    try:
                        ready.put(s, timeout=0.1)
                        break
                    except queue.Full:
                        pass
            rt.decode_stream.synchronize()
        finally:
            cuda.Context.pop()

    thread = threading.Thread(target=decoder_thread, daemon=True)
    thread.start()
    waits: list[float] = []

    def threaded(i: int) -> None:
        t = time.perf_counter()
        s = ready.get()
        waits.append(1000 * (time.perf_counter() - t))
        dec.write(s)
        collect = eng.enqueue_resident(batch)
        rt.synchronize()
        collect()
        with lock:
            dec.release(s)

    row = loop("decode_thread", threaded, seconds * 1.5)
    stop.set()
    thread.join()
    row["decode_stage_ms"] = round(float(np.mean(decode_ms)), 2)
    row["gpu_thread_wait_ms"] = round(float(np.mean(waits)), 2)
    rt._check_thread = checked
    out["decode_other_process"] = _other_process_row(settings, lambda: infer(0), batch, seconds)
    print("decode_other_process", out["decode_other_process"], flush=True)
    dec.close()
    eng.deactivate()

    try:
        spec = dataclasses.replace(pipeline.models[0], extra={"cuda_provider_options": {"enable_cuda_graph": "1"}})
        graph = create_engine(spec, settings)
        graph.activate(rt, batch)

        def infer_graph(i: int) -> None:
            collect = graph.enqueue_resident(batch)
            rt.synchronize()
            collect()

        loop("infer_alone_cuda_graph", infer_graph)
        graph.deactivate()
    except Exception as exc:  # noqa: BLE001 - recorded; the other rows stand
        out["infer_alone_cuda_graph"] = {"error": f"{type(exc).__name__}: {exc}"[:800]}
    rt.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--json", default="")
    parser.add_argument("--trace", default="", help="Chrome trace of the decode beside inference (needs torch); "
                        "the run stops after it")
    args = parser.parse_args()
    if os.environ.get("NONBLOCK") == "1":
        _nonblocking_streams()
    from benchmarks.own_thread import on_own_thread

    result = on_own_thread(lambda: run(args.batch, args.seconds, args.trace), "bench-decode-overlap")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

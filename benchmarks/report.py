"""The bench's record: environment, analysis (ratios, the bound), the printed table and a Markdown copy."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.table import Table

import worker
from benchmarks.round_trip import bound_run, latency_bound
from worker.models.spec import PipelineSpec
from worker.settings import Settings

# issue 11: worker >= 0.9x the ceiling and >= 20x the baseline; the GPU process alone >= 0.95x the engine API
TARGETS = {"worker_over_ceiling": 0.9, "worker_over_baseline": 20.0, "gpu_thread_over_engine_api": 0.95}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str:
    root = Path(worker.__file__).resolve().parent.parent
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def environment(opts: Any, settings: Settings, pipeline: PipelineSpec) -> dict:
    import cv2
    import numpy
    import onnxruntime

    # BENCH_GIT_COMMIT first: a copy of the tree (the GPU machine's) may carry a stale .git
    commit = os.environ.get("BENCH_GIT_COMMIT") or _git("rev-parse", "HEAD") or "unknown"
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no")) if _git("rev-parse", "HEAD") else None
    return {
        "command": "python -m benchmarks " + " ".join(opts.argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": dirty,
        "host": {"hostname": platform.node(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
                 "platform": platform.platform()},
        "versions": {
            "python": sys.version.split()[0],
            "worker": worker.__version__,
            "onnxruntime": onnxruntime.__version__,
            "onnxruntime_dist": "onnxruntime-gpu" if _version("onnxruntime-gpu") else "onnxruntime",
            "onnxruntime_providers": onnxruntime.get_available_providers(),
            "numpy": numpy.__version__,
            "cv2": cv2.__version__,
            "aiokafka": _version("aiokafka"),
            "pycuda": _version("pycuda"),
        },
        "device": {"requested": settings.device},
        "pipeline": {"name": opts.pipeline, "source": pipeline.source, "label": pipeline.label,
                     "models": [m.name for m in pipeline.models]},
        "settings": {"max_batch_size": settings.max_batch_size, "max_wait_ms": settings.max_wait_ms,
                     "decoder": settings.decoder, "decode_threads": settings.decode_threads,
                     "max_in_flight": settings.max_in_flight,
                     "partitions": opts.partitions or "2 per intake process of each run",
                     "device": settings.device, "gpu_batches_in_flight": settings.gpu_batches_in_flight,
                     "gpu_batches_by_decoder": settings.gpu_batches_by_decoder,
                     "gpu_decode_thread": settings.gpu_decode_thread,
                     "hybrid_queue_per_thread": settings.hybrid_queue_per_thread,
                     "nvimgcodec_backend": str(settings.nvimgcodec_backend),
                     "nvimgcodec_options": settings.nvimgcodec_options},
    }


# --- analysis ---------------------------------------------------------------------------------------

def _at(rows: list[dict], batch_size: int) -> dict | None:
    return next((r for r in rows if r["batch_size"] == batch_size), None)


def ceiling_row(result: dict, batch_size: int) -> tuple[str, dict | None]:
    """The ceiling of the issue ("inputs already on the device"): device-resident where measured."""
    c = result.get("ceiling") or {}
    if c.get("device_resident"):
        return "device_resident", _at(c["device_resident"], batch_size)
    return "engine_api", _at(c.get("engine_api", []), batch_size)


def analysis(result: dict, settings: Settings) -> dict:
    bs = settings.max_batch_size
    out: dict[str, Any] = {"targets": TARGETS, "ratios": {}, "capacities": {}}
    w = (result.get("worker") or {}).get("images_per_s")
    kind, ceil = ceiling_row(result, bs)
    api = _at((result.get("ceiling") or {}).get("engine_api", []), bs)
    caps = out["capacities"]
    if ceil:
        caps[f"ceiling ({kind}, batch {bs})"] = ceil["images_per_s"]
    if api and kind != "engine_api":
        caps[f"engine API (batch {bs})"] = api["images_per_s"]
    if result.get("gpu_thread"):
        caps["GPU thread alone"] = result["gpu_thread"]["images_per_s"]
    for row in result.get("decode", []):
        if row["decoder"] == "nvimgcodec" and settings.decodes_on_gpu:
            caps[f"decode (nvimgcodec, batch {row['batch_size']})"] = row["images_per_s"]
        elif row["decoder"] == settings.decoder and row["threads"] == settings.decode_threads:
            caps[f"decode ({row['decoder']}, {row['threads']} threads)"] = row["images_per_s"]
    if result.get("broker"):
        caps["broker read, no processing"] = result["broker"]["records_per_s"]
    if caps:
        bound = min(caps, key=caps.get)
        out["bound"] = {"stage": bound, "images_per_s": caps[bound]}
    if w:
        r = out["ratios"]
        if ceil:
            r["worker_over_ceiling"] = w / ceil["images_per_s"]
        if api:
            r["worker_over_engine_api"] = w / api["images_per_s"]
        if result.get("gpu_thread"):
            r["worker_over_gpu_thread"] = w / result["gpu_thread"]["images_per_s"]
    if api and result.get("gpu_thread"):  # issue 11: the GPU process alone against the engine API
        out["ratios"]["gpu_thread_over_engine_api"] = result["gpu_thread"]["images_per_s"] / api["images_per_s"]
    if api and result.get("gpu_thread_rows"):
        out["ratios"]["gpu_thread_rows_over_engine_api"] = (result["gpu_thread_rows"]["images_per_s"]
                                                            / api["images_per_s"])
    if w:
        r = out["ratios"]
        if (result.get("baseline") or {}).get("images_per_s"):
            r["worker_over_baseline"] = w / result["baseline"]["images_per_s"]
        if caps:
            r["worker_over_bound"] = w / out["bound"]["images_per_s"]
        out["targets_met"] = {k: r[k] >= v for k, v in TARGETS.items() if k in r}
    bound = latency_bound(bound_run(result.get("rates") or []), result.get("round_trip"))
    if bound is not None:
        out["latency_bound"] = bound
    # Beside it, for information: the same bound with the broker's round trip for records of the images'
    # size (the rate run's input leg carries those; on tansu their p99 alone was above the worker's whole
    # p99 in run 20). The criterion stays the small records' ("latency_bound").
    sized = latency_bound(bound_run(result.get("rates") or []), result.get("round_trip_image_sized"))
    if sized is not None:
        out["latency_bound_image_sized"] = sized
    for sweep in (result.get("sweeps") or {}).values():
        for run in sweep:
            _, c = ceiling_row(result, run["settings"]["max_batch_size"])
            if c:
                run["over_ceiling"] = run["images_per_s"] / c["images_per_s"]
    return out


# --- table ------------------------------------------------------------------------------------------

def _f(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def rows(result: dict) -> list[tuple[str, ...]]:
    """(measure, images/s, p50, p95, p99, mean batch, note) rows, shared by the console and Markdown."""
    out: list[tuple[str, ...]] = []
    s = result["bench"]["settings"]
    c = result.get("ceiling") or {}
    for kind, label in (("device_resident", "ceiling: inputs on device"), ("engine_api", "engine API")):
        for row in c.get(kind, []):
            note = "from pinned host buffer, H2D+D2H" if kind == "engine_api" and c["runtime"] == "cuda" else (
                "inputs in host batch buffer" if c["runtime"] == "cpu" else "no copies")
            out.append((f"{label}, batch {row['batch_size']}", _f(row["images_per_s"]), "", "", "",
                        str(row["batch_size"]), f"{note}; {row['batch_ms_p50']:.2f} ms/batch"))
    if result.get("gpu_thread"):
        g = result["gpu_thread"]
        out.append(("GPU thread alone", _f(g["images_per_s"]), "", "", "", _f(g["mean_batch_size"]),
                    f"{'JPEG bytes, decoded on the device' if g.get('decodes_on_device') else 'pre-decoded'}, "
                    f"no Kafka; busy {g['busy_fraction']:.0%}"))
    if result.get("gpu_thread_rows"):
        g = result["gpu_thread_rows"]
        out.append(("GPU thread alone, rows decoded on the CPU", _f(g["images_per_s"]), "", "", "",
                    _f(g["mean_batch_size"]), f"pre-decoded rows through the GPU decoder's pinned path, no Kafka; "
                    f"busy {g['busy_fraction']:.0%}"))
    runs: list[tuple[str, dict]] = []
    if result.get("worker"):
        k = result["worker"]["settings"].get("intake_processes")
        runs.append((f"worker (Kafka->decode->GPU->Kafka){f', {k} intakes' if k else ''}", result["worker"]))
    for run in (result.get("sweeps") or {}).get("batch", []):
        runs.append((f"worker, max_batch_size={run['settings']['max_batch_size']}", run))
    for run in (result.get("sweeps") or {}).get("wait", []):
        runs.append((f"worker, max_wait_ms={run['settings']['max_wait_ms']:g}", run))
    for run in (result.get("sweeps") or {}).get("intakes", []):
        runs.append((f"worker, {run['settings']['intake_processes']} intake processes", run))
    for run in (result.get("sweeps") or {}).get("replicas", []):
        runs.append((f"{run['settings']['replicas']} independent workers, one GPU", run))
    for run in result.get("rates") or []:
        runs.append((f"worker at {run['fraction_of_peak']:.0%} of peak ({run['target_rate']:.0f}/s)", run))
    for label, run in runs:
        lat = run["latency_ms"]
        note = (f"{run['results']}/{run['count']} results, {run['dead_lettered']} DLQ; GPU thread busy "
                f"{run['gpu_thread_busy_fraction']:.0%}")
        note += "; latency send->result" if run["mode"] == "rate" else "; latency consumed->published"
        if run.get("duplicates"):
            note += f"; {run['duplicates']} duplicates"
        if run.get("served_late"):
            note += f"; {run['served_late']} served by the broker after a later one of their partition"
        if run.get("found_after_reread"):
            note += f"; {run['found_after_reread']} seen only after the collector re-read its topics"
        if "over_ceiling" in run:
            note += f"; {run['over_ceiling']:.2f}x ceiling"
        if run.get("images_per_s_middle") and run["mode"] != "rate":
            note += f"; middle 80% of results {run['images_per_s_middle']:,.0f}/s"
        out.append((label, _f(run["images_per_s"]), _f(lat["p50"]), _f(lat["p95"]), _f(lat["p99"]),
                    _f(run["mean_batch_size"]), note))
    if result.get("baseline"):
        b = result["baseline"]
        lat = b["latency_ms"]
        out.append(("baseline (per message, batch 1)", _f(b["images_per_s"]), _f(lat["p50"]), _f(lat["p95"]),
                    _f(lat["p99"]), "1", f"{b['results']}/{b['count']} results; consume->ack+commit"))
    for key, what in (("round_trip", ""), ("round_trip_image_sized", ", image-sized records")):
        if result.get(key):
            rt = result[key]
            lat = rt["latency_ms"]
            out.append((f"broker round trip, no worker ({rt['target_rate']:.0f}/s{what})", _f(rt["achieved_send_rate"]),
                        _f(lat["p50"]), _f(lat["p95"]), _f(lat["p99"]), "",
                        f"{rt['received']}/{rt['count']} records of {rt['payload_bytes']} B; produce->consumed"))
    if result.get("broker"):
        b = result["broker"]
        for client, c in (b.get("clients") or {"aiokafka": b}).items():
            cpu = c.get("cpu_ms_per_message")
            out.append((f"broker read, no processing ({client} alone)", _f(c["records_per_s"]), "", "", "", "",
                        f"{c['mb_per_s']:.0f} MB/s" + (f"; its CPU {cpu:.3f} ms per message (the intake's floor)"
                                                       if cpu is not None else "")))
    for row in result.get("decode", []):
        if row["decoder"] == "nvimgcodec":
            out.append((f"decode nvimgcodec on the GPU, batch {row['batch_size']}", _f(row["images_per_s"]), "",
                        "", "", "", f"decode+resize into device rows; {row['fallbacks']} OpenCV fallbacks"))
            continue
        out.append((f"decode {row['decoder']}, {row['threads']} thread{'s' if row['threads'] > 1 else ''}",
                    _f(row["images_per_s"]), "", "", "", "", f"decode+resize, {s['decode_threads']} in worker"
                    if row["threads"] == s["decode_threads"] else "decode+resize"))
    return out


HEADERS = ("measure", "images/s", "p50 ms", "p95 ms", "p99 ms", "mean batch", "notes")


def summary_lines(result: dict) -> list[str]:
    b = result["bench"]
    a = result.get("analysis", {})
    dev = b.get("device", {})
    head = (f"pipeline {b['pipeline']['name']} ({b['pipeline']['label']}) on "
            f"{dev.get('gpu_name') or dev.get('requested')}; max_batch_size {b['settings']['max_batch_size']}, "
            f"max_wait_ms {b['settings']['max_wait_ms']:g}, decoder {b['settings']['decoder']}, "
            f"{b['settings']['decode_threads']} decode threads")
    images = f"images: {result['images']['count']} JPEGs 640x480 q90, mean {result['images']['mean_bytes'] / 1000:.0f} KB"
    lines = [head, images]
    for row in (result.get("ceiling") or {}).get("new_shape", []):
        lines.append(f"first run of an unseen batch shape ({row['batch_size']} rows, no padding): "
                     f"{row['first_ms']:.1f} ms, second run {row['second_ms']:.1f} ms")
    for key, text in (result.get("ceiling") or {}).get("definitions", {}).items():
        lines.append(f"ceiling definition [{key}]: {text}")
    w = result.get("worker") or {}
    for label, run in (("GPU thread alone", result.get("gpu_thread") or {}), ("worker run", w)):
        if run.get("gpu_phases_s"):
            lines.append(f"{label}, GPU thread seconds by phase: " + ", ".join(
                f"{k} {v:.2f}" for k, v in run["gpu_phases_s"].items()))
    if w.get("gpu_batches_by_decode"):
        lines.append("worker run, GPU batches by where their images were decoded: " + ", ".join(
            f"{k} {v['batches']} x {v['mean_ms']:.1f} ms" for k, v in w["gpu_batches_by_decode"].items()))
    if w.get("cpu_busy_fraction"):
        busy = ", ".join(f"{k} {v:.0%}" for k, v in sorted(w["cpu_busy_fraction"].items(), key=lambda kv: -kv[1]))
        per = ", ".join(f"{k} {v:.3f}" for k, v in sorted(w["cpu_ms_per_message"].items(), key=lambda kv: -kv[1]))
        lines.append(f"worker run, CPU busy per process group (1.0 = one core): {busy}")
        lines.append(f"worker run, CPU ms per message: {per} (from the first message; intakes each from "
                     f"their own)")
        procs = (w.get("intake_cpu") or {}).get("processes") or []
        if procs:
            lines.append("worker run, intake CPU ms per message, per process: " + ", ".join(
                f"{p['ms_per_message']:.3f} ({p['consumed']})" for p in procs if p["ms_per_message"] is not None))
        groups = (w.get("intake_cpu") or {}).get("groups_ms_per_message")
        if groups:
            lines.append("worker run, intake CPU ms per message by thread group (all intakes): " + ", ".join(
                f"{g} {v:.3f}" for g, v in sorted(groups.items(), key=lambda kv: -kv[1])))
        if w.get("gc_pauses"):
            lines.append("worker run, garbage-collector pauses (they hold the GIL): " + ", ".join(
                f"{g} {v['count']} x, {v['total_ms']:.0f} ms total, max {v['max_ms']:.1f} ms"
                for g, v in w["gc_pauses"].items()))
        stages = w.get("stages_ms", {})
        if stages.get("decode", {}).get("mean") is not None:
            lines.append("worker run, mean ms per message: " + ", ".join(
                f"{k} {v['mean']:.2f}" for k, v in stages.items() if v.get("mean") is not None))
        spans = [span for span in w.get("intake_spans_s") or [] if span]
        if len(spans) > 1:  # intakes starting apart make a short run's ramp and tail (docs/benchmarks.md, run 21)
            firsts, lasts = [span[0] for span in spans], [span[1] for span in spans]
            lines.append(f"worker run, intakes' first messages {max(firsts) - min(firsts):.2f} s apart, last ones "
                         f"{max(lasts) - min(lasts):.2f} s apart (of {max(lasts):.2f} s)")
        if w.get("longest_gap"):
            gap = w["longest_gap"]
            lines.append(f"worker run, longest time without a new result: {gap['ms']:.1f} ms, from "
                         f"{gap['after_s']:.2f} s after the first message")
        if w.get("slowest_batches"):
            lines.append("worker run, slowest GPU batches: " + ", ".join(
                f"{b['ms']:.1f} ms ({b['images']} images, consumed {b['consumed_at_s']:.2f} s after the first message)"
                for b in w["slowest_batches"]))
        intake = w.get("intake") or {}
        if intake.get("polls"):
            lines.append(f"worker run, intake: {intake['records_per_poll']:.1f} records per poll, "
                         f"{intake.get('poll_wait_s_per_intake', 0):.1f} s waiting in poll per intake since it "
                         f"started (max_in_flight {intake['max_in_flight']} per intake)")
    r = a.get("ratios", {})
    if r:
        lines.append("ratios: " + ", ".join(f"{k} = {v:.2f}" for k, v in r.items()))
    if a.get("bound"):
        lines.append(f"lowest capacity: {a['bound']['stage']} at {a['bound']['images_per_s']:,.0f} images/s")
    lb = a.get("latency_bound")
    if lb:
        lines.append(f"latency at {lb['fraction_of_peak']:.0%} of peak: p99 {lb['p99_ms']:.1f} ms "
                     f"{'<=' if lb['met'] else '>'} bound {lb['bound_ms']:.1f} ms = max_wait {lb['max_wait_ms']:g} "
                     f"+ 3 x batch {lb['batch_ms']:.2f} + broker round trip p99 {lb['broker_round_trip_p99_ms']:.1f}: "
                     f"{'met' if lb['met'] else 'NOT met'}")
    lb = a.get("latency_bound_image_sized")
    if lb:
        lines.append(f"the same with the broker's round trip for image-sized records (information): p99 "
                     f"{lb['p99_ms']:.1f} ms {'<=' if lb['met'] else '>'} {lb['bound_ms']:.1f} ms (round trip p99 "
                     f"{lb['broker_round_trip_p99_ms']:.1f})")
    if a.get("targets_met"):
        lines.append("targets: " + ", ".join(f"{k} >= {TARGETS[k]:g}: {'met' if v else 'NOT met'}"
                                              for k, v in a["targets_met"].items()))
    lines.append(f"{b['date']}, commit {b['git_commit'][:12]}{' (dirty)' if b.get('git_dirty') else ''}, "
                 f"python {b['versions']['python']}, onnxruntime {b['versions']['onnxruntime']}, "
                 f"numpy {b['versions']['numpy']}, cv2 {b['versions']['cv2']}, "
                 f"{b['host']['cpu_count']} CPUs ({b['host']['cpu']})")
    return lines


def console_table(result: dict) -> Table:
    table = Table(title=f"bench: {result['bench']['pipeline']['name']}")
    for i, h in enumerate(HEADERS):
        table.add_column(h, justify="right" if 0 < i < 6 else "left")
    for row in rows(result):
        table.add_row(*row)
    return table


def markdown(result: dict) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join(["---"] + ["---:"] * 5 + ["---"]) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows(result)]
    return "\n".join(lines + [""] + [f"- {line}" for line in summary_lines(result)]) + "\n"


def write_json(result: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2, default=str) + "\n")

"""Repeated runs of the bench side by side: is a ratio reached as a rule, or once? (issue 11)

One run of the issue's command is about 1.5 s of work on a shared host whose speed drifts: on one H100 the
same command gave 0.706-0.929x the ceiling within an hour (docs/benchmarks.md, run 26). A single number says
little, so a lease runs the variants in turn (A B A B ..., ``tests/gpu/run_on_device.sh repeat``) and this
reads their JSON files (each ``python -m benchmarks ... --json``) and gives, per variant (the runs whose
commands are the same apart from where they write), each run's worker/ceiling ratio in the order they ran,
the median, the lowest, and how many reached the target; and beside them what explains a low one: the
middle 80% (no ramp, no tail), a late intake (its first message more than ``LATE_S`` after the first
intake's: the local broker's late SyncGroup answer, run 24), the GPU thread's busy fraction and time per
batch, and the intake event loop's CPU per message. Every ratio is against the run's own ceiling,
measured in the same run.

    python -m benchmarks.repeats RUN.json ... [--target 0.9] [--json out.json] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.report import ceiling_row

LATE_S = 0.5  # an intake whose first message came this much after the first intake's joined late
# flags that say where a run writes or how much it logs, not what it measures
_OUTPUT_FLAGS = {"--json", "--markdown", "--log-level"}


def command_flags(command: str) -> dict[str, str]:
    """A bench command line as {flag: value} (a flag without a value: ""), output flags left out."""
    words = shlex.split(command)
    if "benchmarks" in words:
        words = words[words.index("benchmarks") + 1:]
    flags: dict[str, str] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if word.startswith("--") and "=" in word:  # --flag=value
            word, value = word.split("=", 1)
            if word not in _OUTPUT_FLAGS:
                flags[word] = value
        elif word.startswith("--"):
            value = ""
            if i + 1 < len(words) and not words[i + 1].startswith("--"):
                value = words[i + 1]
                i += 1
            if word not in _OUTPUT_FLAGS:
                flags[word] = value
        i += 1
    return flags


def labels(commands: Sequence[dict[str, str]]) -> list[str]:
    """Each variant named by the flags whose values differ between the variants (all the same: "all")."""
    names = sorted({f for c in commands for f in c})
    differ = [f for f in names if len({c.get(f) for c in commands}) > 1]
    if not differ:
        return ["all"] * len(commands)
    return [" ".join(f"{f} {c[f]}".strip() if f in c else f"(no {f})" for f in differ) for c in commands]


def run_row(result: dict) -> dict[str, Any]:
    """One run's numbers: the ratio to its own ceiling and what explains it."""
    bench = result.get("bench") or {}
    worker = result.get("worker") or {}
    settings = bench.get("settings") or {}
    _, ceiling = ceiling_row(result, settings.get("max_batch_size", 0))
    ceiling_ips = ceiling["images_per_s"] if ceiling else None
    ips, middle = worker.get("images_per_s"), worker.get("images_per_s_middle")
    firsts = [span[0] for span in worker.get("intake_spans_s") or [] if span]
    apart = max(firsts) - min(firsts) if firsts else None
    loops = [p["loop_ms_per_message"] for p in (worker.get("intake_cpu") or {}).get("processes", [])
             if p.get("loop_ms_per_message")]
    return {
        "date": bench.get("date"), "commit": (bench.get("git_commit") or "")[:12],
        "card": (bench.get("device") or {}).get("gpu_name") or (bench.get("device") or {}).get("device"),
        "ceiling_images_per_s": ceiling_ips, "images_per_s": ips,
        "ratio": ips / ceiling_ips if ips and ceiling_ips else None,
        "middle_ratio": middle / ceiling_ips if middle and ceiling_ips else None,
        "intakes_apart_s": apart, "late_intake": apart is not None and apart > LATE_S,
        "gpu_busy": worker.get("gpu_thread_busy_fraction"), "gpu_batch_ms": worker.get("gpu_batch_ms"),
        "mean_batch_size": worker.get("mean_batch_size"),
        "loop_ms_per_message": statistics.fmean(loops) if loops else None,
        "complete": worker.get("missing") == 0 and worker.get("results") == worker.get("count"),
        "errors": sorted(result.get("errors") or {}),
    }


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def summarise(results: Sequence[dict], target: float = 0.9) -> dict[str, Any]:
    """Runs grouped by variant (in the order the first of each ran), each run in the order it ran."""
    ordered = sorted(results, key=lambda r: (r.get("bench") or {}).get("date") or "")
    keys: list[tuple[tuple[str, str], ...]] = []
    groups: dict[tuple[tuple[str, str], ...], list[dict]] = {}
    for result in ordered:
        key = tuple(sorted(command_flags((result.get("bench") or {}).get("command", "")).items()))
        if key not in groups:
            keys.append(key)
            groups[key] = []
        groups[key].append(run_row(result))
    variants = []
    for key, label in zip(keys, labels([dict(k) for k in keys])):
        rows = groups[key]
        ratios = [r["ratio"] for r in rows]
        known = [x for x in ratios if x is not None]
        variants.append({
            "label": label, "command_flags": dict(key), "runs": rows, "n": len(rows),
            "ratios": ratios, "median": _median(ratios), "lowest": min(known) if known else None,
            "highest": max(known) if known else None, "reached": sum(1 for x in known if x >= target),
            "median_middle": _median([r["middle_ratio"] for r in rows]),
            "late_intakes": sum(1 for r in rows if r["late_intake"]),
            "median_gpu_busy": _median([r["gpu_busy"] for r in rows]),
            "median_gpu_batch_ms": _median([r["gpu_batch_ms"] for r in rows]),
            "median_loop_ms_per_message": _median([r["loop_ms_per_message"] for r in rows]),
            "incomplete": sum(1 for r in rows if not r["complete"]),
        })
    rows = [r for v in variants for r in v["runs"]]
    return {"target": target, "runs": len(rows), "variants": variants,
            "cards": sorted({r["card"] for r in rows if r["card"]}),
            "commits": sorted({r["commit"] for r in rows if r["commit"]}),
            "dates": [min(d), max(d)] if (d := [r["date"] for r in rows if r["date"]]) else []}


def _x(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(summary: dict[str, Any]) -> str:
    target = summary["target"]
    lines = [f"{summary['runs']} runs on {', '.join(summary['cards']) or '?'}, commit "
             f"{', '.join(summary['commits']) or '?'}, {' to '.join(summary['dates']) or '?'}; "
             f"target {target}x the ceiling (each run's own)", "",
             f"| variant | runs | worker / ceiling, in the order run | median | lowest | >= {target} | "
             "middle 80%, median | late intakes | GPU busy | ms per batch | intake loop ms/msg |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in summary["variants"]:
        each = ", ".join(_x(x) + ("*" if r["late_intake"] else "") + ("!" if not r["complete"] else "")
                         for x, r in zip(v["ratios"], v["runs"]))
        lines.append(f"| {v['label']} | {v['n']} | {each} | {_x(v['median'])} | {_x(v['lowest'])} | "
                     f"{v['reached']} of {v['n']} | {_x(v['median_middle'])} | {v['late_intakes']} | "
                     f"{_x(v['median_gpu_busy'], 2)} | {_x(v['median_gpu_batch_ms'], 1)} | "
                     f"{_x(v['median_loop_ms_per_message'])} |")
    lines += ["", f"`*`: an intake started more than {LATE_S} s after the first (the local broker's late "
              "SyncGroup answer); `!`: results missing."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.repeats", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="JSON files written by python -m benchmarks --json")
    parser.add_argument("--target", type=float, default=0.9, help="the worker/ceiling ratio to reach")
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    args = parser.parse_args(argv)
    results, unreadable = [], []
    for path in args.runs:
        try:
            results.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:  # a run killed by its timeout leaves no or half a file
            unreadable.append(f"{path}: {exc}")
    for line in unreadable:
        print(f"skipped {line}", file=sys.stderr)
    if not results:
        print("no readable run", file=sys.stderr)
        return 2
    summary = summarise(results, args.target)
    summary["unreadable"] = unreadable
    table = markdown(summary)
    print(table, end="")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    if args.markdown:
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m benchmarks`: ceiling, worker and per-message baseline of one pipeline on one device, in one run.

Run from a checkout (the bench is not in the wheel nor in the image): `python -m benchmarks --help`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from worker import log
from worker import settings as settings_mod
from worker.errors import ConfigError


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def pipeline_path(name: str) -> Path:
    """The same resolution as `worker run`/`replay` (worker.service.pipeline_path): a bundled name or a file."""
    from worker.service import pipeline_path as resolve

    return resolve(name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Start a local broker, preload 640x480 q90 JPEGs, and measure in one run: the engines' "
                    "ceiling (inference only, inputs in place), the worker end to end, the per-message "
                    "baseline, decode capacity, optional batch/wait sweeps and rate-limited runs. Prints a "
                    "table; --json writes everything.")
    p.add_argument("--pipeline", dest="bench_pipeline", default="demo", metavar="demo|resnet50|resnet50_fp16|FILE",
                   help="demo (bundled exact-function models), resnet50 (ResNet-50-shaped), resnet50_fp16 (the "
                        "same in float16), or a pipeline file.")
    p.add_argument("--count", type=int, default=2000, help="Images in the main worker run (default 2000).")
    p.add_argument("--unique", type=int, default=256, help="Distinct images, cycled up to --count (default 256).")
    p.add_argument("--partitions", type=int, default=0,
                   help="Partitions of each run's input topic (default 0: two per intake process of the run).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the generated images.")
    p.add_argument("--baseline-count", type=int, default=200,
                   help="Messages through the per-message baseline (default 200; 0 skips it).")
    p.add_argument("--sweep-batch", type=_ints, default=[], metavar="B1,B2,..",
                   help="Worker runs with these max_batch_size values (ceiling measured at each too).")
    p.add_argument("--sweep-wait", type=_floats, default=[], metavar="MS1,MS2,..",
                   help="Worker runs with these max_wait_ms values.")
    p.add_argument("--sweep-count", type=int, default=0, help="Images per sweep run (default: --count).")
    p.add_argument("--rates", type=_floats, default=[0.5, 0.9], metavar="F1,F2,..",
                   help="Rate-limited runs at these fractions of the measured peak (default 0.5,0.9; '' skips).")
    p.add_argument("--rate-seconds", type=float, default=4.0, help="Length of each rate-limited run (default 4).")
    p.add_argument("--decode-threads", type=_ints, default=[], metavar="T1,T2,..",
                   help="Decode capacity thread counts (default: 1 and the worker's decode threads).")
    p.add_argument("--sweep-intakes", type=_ints, default=[], metavar="K1,K2,..",
                   help="Also run the worker with these numbers of intake processes (e.g. 1,2,4,8).")
    p.add_argument("--sweep-replicas", type=_ints, default=[], metavar="N1,N2,..",
                   help="Also run N independent workers (one intake and one GPU process each, one group) on "
                        "the same GPU: the alternative to one GPU process fed by several intakes.")
    p.add_argument("--ceiling-seconds", type=float, default=2.0, help="Time per ceiling measurement (default 2).")
    p.add_argument("--skip", default="", metavar="PART,..",
                   help="Leave out parts: decode, ceiling, gpu_thread, worker, broker, baseline, sweeps, rates, "
                        "round_trip (the broker's own round trip, for the latency bound of the 50%% run).")
    p.add_argument("--broker", choices=("tansu", "kafka"), default="tansu",
                   help="The broker started for the run where --bootstrap-servers is left at 'local': tansu (the "
                        "embedded one, default) or kafka (Apache Kafka, single node, from tests/kafka_broker.py: "
                        "java on PATH and the jars fetched once with Maven, or carried in WORKER_KAFKA_CACHE).")
    p.add_argument("--json", dest="json_path", default="", help="Write every number to this JSON file.")
    p.add_argument("--markdown", dest="markdown_path", default="", help="Write the table as Markdown here.")
    settings_mod.add_arguments(p, exclude=frozenset({"pipeline"}))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return cmd_bench(args, argv)
    except ConfigError as exc:
        print(f"benchmarks: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def cmd_bench(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from benchmarks import report
    from benchmarks.harness import PARTS, BenchOptions, run_bench

    path = pipeline_path(args.bench_pipeline)
    overrides: dict[str, object] = {"pipeline": str(path)}
    defaults = {"bootstrap_servers": "local", "http_port": 0, "log_level": "warning",
                # a fresh group on the local broker joins in about half the session timeout
                "session_timeout_ms": 6000,
                # tansu holds a fetch for about 40% of fetch_max_wait_ms even when records arrive
                # meanwhile (Kafka answers at once): 500 ms adds ~200 ms to every hop's latency
                "fetch_max_wait_ms": 20}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            overrides[name] = value
    s = settings_mod.load(vars(args), **overrides)
    log.configure(s.log_format, s.log_level)
    skip = {p.strip() for p in args.skip.split(",") if p.strip()}
    unknown = skip - set(PARTS)
    if unknown:
        raise ConfigError(f"--skip {sorted(unknown)}: unknown parts; known: {', '.join(PARTS)}")
    opts = BenchOptions(pipeline=args.bench_pipeline, pipeline_path=path, count=args.count, unique=args.unique,
                        seed=args.seed, partitions=args.partitions, baseline_count=args.baseline_count,
                        sweep_batch=args.sweep_batch, sweep_wait=args.sweep_wait, sweep_count=args.sweep_count,
                        rates=args.rates, rate_seconds=args.rate_seconds, decode_threads=args.decode_threads,
                        ceiling_seconds=args.ceiling_seconds, sweep_intakes=args.sweep_intakes,
                        sweep_replicas=args.sweep_replicas, skip=skip, argv=list(argv), broker=args.broker)
    console = Console(width=None if sys.stdout.isatty() else 200)  # a log file gets the whole table
    checkpoint = (lambda result: report.write_json(result, args.json_path)) if args.json_path else None
    result = asyncio.run(run_bench(opts, s, console, checkpoint))
    console.print(report.console_table(result))
    for line in report.summary_lines(result):
        console.print(line, highlight=False, markup=False)
    if args.json_path:
        report.write_json(result, args.json_path)
        console.print(f"wrote {args.json_path}")
    if args.markdown_path:
        Path(args.markdown_path).write_text(report.markdown(result))
    runs = [result.get("worker"), *(result.get("sweeps") or {}).get("batch", []),
            *(result.get("sweeps") or {}).get("wait", []), *(result.get("rates") or []), result.get("baseline")]
    for part, trace in result["errors"].items():
        console.print(f"[red]part {part} failed:[/red]")
        console.print(trace, highlight=False, markup=False)
    incomplete = [r for r in runs if r and r.get("missing")]
    if incomplete:
        console.print(f"[red]{len(incomplete)} run(s) lost messages: some inputs got no result[/red]")
        return 1
    return 1 if result["errors"] else 0

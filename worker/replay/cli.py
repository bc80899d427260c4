"""`worker replay`: run the worker's pipeline over a bounded range of a topic, then exit.

The command resolves the range against the broker (failing with exit code 2 and a message before
anything is processed), derives the replay's consumer group, and runs ``worker.service.serve`` with a
``ReplayPlan``: the same stages, commits and drain as `worker run`. While it runs it shows a progress
bar with an ETA on a terminal, or logs a JSON progress line every few seconds; at the end it prints a
summary (a table on a terminal, one JSON object on stdout otherwise).

Exit codes: 0 every selected partition reached its end; 1 the worker failed (a crashed stage, a
device error); 2 bad flags or range; 3 stopped before the end (SIGTERM/SIGINT): run the same command
again to resume.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from worker import log, settings as settings_mod
from worker.errors import ConfigError
from worker.replay import ReplayPlan, RangeSpec, range_spec, replay_group_id, resolve
from worker.settings import Settings

EXIT_INCOMPLETE = 3

EXAMPLES = """\
examples:
  worker replay --from-beginning --until end --output-topic results.v2
  worker replay --from-timestamp 2026-11-01T00:00:00Z --until-timestamp 2026-11-02T00:00:00Z --rate 200
  worker replay --from-offset 0:1200,3:900 --until-offset 0:5000,3:4000
  worker replay --from-beginning --partitions 0,1 --replay-group backfill-2026-11

Run the same command again after a kill or SIGTERM: it resumes from the replay group's commits.
"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "replay", help="Reprocess a bounded range of the input topic (backfill), resumably, then exit.",
        description="Run the worker's pipeline over a range of the input topic and exit 0 when every selected "
                    "partition reached its end. Progress is committed under a replay consumer group, so a "
                    "killed replay resumes where it stopped.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    rng = p.add_argument_group("range (offsets are per partition; an end offset is exclusive)")
    start = rng.add_mutually_exclusive_group(required=True)
    start.add_argument("--from-beginning", action="store_true", help="Start at the log start of each partition.")
    start.add_argument("--from-offset", metavar="P:O,...", help="Start at these offsets (selects these partitions).")
    start.add_argument("--from-timestamp", metavar="TIME",
                       help="Start at the first message at or after TIME: ISO 8601 (no zone: UTC) or epoch ms.")
    end = rng.add_mutually_exclusive_group()
    end.add_argument("--until", choices=["end"],
                     help="Stop at the end offsets read when the replay starts (the default): later traffic "
                          "does not extend the run.")
    end.add_argument("--until-offset", metavar="P:O,...", help="Stop before these offsets (exclusive).")
    end.add_argument("--until-timestamp", metavar="TIME",
                     help="Stop before the first message at or after TIME (ISO 8601 or epoch ms).")
    rng.add_argument("--partitions", metavar="P,...",
                     help="Partitions to replay. Default: those named by --from-offset/--until-offset, else all.")
    run = p.add_argument_group("replay")
    run.add_argument("--replay-group", metavar="GROUP",
                     help="Consumer group holding the replay's progress. Default: <group-id>-replay-<hash of "
                          "range, output topic, models and --run-id>. Never the live group.")
    run.add_argument("--run-id", default="", metavar="ID",
                     help="Mixed into the derived group: a new id reprocesses an identical range from its start.")
    run.add_argument("--rate", type=float, default=0.0, metavar="N",
                     help="At most N messages/s (0: unlimited), so a backfill does not starve live consumers.")
    run.add_argument("--progress-interval", type=float, default=5.0, metavar="SECONDS",
                     help="Seconds between JSON progress lines when stdout is not a terminal (default 5).")
    settings_mod.add_arguments(p)
    p.set_defaults(func=cmd_replay)


def cmd_replay(args: argparse.Namespace) -> int:
    terminal = sys.stdout.isatty()
    overrides: dict[str, object] = {}
    if terminal and args.log_level is None and "WORKER_LOG_LEVEL" not in os.environ:
        overrides["log_level"] = "warning"  # keep the progress bar readable
    settings = settings_mod.load(vars(args), **overrides)
    log.configure(settings.log_format, settings.log_level)
    if args.rate < 0:
        raise ConfigError(f"--rate must be >= 0 messages/s (0: unlimited), got {args.rate}")
    spec = range_spec(settings.input_topic, from_beginning=args.from_beginning, from_offset=args.from_offset,
                      from_timestamp=args.from_timestamp, until=args.until, until_offset=args.until_offset,
                      until_timestamp=args.until_timestamp, partitions=args.partitions)
    outcome = asyncio.run(run_replay(settings, spec, group=args.replay_group, run_id=args.run_id, rate=args.rate,
                                     terminal=terminal, progress_interval_s=args.progress_interval))
    return outcome.exit_code


@dataclass
class Outcome:
    exit_code: int
    summary: dict[str, Any]
    plan: ReplayPlan


async def run_replay(settings: Settings, spec: RangeSpec, *, group: str | None = None, run_id: str = "",
                     rate: float = 0.0, terminal: bool = False, progress_interval_s: float = 5.0,
                     out: TextIO | None = None, worker_out: list | None = None) -> Outcome:
    """Validate and resolve the range, run the pipeline over it, print the summary."""
    from worker.service import pipeline_for

    out = out or sys.stdout
    logger = log.get("replay")
    if settings.output_topic == settings.input_topic:
        raise ConfigError(f"--output-topic {settings.output_topic!r} is the input topic: results would be "
                          "read back as images")
    # A seek that falls out of range (retention) must go to the log start, never skip to the end.
    settings = settings.replace(auto_offset_reset="earliest")
    pipeline = pipeline_for(settings)  # a bad pipeline file fails here, before the broker is asked
    resolved = await resolve(spec, settings)
    for warning in resolved.warnings:
        logger.warning(warning)
    group = group or replay_group_id(settings.group_id, spec, settings.output_topic, pipeline.label, run_id)
    if group == settings.group_id:
        raise ConfigError(f"--replay-group {group!r} is the live consumer group: a replay needs its own group "
                          "so that it never moves the live worker's offsets")
    plan = ReplayPlan(spec.topic, resolved.ranges, group, rate=rate or None)
    logger.info("replay starting", group_id=group, topic=spec.topic, start=spec.start.describe(),
                until=spec.until.describe(), output_topic=settings.output_topic, dlq_topic=settings.dlq_topic,
                rate=rate or None, ranges={p: [r.start, r.end] for p, r in resolved.ranges.items()})
    started = time.monotonic()
    if worker_out is None:  # the process model of `worker run`, with one intake (below)
        code, summary = await _run_in_processes(settings, plan, terminal, progress_interval_s, started)
    else:  # in this process, for tests that look into the Worker
        code, summary = await _run_here(settings, plan, terminal, progress_interval_s, out, worker_out, started)
    _print_summary(summary, terminal, out)
    event = {0: "replay finished", EXIT_INCOMPLETE: "replay stopped before its end; run it again to resume"}
    (logger.info if code == 0 else logger.warning)(
        event.get(code, "replay failed"), **{k: v for k, v in summary.items() if k != "ranges"})
    return Outcome(code, summary, plan)


async def _run_in_processes(settings: Settings, plan: ReplayPlan, terminal: bool, interval_s: float,
                            started: float) -> tuple[int, dict[str, Any]]:
    """One intake: a replay assigns every partition of its range to itself (no group rebalance), so a
    second intake would replay the same records. Its progress is printed by the intake, its summary
    comes back as the intake's report."""
    from worker.supervisor import supervise

    outcome = await supervise(settings, plan=plan, intakes=1,
                              hooks=ReplayHooks(settings, terminal, interval_s, started))
    code = outcome.exit_code
    if outcome.reports:
        summary = outcome.reports[0]
        summary["ranges"] = {int(p): r for p, r in summary["ranges"].items()}  # JSON keys are strings
        if code == 0 and summary["status"] != "complete":
            code = EXIT_INCOMPLETE
        if code != summary["exit_code"]:
            summary.update(exit_code=code, status={0: "complete", EXIT_INCOMPLETE: "incomplete"}.get(code, "failed"))
    else:  # stopped before the intake ran (models failed to load, a signal during start-up)
        code = code or EXIT_INCOMPLETE
        summary = _summary(plan, None, settings, code, started)
    summary["wall_s"] = round(time.monotonic() - started, 3)
    return code, summary


async def _run_here(settings: Settings, plan: ReplayPlan, terminal: bool, interval_s: float, out: TextIO,
                    workers: list, started: float) -> tuple[int, dict[str, Any]]:
    from worker.service import serve

    reporter = asyncio.create_task(_report(plan, workers, terminal, interval_s, out))
    try:
        code = await serve(settings, plan=plan, worker_out=workers)
    finally:
        reporter.cancel()
        await asyncio.gather(reporter, return_exceptions=True)
    if code == 0 and not plan.finished:
        code = EXIT_INCOMPLETE
    return code, _summary(plan, workers[0] if workers else None, settings, code, started)


@dataclass
class ReplayHooks:
    """The replay's part of its intake process (worker.intake.process.IntakeHooks)."""

    settings: Settings
    terminal: bool
    interval_s: float
    started: float

    async def during(self, worker: Any) -> None:
        await _report(worker.plan, [worker], self.terminal, self.interval_s, sys.stdout)

    def report(self, worker: Any, code: int) -> dict[str, Any]:
        if code == 0 and not worker.plan.finished:
            code = EXIT_INCOMPLETE
        return _summary(worker.plan, worker, self.settings, code, self.started)


# --- progress and summary ------------------------------------------------------------------------
def _done(worker: Any) -> int:
    return worker.counts["published"] + worker.counts["dead_lettered"]


async def _report(plan: ReplayPlan, workers: list, terminal: bool, interval_s: float, out: TextIO) -> None:
    while not workers or plan.attached_at is None:  # models load first: nothing to show until attached
        await asyncio.sleep(0.1)
    worker = workers[0]
    if terminal:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        columns = (TextColumn("replay"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                   TextColumn("{task.fields[dlq]} DLQ"), TimeElapsedColumn(), TextColumn("ETA"),
                   TimeRemainingColumn())
        with Progress(*columns, console=Console(file=out), transient=False) as progress:
            task = progress.add_task("replay", total=max(1, plan.total), dlq=0)
            try:
                while True:
                    progress.update(task, completed=_done(worker), dlq=worker.counts["dead_lettered"])
                    await asyncio.sleep(0.5)
            finally:
                progress.update(task, completed=_done(worker), dlq=worker.counts["dead_lettered"])
    logger = log.get("replay", group_id=plan.group_id)
    while True:
        await asyncio.sleep(interval_s)
        done, total = _done(worker), plan.total
        elapsed = time.monotonic() - plan.attached_at
        rate = done / elapsed if elapsed > 0 else 0.0
        logger.info("replay progress", done=done, total=total,
                    percent=round(100.0 * done / total, 1) if total else 100.0, rate_per_s=round(rate, 1),
                    eta_s=round((total - done) / rate, 1) if rate > 0 else None,
                    dead_lettered=worker.counts["dead_lettered"], in_flight=worker.tracker.in_flight())


def _summary(plan: ReplayPlan, worker: Any, settings: Settings, code: int, started: float) -> dict[str, Any]:
    counts = dict(worker.counts) if worker is not None else {"consumed": 0, "published": 0,
                                                             "dead_lettered": 0, "failed": 0}
    now = time.monotonic()
    duration = now - plan.attached_at if plan.attached_at is not None else 0.0
    finished = counts["published"] + counts["dead_lettered"]
    uncommitted = worker.tracker.to_commit() if worker is not None else {}
    status = {0: "complete", EXIT_INCOMPLETE: "incomplete"}.get(code, "failed")
    return {
        "status": status, "exit_code": code, "group_id": plan.group_id, "topic": plan.topic,
        "output_topic": settings.output_topic, "dlq_topic": settings.dlq_topic,
        "ranges": {tp.partition: [r.start, r.end] for tp, r in plan.ranges.items()},
        "range_messages": sum(r.size for r in plan.ranges.values()),
        "already_done": plan.already_done,
        "processed": counts["consumed"], "published": counts["published"],
        "dead_lettered": counts["dead_lettered"], "failed": counts["failed"],
        "rate_per_s": round(finished / duration, 1) if duration > 0 and finished else 0.0,
        "duration_s": round(duration, 3), "wall_s": round(now - started, 3),
        "throttled_s": round(plan.limiter.waited_s, 3) if plan.limiter else 0.0,
        # A final commit that did not land means a rerun redoes these (at-least-once, never lost).
        "uncommitted_partitions": len(uncommitted),
    }


def _print_summary(summary: dict[str, Any], terminal: bool, out: TextIO) -> None:
    if not terminal:
        print(json.dumps(summary, separators=(",", ":")), file=out, flush=True)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"worker replay: {summary['status']}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [("consumer group", summary["group_id"]),
            ("range", f"{summary['topic']} partitions "
                      + ", ".join(f"{p}:[{s},{e})" for p, (s, e) in summary["ranges"].items())),
            ("messages in range", f"{summary['range_messages']}"),
            ("already done by earlier runs", f"{summary['already_done']}"),
            ("processed", f"{summary['processed']}"),
            (f"published to {summary['output_topic']}", f"{summary['published']}"),
            (f"dead-lettered to {summary['dlq_topic']}", f"{summary['dead_lettered']}"),
            ("failed (left uncommitted)", f"{summary['failed']}"),
            ("rate", f"{summary['rate_per_s']:.1f} msg/s"),
            ("duration (processing / wall)", f"{summary['duration_s']:.1f} s / {summary['wall_s']:.1f} s")]
    if summary["throttled_s"]:
        rows.append(("throttled by --rate", f"{summary['throttled_s']:.1f} s"))
    for name, value in rows:
        table.add_row(name, value)
    console = Console(file=out)
    console.print(table)
    if summary["status"] == "incomplete":
        console.print("[yellow]stopped before the end: run the same command again to resume[/yellow]")

"""Entry point: `worker run | demo | replay` (the bench is not in the package: `python -m benchmarks`
from a checkout).

Every sub-command takes the same settings flags (also read from WORKER_* variables); see
`worker run --help`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from worker import __version__, log, settings as settings_mod
from worker.errors import ConfigError
from worker.replay.cli import register as register_replay


def _settings(args: argparse.Namespace, **overrides: object):
    return settings_mod.load(vars(args), **overrides)


def cmd_run(args: argparse.Namespace) -> int:
    from worker.supervisor import supervise

    s = _settings(args)
    log.configure(s.log_format, s.log_level)
    return asyncio.run(supervise(s)).exit_code


def cmd_demo(args: argparse.Namespace) -> int:
    from worker import demo

    overrides: dict[str, object] = {}
    if args.bootstrap_servers is None:
        overrides["bootstrap_servers"] = "local"  # start the embedded broker
    if args.log_level is None:
        overrides["log_level"] = "warning"  # keep the progress bar readable
    if args.http_port is None:
        overrides["http_port"] = 0
    if args.session_timeout_ms is None:
        overrides["session_timeout_ms"] = 6000  # a fresh group on a local broker: join fast
    s = _settings(args, **overrides)
    return demo.main(args.count, s, args.partitions, args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="worker", description="Kafka worker for GPU image inference.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="Consume images, infer, publish results (the streaming worker).",
                         description="Run the streaming worker until SIGTERM.")
    settings_mod.add_arguments(run)
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="Everything on one machine: local broker, sample images, bundled models.",
                          description="Start a local broker, write sample images, run the worker on them, "
                                      "read every result back and print a summary.")
    demo.add_argument("--count", type=int, default=500, help="Sample images to process (default 500).")
    demo.add_argument("--partitions", type=int, default=4, help="Partitions of the input topic (default 4).")
    demo.add_argument("--seed", type=int, default=0, help="Seed of the generated images.")
    settings_mod.add_arguments(demo)
    demo.set_defaults(func=cmd_demo)

    register_replay(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"worker: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

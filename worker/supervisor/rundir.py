"""The run folder: what every child process of one run leaves for the supervisor, and how it is read.

Each child writes, under its process name: ``metrics-<name>.prom`` (its latest Prometheus snapshot),
``counts-<name>.json`` (its message counts) and, for intakes, ``report-<name>.json`` (IntakeHooks.report).
A file half-written or gone is skipped: the next read, or the child's next snapshot, has it. ``log.lock``
is the lock every process takes around a long log line (worker.log.lock_lines).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from worker.metrics import merge_expositions


class RunDir:
    """A temporary folder for one run: created here, removed by ``remove`` (every exit path of the run)."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or tempfile.mkdtemp(prefix="gpuworker-run-")

    def __str__(self) -> str:
        return self.path

    def counts(self) -> dict[str, int]:
        """Every process's counts, summed by name."""
        total: dict[str, int] = {}
        for path in Path(self.path).glob("counts-*.json"):
            try:
                for name, n in json.loads(path.read_text()).items():
                    total[name] = total.get(name, 0) + int(n)
            except (OSError, ValueError):
                continue
        return total

    def reports(self) -> list[dict[str, Any]]:
        """The intakes' reports, in process-name order."""
        out = []
        for path in sorted(Path(self.path).glob("report-*.json")):
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        return out

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class MergedMetrics:
    """``/metrics``: every process's latest snapshot, labelled by process (and GPU processes' series, when
    there are several, by ``gpu``: their device index, as DCGM's exporter labels a card)."""

    def __init__(self, run_dir: str, labels: dict[str, dict[str, str]] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.labels = labels or {}

    def exposition(self) -> bytes:
        texts = {}
        for path in sorted(self.run_dir.glob("metrics-*.prom")):
            try:
                texts[path.stem.removeprefix("metrics-")] = path.read_bytes()
            except OSError:
                continue
        return merge_expositions(texts, self.labels)

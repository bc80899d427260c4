"""``/healthz`` and ``/readyz`` of the whole pod, read from the board every process beats on.

Pure over the board (worker.ipc.board): no I/O, so a test sets rows and calls ``liveness``/``readiness``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from worker.health import STALE_AFTER_S
from worker.ipc.board import Row, intake_row


class ProcessHealth:
    """``/healthz`` and ``/readyz`` over every process (the board), for worker.health.make_app. Models are
    ready only when every GPU process is warm: a pod with one GPU still loading is not ready."""

    def __init__(self, board: Any, intakes: int, gpus: int = 1) -> None:
        self.board = board
        self.intakes = intakes
        self.gpus = gpus
        self.children_alive: Callable[[], bool] = lambda: False  # the supervisor's check of its children

    def _gpu_rows(self) -> list[Row]:
        return [Row(self.board, g) for g in range(self.gpus)]

    def _intake_rows(self) -> list[Row]:
        return [Row(self.board, intake_row(i, self.gpus)) for i in range(1, self.intakes + 1)]

    def liveness(self, now: float | None = None) -> tuple[bool, dict]:
        now = time.monotonic() if now is None else now
        gpu_age = max(now - r.get("beat") for r in self._gpu_rows())  # the stalest GPU process
        ages = [now - r.get("beat") for r in self._intake_rows()]
        checks = {"models_ready": all(bool(r.get("ready")) for r in self._gpu_rows()),
                  "gpu_heartbeat_age_s": round(gpu_age, 3),
                  "intake_heartbeat_age_s": round(max(ages), 3) if ages else None,
                  "processes_alive": self.children_alive()}
        ok = (checks["models_ready"] and checks["processes_alive"] and gpu_age < STALE_AFTER_S
              and all(a < STALE_AFTER_S for a in ages))
        return ok, checks

    def readiness(self) -> tuple[bool, dict]:
        rows = self._intake_rows()
        warm = sum(bool(r.get("ready")) for r in self._gpu_rows())
        checks = {"models_ready": warm == self.gpus, "gpus_ready": warm, "gpus": self.gpus,
                  "intakes_joined": sum(bool(r.get("joined")) for r in rows), "intakes": self.intakes,
                  "broker_reachable": all(bool(r.get("broker_ok")) for r in rows)}
        ok = checks["models_ready"] and checks["intakes_joined"] == self.intakes and checks["broker_reachable"]
        return ok, checks

"""A status board in shared memory: per process, a heartbeat and a few flags, for the supervisor's
``/healthz`` and ``/readyz``. Rows 0..N-1 are the GPU processes (N = 1 unless ``gpu_devices`` gives
several), rows N..N+K-1 the intakes (``intake_row``): with one GPU, row 0 and 1..K. Plain doubles written
by one process each and read by the supervisor: a torn read of a flag is impossible (aligned 8-byte
stores) and a stale one is corrected half a second later."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

FIELDS = ("beat", "ready", "joined", "broker_ok", "connected")  # connected: an intake about to join
WIDTH = len(FIELDS)


def new_board(ctx: Any, rows: int) -> Any:
    return ctx.Array("d", rows * WIDTH, lock=False)


def intake_row(index: int, gpus: int) -> int:
    """The row of intake ``index`` (1..K) on a board whose first ``gpus`` rows are the GPU processes."""
    return gpus + index - 1


def intake_rows(board: Sequence[float], gpus: int) -> list[int]:
    """Every intake's row on ``board`` (the rows after the GPU processes')."""
    return list(range(gpus, len(board) // WIDTH))


class Row:
    """One process's row: it writes, the supervisor reads."""

    def __init__(self, board: Sequence[float], index: int) -> None:
        self.board = board
        self.base = index * WIDTH

    def set(self, **values: float | bool) -> None:
        for name, value in values.items():
            self.board[self.base + FIELDS.index(name)] = float(value)  # type: ignore[index]

    def beat(self) -> None:
        self.set(beat=time.monotonic())

    def get(self, name: str) -> float:
        return self.board[self.base + FIELDS.index(name)]

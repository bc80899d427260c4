"""A status board in shared memory: per process, a heartbeat and a few flags, for the supervisor's
``/healthz`` and ``/readyz``. Row 0 is the GPU process, rows 1..K the intakes. Plain doubles written
by one process each and read by the supervisor: a torn read of a flag is impossible (aligned 8-byte
stores) and a stale one is corrected half a second later."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

FIELDS = ("beat", "ready", "joined", "broker_ok")
WIDTH = len(FIELDS)


def new_board(ctx: Any, rows: int) -> Any:
    return ctx.Array("d", rows * WIDTH, lock=False)


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

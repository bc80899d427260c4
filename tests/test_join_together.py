"""The pod's intakes join their consumer group together (worker.intake.process.join_together): each says
it is connected on the board, then waits, bounded, for the others; the Worker subscribes only after."""

from __future__ import annotations

import asyncio

import pytest

from tests.test_guarantees import make_worker, until
from worker.ipc.board import WIDTH, Row, intake_row, intake_rows
from worker.intake.process import join_together

pytestmark = pytest.mark.timeout(30)


def board(gpus: int, intakes: int) -> list[float]:
    return [0.0] * ((gpus + intakes) * WIDTH)


def test_intake_rows_are_the_rows_after_the_gpu_processes():
    assert intake_rows(board(1, 3), 1) == [1, 2, 3] == [intake_row(i, 1) for i in (1, 2, 3)]
    assert intake_rows(board(2, 2), 2) == [2, 3]


async def test_an_intake_waits_until_every_other_intake_is_connected():
    b = board(1, 3)
    own, second, third = (Row(b, r) for r in intake_rows(b, 1))
    waiting = asyncio.create_task(join_together(own, [second, third], bound_s=10, poll_s=0.001))
    await asyncio.sleep(0.05)
    assert own.get("connected") == 1.0 and not waiting.done()
    second.set(connected=True)
    await asyncio.sleep(0.05)
    assert not waiting.done(), "one intake is still connecting"
    third.set(connected=True)
    assert await asyncio.wait_for(waiting, 5) is True


async def test_the_wait_is_bounded_when_an_intake_never_connects():
    b = board(1, 2)
    own, other = (Row(b, r) for r in intake_rows(b, 1))
    assert await asyncio.wait_for(join_together(own, [other], bound_s=0.05, poll_s=0.001), 5) is False
    assert own.get("connected") == 1.0


async def test_the_worker_subscribes_only_after_before_join(monkeypatch):
    gate = asyncio.Event()

    async def before_join() -> None:
        await gate.wait()

    worker, consumer, _, _ = make_worker(monkeypatch)
    worker._before_join = before_join
    run = asyncio.create_task(worker.run())
    await asyncio.sleep(0.2)
    assert consumer.listener is None, "subscribed before the pod's intakes were connected"
    gate.set()
    await until(lambda: consumer.listener is not None)
    worker.request_stop()
    assert await run == 0


async def test_a_stop_while_waiting_to_join_exits_cleanly_without_subscribing(monkeypatch):
    async def never() -> None:
        await asyncio.Event().wait()

    worker, consumer, _, _ = make_worker(monkeypatch)
    worker._before_join = never
    run = asyncio.create_task(worker.run())
    await asyncio.sleep(0.1)
    worker.request_stop()
    assert await asyncio.wait_for(run, 10) == 0
    assert consumer.listener is None and consumer.commits == []

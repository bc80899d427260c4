"""Bounds and deadlines (issue 12): bytes in flight, the uncommitted span, a message that never finishes.

- ``Backpressure`` and ``ProgressClock`` are pure: plain calls.
- A burst of large images through a worker in process, on the real broker, with a byte bound far below
  what ``max_in_flight`` allows: the worker's bytes in flight never pass the bound (a message larger than
  the whole bound only alone), and every input gets its own result.
- A GPU that never answers one message (fakes of tests/test_guarantees.py): backpressure pauses on the
  uncommitted span, which stays bounded, nothing at or past the stuck offset is committed, and the
  deadline stops the worker with exit code 1 naming the message.
"""

from __future__ import annotations

import asyncio
import sys

import numpy as np
import pytest

from tests.helpers import check_demo_result, produce, read_all, result_doc, source_of
from tests.test_guarantees import TP0, HeldGpu, make_worker, msg, until
from worker import log
from worker.broker import create_topics
from worker.errors import FatalError
from worker.intake.consume import Backpressure, Load, ProgressClock
from worker.samples import encode
from worker.service import serve

MB = 1 << 20


# --- the policy -------------------------------------------------------------------------------------------
def test_bytes_bound_pauses_and_resumes_only_below_every_low_mark():
    bp = Backpressure(high=100, low=50, high_bytes=8 * MB, high_span=1000)
    assert bp.update(Load(3, 7 * MB, 0)) is None
    assert bp.update(Load(3, 8 * MB, 0)) == "pause" and bp.reason == "bytes"
    assert bp.update(Load(3, 4 * MB + 1, 0)) is None  # above half the byte bound: still paused
    assert bp.update(Load(3, 4 * MB, 600)) is None and bp.reason == "span"  # bytes low, the span is not
    assert bp.update(Load(51, 4 * MB, 500)) is None  # and now the message count
    assert bp.update(Load(50, 4 * MB, 500)) == "resume" and bp.reason == ""


def test_span_bound_pauses_with_one_message_in_flight():
    bp = Backpressure(high=1024, low=512, high_span=10_240)
    assert bp.update(Load(1, 0, 10_239)) is None
    assert bp.update(Load(1, 0, 10_240)) == "pause" and bp.reason == "span"
    assert bp.update(Load(0, 0, 10_240)) is None  # the stuck message's entries are still there


def test_admission_fits_the_byte_bound_and_lets_a_lone_giant_through():
    bp = Backpressure(high=4, low=2, high_bytes=8 * MB)
    assert bp.admits(Load(2, 5 * MB), 3 * MB)  # exactly at the bound
    assert not bp.admits(Load(2, 5 * MB), 3 * MB + 1)
    assert bp.admits(Load(0, 0), 20 * MB)  # nothing in flight: larger than the whole bound, alone
    assert bp.admits(Load(1, 0), 20 * MB)  # a message left unfinished by a retriable failure holds no bytes
    assert not bp.admits(Load(4, 0), 1)  # the message bound still holds
    assert Backpressure(high=4, low=2).admits(Load(3, 100 * MB), 100 * MB)  # 0: no byte bound


def test_progress_clock_stands_still_while_not_running():
    clock = ProgressClock(now=100.0)
    assert clock.read(101.0, running=True) == 1.0
    assert clock.read(131.0, running=False) == 1.0  # 30 s of broker outage do not count
    assert clock.read(133.0, running=True) == 3.0
    assert clock.read(132.0, running=True) == 3.0  # never backwards


# --- a burst of large images through a real worker -------------------------------------------------------
def _color(i: int) -> tuple[int, int, int]:
    return (i * 5) % 256, 255 - (i * 3) % 256, (i * 7 + 11) % 256


@pytest.mark.timeout(300)
async def test_burst_of_large_images_stays_under_the_byte_bound_and_every_input_gets_its_result(settings):
    """40 BMPs of 3 MB and one of 12 MB against max_in_flight_bytes=8 MB, with max_in_flight=1024: at
    most two 3 MB images (6 MB) fit at once, the 12 MB one only alone. Uniform colours: the models'
    exact outputs are those of a 64x64 image of the same colour, whatever the resize."""
    bound = 8 * MB
    settings = settings.replace(max_in_flight_bytes=bound, max_partition_fetch_bytes=16 * MB, max_bytes=20 * MB,
                                producer_max_request_size=1 * MB)
    await create_topics(settings.bootstrap_servers, [(settings.input_topic, 2), (settings.output_topic, 2),
                                                    (settings.dlq_topic, 1)])
    n = 41
    sizes = [(1024, 1024)] * 20 + [(2048, 2048)] + [(1024, 1024)] * 20  # the giant mid-stream
    blobs = [encode(np.full((h, w, 3), _color(i), np.uint8), "bmp") for i, (h, w) in enumerate(sizes)]
    largest = max(len(b) for b in blobs)
    assert len(blobs[0]) > 3 * MB - 1 and largest > bound
    coords = await produce(settings.bootstrap_servers, settings.input_topic, blobs, 2)
    index = {c: i for i, c in enumerate(coords)}

    workers: list = []
    flips: list[tuple[str, str]] = []
    after_start: list[int] = []  # the worker's bytes in flight right after each message started
    task = asyncio.create_task(serve(settings, worker_out=workers))
    try:
        await until(lambda: bool(workers) or task.done(), timeout=60)
        worker = workers[0]
        update = worker.backpressure.update

        def recording(load):
            flip = update(load)
            if flip is not None:
                flips.append((flip, worker.backpressure.reason))
            return flip
        worker.backpressure.update = recording
        start = worker._start_message

        def sampled(tp, m):
            task = start(tp, m)
            after_start.append(worker.in_flight_bytes)
            return task
        worker._start_message = sampled
        records = await read_all(settings.bootstrap_servers, settings.output_topic, n, timeout_s=240, settle_s=1.0)
    finally:
        if workers:
            workers[0].request_stop()
        code = await task
    assert code == 0
    peak = worker.peak_in_flight_bytes
    print(f"\nburst: {n} images ({sum(map(len, blobs)) / MB:.0f} MB), bound {bound / MB:.0f} MB, peak in flight "
          f"{peak / MB:.1f} MB, backpressure flips {len(flips)}")
    assert len(after_start) == n
    assert all(b <= bound or b == largest for b in after_start), after_start  # the giant only alone
    assert max(b for b in after_start if b <= bound) == 2 * len(blobs[0])  # the room was used
    assert peak == largest
    assert ("pause", "bytes") in flips
    assert worker.in_flight_bytes == 0 and not worker._held
    assert len(records) == n and {source_of(r) for r in records} == set(coords)
    for rec in records:
        i = index[source_of(rec)]
        check_demo_result(result_doc(rec), np.full((64, 64, 3), _color(i), np.uint8))


# --- a message that never finishes -----------------------------------------------------------------------
class GpuThatLosesOne(HeldGpu):
    """Answers every request at once, except the one for ``stuck`` offset: that reply never comes."""

    def __init__(self, stuck: int) -> None:
        super().__init__()
        self.stuck = stuck
        self.lost: list = []

    def submit(self, req) -> None:
        if req.context.get("offset") == self.stuck:
            self.lost.append(req)
            return
        self.held.append(req)
        self.release()


@pytest.fixture
def _log_here():
    log.configure("json", "warning", stream=sys.stderr)


async def test_a_message_that_never_finishes_pauses_on_the_span_then_stops_the_worker(monkeypatch, _log_here):
    span_bound, deadline_s = 40, 3.0
    worker, consumer, publisher, _ = make_worker(monkeypatch, max_in_flight=8, resume_in_flight=4,
                                                 max_uncommitted_span=span_bound, message_deadline_s=deadline_s,
                                                 commit_interval_ms=50)
    gpu = worker.gpu = GpuThatLosesOne(stuck=3)
    consumer.highwater = lambda tp: None  # the lag probe asks for it
    spans: list[int] = []
    run = asyncio.create_task(worker.run())
    await until(lambda: consumer.listener is not None)
    consumer.assigned = {TP0}
    await consumer.listener.on_partitions_assigned({TP0})
    consumer.queue = [msg(0, o) for o in range(500)]

    async def sample() -> None:
        while True:
            spans.append(worker.tracker.span())
            await asyncio.sleep(0.01)
    sampler = asyncio.create_task(sample())
    # (the first poll fills max_in_flight at once: a pause on the message count may come first; then the
    # span is what keeps the partitions paused)
    await until(lambda: consumer.paused == {TP0} and worker.backpressure.reason == "span", timeout=5)
    assert gpu.lost and worker.tracker.in_flight() == 1  # one message in flight: the count bound never trips
    polls = consumer.polls
    code = await asyncio.wait_for(run, deadline_s + 5)
    sampler.cancel()

    assert code == 1
    assert consumer.polls > polls  # polling went on while paused (group membership)
    assert isinstance(worker._fatal, FatalError)
    assert "topic=in partition=0 offset=3" in str(worker._fatal) and "message_deadline_s=3" in str(worker._fatal)
    assert max(spans) <= span_bound + 8  # the bound, overshot by at most one poll (max_in_flight records)
    assert len(consumer.queue) > 400  # most of the input was never fetched: paused
    assert consumer.commits and all(c[TP0] <= 3 for c in consumer.commits)  # nothing at or past the stuck one
    assert consumer.commits[-1] == {TP0: 3}

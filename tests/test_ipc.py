"""The shared-memory transport's pure parts and its segments, by plain calls."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import orjson
import pytest

from worker import errors
from worker.decode.headers import ImageInfo
from worker.ipc import payload, shm, wire
from worker.metrics import Metrics, merge_expositions


def test_requests_round_trip_with_and_without_image_headers() -> None:
    info = ImageInfo("jpeg", 640, 480, 3, 8, "rgb", 24)
    sent = [wire.Request(wire.Kind.ENCODED, 3, 7, 76_000, 2, 1812, info),
            wire.Request(wire.Kind.ROWS, -1, 4_000_000_000, 150_528, 0, 2**40, None),
            wire.Request(wire.Kind.ENCODED, 0, 9, 10, 11, 12, ImageInfo("png", 1, 2, 4, 16, "rgba", 64))]
    assert wire.unpack_requests(wire.pack_requests(sent)) == sent


def test_replies_round_trip_slot_and_inline() -> None:
    sent = [wire.Reply(1, 5, wire.Status.OK, 120, wire.Placement.SLOT),
            wire.Reply(2, -1, wire.Status.POISON, 3, wire.Placement.INLINE, b"abc"),
            wire.Reply(3, 0, wire.Status.FATAL, 0, wire.Placement.INLINE, b"")]
    assert wire.unpack_replies(wire.pack_replies(sent)) == sent


def test_a_reply_message_is_not_taken_for_requests() -> None:
    with pytest.raises(ValueError, match="not a request message"):
        wire.unpack_requests(wire.pack_replies([]))


def test_results_are_json_with_nan_as_null_and_each_models_outputs_reach_the_record_unparsed() -> None:
    post = [{"logits": [{"index": 3, "score": float("nan")}], "label": "a\nb"}, {"mean": np.float32(0.5)}]
    data = payload.encode_result(post, 0.001, 0.02, 7)
    doc = payload.decode_result(data)
    assert {k: doc[k] for k in "qib"} == {"q": 0.001, "i": 0.02, "b": 7}
    assert all(isinstance(p, orjson.Fragment) for p in doc["p"])
    # embedded as they are in the result's JSON: NaN is null, a newline in a string stays escaped
    assert orjson.loads(orjson.dumps({"models": doc["p"]})) == {
        "models": [{"logits": [{"index": 3, "score": None}], "label": "a\nb"}, {"mean": 0.5}]}
    assert b"pickle" not in data and data.startswith(b"{")


@pytest.mark.parametrize("exc, status, cls, reason", [
    (errors.ModelRejectedInput("model m failed on this input alone"), wire.Status.POISON,
     errors.ModelRejectedInput, "model_error"),
    (errors.UndecodableImage("jpeg: bad"), wire.Status.POISON, errors.UndecodableImage, "undecodable_image"),
    (errors.PoisonMessage("odd", reason="custom_reason"), wire.Status.POISON, errors.PoisonMessage, "custom_reason"),
    (errors.DeviceError("device failure", cuda_error="CUDA_ERROR_ILLEGAL_ADDRESS"), wire.Status.RETRIABLE,
     errors.DeviceError, None),
    (errors.EngineFailure("engine broken"), wire.Status.FATAL, errors.EngineFailure, None),
    (ValueError("a bug"), wire.Status.FATAL, errors.FatalError, None),
])
def test_errors_cross_as_the_same_verdict(exc, status, cls, reason) -> None:
    got_status, data = payload.encode_error(exc)
    assert got_status == status
    back = payload.decode_error(got_status, data)
    assert type(back) is cls and str(exc) in str(back)
    if reason is not None:
        assert back.reason == reason
    if isinstance(exc, errors.DeviceError):
        assert back.cuda_error == "CUDA_ERROR_ILLEGAL_ADDRESS"


def test_merged_metrics_label_each_process_and_keep_one_family() -> None:
    a, b = Metrics(), Metrics()
    a.consumed.inc(3)
    b.consumed.inc(4)
    b.batch_size.observe(8)
    text = merge_expositions({"intake-1": a.exposition(), "gpu": b.exposition()}).decode()
    assert 'worker_messages_consumed_total{process="intake-1"} 3.0' in text
    assert 'worker_messages_consumed_total{process="gpu"} 4.0' in text
    assert text.count("# TYPE worker_messages_consumed_total counter") == 1
    assert 'worker_batch_size_count{process="gpu"} 1.0' in text


def test_segment_create_attach_share_bytes_and_unlink() -> None:
    name = shm.segment_name("test-ring")
    seg = shm.Segment.create(name, 4096)
    try:
        other = shm.Segment.attach(name)
        seg.buf[10:13] = b"abc"
        assert bytes(other.buf[10:13]) == b"abc" and other.size == 4096
        other.close()
        assert name in shm.owned_by(shm.creator_token())
    finally:
        seg.close()
        seg.unlink()
    assert not (shm.SHM_DIR / name).exists()


def test_clean_stale_removes_segments_of_dead_creators_only(tmp_path) -> None:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(child.stdout)
    stale = shm.segment_name("ring1", f"{dead}.12345")
    reused = shm.segment_name("ring1", f"{os.getpid()}.1")  # our pid, another start time: a restart's leftover
    live = shm.segment_name("ring1")
    for name in (stale, reused, live):
        (shm.SHM_DIR / name).write_bytes(b"x")
    try:
        removed = shm.clean_stale()
        assert stale in removed and reused in removed and live not in removed
        assert (shm.SHM_DIR / live).exists()
    finally:
        for name in (stale, reused, live):
            shm.unlink(name)


def test_rows_written_by_the_client_are_read_back_as_views(tmp_path) -> None:
    """The intake writes a request's model rows back to back into its slot; the GPU side carves views of
    the models' shapes out of the same bytes."""
    from worker.ipc.client import _write

    rows = [np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3), np.full((4, 4, 1), 7, np.uint8)]
    buf = memoryview(bytearray(100))
    _write(buf, 10, [memoryview(r).cast("B") for r in rows])
    first = np.frombuffer(buf, np.uint8, rows[0].size, 10).reshape(rows[0].shape)
    second = np.frombuffer(buf, np.uint8, rows[1].size, 10 + rows[0].size).reshape(rows[1].shape)
    np.testing.assert_array_equal(first, rows[0])
    np.testing.assert_array_equal(second, rows[1])


async def test_a_send_that_fails_after_the_gpu_process_said_why_reports_why_not_the_broken_pipe() -> None:
    """The GPU process sends its FATAL message (a CUDA error) and exits; an intake's next send fails on the
    closed pipe before its loop has run the reader thread's news. The worker must stop naming the CUDA
    error (CI saw "link broken: BrokenPipeError" win this race once), and the request fails with it."""
    import asyncio
    import time
    from multiprocessing import Pipe

    from worker.gpu.requests import InferenceRequest
    from worker.ipc.client import GpuClient

    ours, theirs = Pipe()
    theirs.send_bytes(wire.pack_fatal("DeviceError: CUDA error: an illegal memory access was encountered"))
    theirs.close()
    name = shm.segment_name("test-link")
    seg = shm.Segment.create(name, 4 * 1024)
    client = GpuClient([ours], seg, slots=4, slot_bytes=1024, decodes_on_device=False)
    told: list[BaseException] = []
    client.on_fatal = told.append
    try:
        await client.start()
        time.sleep(0.3)  # the loop is blocked: the reader has read the FATAL message, its news waits in the loop
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        await client.put(InferenceRequest([np.zeros((4, 4, 3), np.uint8)], future, loop, {"partition": 0, "offset": 0}))
        client._flush()  # the send fails on the closed pipe, still before the reader's news is run
        with pytest.raises(errors.FatalError) as caught:
            await asyncio.wait_for(future, 5)
        await asyncio.sleep(1.2)  # past the broken pipe's own verdict: it must not replace the first
    finally:
        client.stop()
        seg.close()
        seg.unlink()
    assert "illegal memory access" in str(caught.value)
    assert "illegal memory access" in str(client.fatal_error) and "Broken" not in str(client.fatal_error)
    assert len(told) == 1


def test_the_gpu_link_hands_a_jpeg_over_as_a_view_of_its_slot_and_rows_likewise() -> None:
    """The GPU process's end of a link makes each request's image a view of the intake's slot, JPEG bytes
    included (run 25: copying them out under the GIL stalled the GPU thread at start-up); an image that
    overflowed its slot (a segment of its own, closed at once) is copied."""
    from types import SimpleNamespace

    from worker.gpu.link import IntakeLink

    name = shm.segment_name("test-link")
    seg = shm.Segment.create(name, 4 * 256)
    overflow = shm.Segment.create(wire.overflow_name(name, 9), 300)
    try:
        jpeg = b"\xff\xd8" + bytes(range(100)) + b"\xff\xd9"
        seg.buf[256:256 + len(jpeg)] = jpeg
        overflow.buf[:300] = bytes(300)
        spec = SimpleNamespace(preprocess=SimpleNamespace(hwc_shape=(2, 3, 3)))
        link = IntakeLink(1, None, seg, 256, [spec], SimpleNamespace(), lambda exc: None)  # type: ignore[arg-type]
        info = ImageInfo("jpeg", 640, 480, 3, 8, "rgb", 24)
        req = link._request(wire.Request(wire.Kind.ENCODED, 1, 7, len(jpeg), 0, 5, info))
        data = req.encoded.data
        assert isinstance(data, memoryview) and bytes(data) == jpeg
        seg.buf[256] = 0  # the slot itself: what the intake writes there is what the decoder reads
        assert data[0] == 0
        big = link._request(wire.Request(wire.Kind.ENCODED, -1, 9, 300, 0, 6, info))
        assert isinstance(big.encoded.data, bytes) and len(big.encoded.data) == 300
        seg.buf[512:512 + 18] = bytes(range(18))
        rows = link._request(wire.Request(wire.Kind.ROWS, 2, 8, 18, 0, 7))
        assert rows.inputs[0].shape == (2, 3, 3) and not rows.inputs[0].flags.owndata
        del data, req, rows
    finally:
        overflow.close()
        overflow.unlink()
        seg.close()
        seg.unlink()


# --- /dev/shm room: pages taken at creation, a clear error where there is none -----------------------
@pytest.fixture
def small_shm(tmp_path, monkeypatch):
    """A 1 MiB tmpfs standing in for /dev/shm (mounting one needs root; skipped, with the reason, where that
    is not allowed)."""
    where = tmp_path / "shm"
    where.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    monkeypatch.setattr(shm, "SHM_DIR", where)
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_segments_pages_are_taken_when_it_is_created() -> None:
    """Allocated up front (not a sparse file whose pages come at first write): a full /dev/shm fails at
    creation, and the first burst of images does not fault each page in."""
    name = shm.segment_name("test-pages")
    seg = shm.Segment.create(name, 1 << 20)
    try:
        assert os.stat(shm.SHM_DIR / name).st_blocks * 512 >= 1 << 20
    finally:
        seg.close()
        seg.unlink()


def test_a_segment_that_does_not_fit_fails_at_creation_with_the_sizes_and_leaves_no_file(small_shm) -> None:
    name = shm.segment_name("test-ring1")
    with pytest.raises(errors.SharedMemoryFull) as caught:
        shm.Segment.create(name, 2 << 20)
    assert isinstance(caught.value, errors.ConfigError)  # at start-up: the CLI's configuration error, exit 2
    text = str(caught.value)
    assert name in text and "(2.0 MiB; 1.0 MiB free" in text and "--shm-size" in text
    with pytest.raises(errors.SharedMemoryFull, match=r"--shm-size\), lower ipc_slots$"):
        shm.Segment.create(name, 2 << 20, advice="lower ipc_slots")
    assert list(small_shm.iterdir()) == []


def test_a_full_dev_shm_reported_by_fallocate_is_the_same_clear_error(monkeypatch) -> None:
    """Whatever the size of the real /dev/shm: ENOSPC (or a memory cgroup's ENOMEM) from the allocation."""
    import errno

    def full(fd: int, offset: int, size: int) -> None:
        raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

    monkeypatch.setattr(shm.os, "posix_fallocate", full)
    name = shm.segment_name("test-full")
    with pytest.raises(errors.SharedMemoryFull, match="Cannot allocate memory"):
        shm.Segment.create(name, 4096)
    assert not (shm.SHM_DIR / name).exists()


def _rows_request(nbytes: int, offset: int):
    import asyncio

    from worker.gpu.requests import InferenceRequest

    loop = asyncio.get_running_loop()
    return InferenceRequest([np.ones((nbytes, 1, 1), np.uint8)], loop.create_future(), loop,
                            {"partition": 0, "offset": offset})


async def test_a_large_image_waits_for_room_the_runs_large_images_free_and_fails_clearly_when_none_can_come(
        small_shm, monkeypatch) -> None:
    """Images larger than a slot travel in segments of their own, each unlinked when answered. One that finds
    /dev/shm full waits for its intake's own in flight, or for other intakes' (a segment of the run it did
    not make, looked for again and again) instead of stopping the worker; where even all of those would not
    make room, or the others' stay past OVERFLOW_WAIT_S, SharedMemoryFull: its slot is given back."""
    import asyncio
    from multiprocessing import Pipe

    from worker.ipc import client as client_mod
    from worker.ipc.client import GpuClient

    ours, theirs = Pipe()
    seg = shm.Segment.create(shm.segment_name("test-link"), 4 * 1024)
    client = GpuClient([ours], seg, slots=4, slot_bytes=1024, decodes_on_device=False)
    loop = asyncio.get_running_loop()
    result = payload.encode_result([{}], 0.0, 0.0, 1)

    async def answer_next() -> None:
        sent = wire.unpack_requests(await loop.run_in_executor(None, theirs.recv_bytes))
        theirs.send_bytes(wire.pack_replies([wire.Reply(r.request_id, -1, wire.Status.OK, len(result),
                                                        wire.Placement.INLINE, result) for r in sent]))

    try:
        await client.start()
        first = _rows_request(600 * 1024, 0)
        await client.put(first)
        second = _rows_request(600 * 1024, 1)
        waiting = asyncio.ensure_future(client.put(second))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # no room until the first is answered
        await answer_next()
        await asyncio.wait_for(first.future, 5)
        await asyncio.wait_for(waiting, 5)  # the first's answer unlinked its segment: room for the second
        with pytest.raises(errors.SharedMemoryFull, match="overflowPerIntake"):  # larger than all room to come
            await client.put(_rows_request(2 << 20, 2))
        await answer_next()
        await asyncio.wait_for(second.future, 5)
        # another intake's large image (a segment of the run's links this client did not make) holds the room
        other = shm.Segment.create(wire.overflow_name(seg.name, 999), 700 * 1024)
        other.close()
        third_request = _rows_request(400 * 1024, 3)
        third = asyncio.ensure_future(client.put(third_request))
        await asyncio.sleep(0.3)
        assert not third.done()  # looking again while the other's segment is there
        shm.unlink(wire.overflow_name(seg.name, 999))
        await asyncio.wait_for(third, 5)  # found the room the other's answer freed
        await answer_next()
        await asyncio.wait_for(third_request.future, 5)
        other = shm.Segment.create(wire.overflow_name(seg.name, 998), 700 * 1024)
        other.close()
        monkeypatch.setattr(client_mod, "OVERFLOW_WAIT_S", 0.3)
        with pytest.raises(errors.SharedMemoryFull):  # the other's stays: not forever
            await client.put(_rows_request(400 * 1024, 4))
        shm.unlink(wire.overflow_name(seg.name, 998))
    finally:
        client.stop()
        seg.close()
        seg.unlink()
    assert len(client._free) == 4 and not list(small_shm.iterdir())  # every slot back, no segment left


def test_the_overflow_pattern_covers_every_ring_of_the_run_and_only_them() -> None:
    from fnmatch import fnmatch

    pattern = wire.overflow_pattern("gpuworker-12.345-abcd1234-ring3")
    assert fnmatch(wire.overflow_name("gpuworker-12.345-abcd1234-ring1", 7), pattern)
    assert fnmatch(wire.overflow_name("gpuworker-12.345-abcd1234-ring12", 7), pattern)
    assert not fnmatch(wire.overflow_name("gpuworker-12.345-ffff0000-ring1", 7), pattern)  # another run
    assert not fnmatch("gpuworker-12.345-abcd1234-ring1", pattern)  # a ring is not freed by an answer
    assert wire.overflow_pattern("gpuworker-1.2-test-link") == "gpuworker-1.2-test-link-o*"

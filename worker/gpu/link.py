"""The GPU process's end of one intake's link.

A receiver thread reads request messages, makes an ``InferenceRequest`` per image whose rows, or whose
JPEG, are a view of the intake's slot (no copy: the slot is the request's until it is answered, after
its batch ran; the GPU thread copies rows into pinned staging with the rest of the batch, nvImageCodec
reads the JPEG where it lies), and submits them to the GPU thread. The GPU thread
resolves each request through ``ReplySink`` (it calls ``loop.call_soon_threadsafe`` once per batch and
intake): the callbacks only queue, so the GPU thread does no per-image reply work. A reply thread
runs them, encodes each result into its request's slot (or inline when larger), and sends one reply
message per batch.

If the intake goes away, its requests are still run (the GPU thread cannot take them back) and their
replies dropped; the intake's offsets for them were never committed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from worker import log
from worker.decode.message import Encoded
from worker.gpu.thread import GpuThread
from worker.gpu.requests import InferenceRequest, InferenceResult
from worker.ipc import payload, wire
from worker.ipc.client import shutdown_socket
from worker.ipc.shm import Segment
from worker.models.postprocess import postprocess
from worker.models.spec import ModelSpec

_CLOSE = object()


class ReplySink:
    """Stands in for an event loop in ``InferenceRequest.loop``: the GPU thread's resolutions queue
    here and the link's reply thread runs them."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def call_soon_threadsafe(self, fn: Callable[..., Any], *args: Any) -> None:
        self.queue.put((fn, args))


class SlotFuture:
    """Stands in for an asyncio future: setting it encodes the reply for the intake."""

    __slots__ = ("link", "request", "_done")

    def __init__(self, link: IntakeLink, request: wire.Request) -> None:
        self.link = link
        self.request = request
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, result: InferenceResult) -> None:
        self._done = True
        self.link.answer(self.request, result, None)

    def set_exception(self, exc: BaseException) -> None:
        self._done = True
        self.link.answer(self.request, None, exc)


class IntakeLink:
    def __init__(self, index: int, conn: Connection, segment: Segment, slot_bytes: int,
                 specs: Sequence[ModelSpec], gpu: GpuThread, on_fatal: Callable[[BaseException], None]) -> None:
        self.index = index
        self.conn = conn
        self.segment = segment
        self.slot_bytes = slot_bytes
        self.specs = list(specs)
        self.row_shapes = [s.preprocess.hwc_shape for s in self.specs]
        self.gpu = gpu
        self.on_fatal = on_fatal
        self.sink = ReplySink()
        self.lost = False
        self._out: list[wire.Reply] = []
        self._receiver = threading.Thread(target=self._receive, name=f"link-{index}-in", daemon=True)
        self._replier = threading.Thread(target=self._reply, name=f"link-{index}-out", daemon=True)
        self._log = log.get("ipc", intake=index)

    def start(self) -> None:
        self._receiver.start()
        self._replier.start()

    # --- requests ------------------------------------------------------------------------
    def _receive(self) -> None:
        while True:
            try:
                message = self.conn.recv_bytes()
            except (EOFError, OSError):
                self.lost = True
                self._log.info("intake link closed")
                self.sink.queue.put(_CLOSE)
                return
            try:
                for req in wire.unpack_requests(message):
                    self.gpu.submit(self._request(req))
            except BaseException as exc:  # noqa: BLE001 - a malformed message or a stopped GPU thread
                self.on_fatal(exc)
                return

    def _request(self, req: wire.Request) -> InferenceRequest:
        context = {"intake": self.index, "partition": req.partition, "offset": req.offset}
        future = SlotFuture(self, req)
        data = self._payload(req)
        if req.kind == wire.Kind.ENCODED:
            # Not copied out: run 25 saw the GPU thread wait 80-120 ms at start-up while the burst's copies
            # (~136 MB) were made here under the GIL; with views (and the rings' pages taken at start) run 26
            # saw no early decode step over 21 ms (docs/benchmarks.md)
            encoded = Encoded(data, req.info, None, 0.0)
            return InferenceRequest(None, future, self.sink, context, encoded=encoded)  # type: ignore[arg-type]
        rows, pos = [], 0
        for shape in self.row_shapes:
            n = int(np.prod(shape))
            rows.append(np.frombuffer(data, np.uint8, n, pos).reshape(shape))
            pos += n
        if pos != req.nbytes:
            raise ValueError(f"request {req.request_id}: {req.nbytes} bytes of rows, the models take {pos}")
        return InferenceRequest(rows, future, self.sink, context)  # type: ignore[arg-type]

    def _payload(self, req: wire.Request) -> Any:
        if req.slot >= 0:
            start = req.slot * self.slot_bytes
            return self.segment.buf[start:start + req.nbytes]
        seg = Segment.attach(wire.overflow_name(self.segment.name, req.request_id))
        try:
            return bytes(seg.buf[:req.nbytes])  # copied: the intake unlinks it once answered
        finally:
            seg.close()

    # --- replies -------------------------------------------------------------------------
    def answer(self, req: wire.Request, result: InferenceResult | None, error: BaseException | None) -> None:
        """Runs on the reply thread (from the sink's callbacks): encode one reply."""
        if error is None:
            assert result is not None
            post = result.postprocessed
            if post is None:  # the batch's vectorised post-processing failed, or an item ran alone
                post = [postprocess(out, spec) for out, spec in zip(result.outputs, self.specs)]
            status, data = wire.Status.OK, payload.encode_result(post, result.queue_s, result.inference_s,
                                                                  result.batch_size)
        else:
            status, data = payload.encode_error(error)
        if req.slot >= 0 and len(data) <= self.slot_bytes:
            start = req.slot * self.slot_bytes
            self.segment.buf[start:start + len(data)] = data
            self._out.append(wire.Reply(req.request_id, req.slot, status, len(data), wire.Placement.SLOT))
        else:
            self._out.append(wire.Reply(req.request_id, req.slot, status, len(data), wire.Placement.INLINE, data))

    def _reply(self) -> None:
        while True:
            item = self.sink.queue.get()
            items = [item]
            while True:
                try:
                    items.append(self.sink.queue.get_nowait())
                except queue.Empty:
                    break
            closing = False
            for it in items:
                if it is _CLOSE:
                    closing = True
                    continue
                fn, args = it
                try:
                    fn(*args)
                except BaseException as exc:  # noqa: BLE001 - a result that cannot be encoded is a bug
                    self.on_fatal(exc)
                    return
            out, self._out = self._out, []
            if out and not self.lost:
                try:
                    self.conn.send_bytes(wire.pack_replies(out))
                except (OSError, ValueError):
                    self.lost = True
            if closing:
                return

    def send_fatal(self, message: str) -> None:
        if not self.lost:
            try:
                self.conn.send_bytes(wire.pack_fatal(message))
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        shutdown_socket(self.conn)
        self._receiver.join(2.0)
        self.sink.queue.put(_CLOSE)
        self._replier.join(5.0)
        try:
            self.conn.close()
        except OSError:
            pass

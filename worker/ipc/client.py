"""The intake's end of a link to the GPU process: what the worker's handler sees as "the GPU".

``GpuClient`` has the GPU thread's face (``put``, ``decodes_on_device``, ``alive``, ``heartbeat``,
``queue_depth``, ``stop``), so the intake runs the same ``Worker`` and ``MessageHandler`` as a worker
with the GPU thread in its own process. Per request it takes a slot of its ring (waiting while all are
taken: a full ring is backpressure, not growth), writes the image there, and queues a small request
header; the headers queued in one event-loop iteration go out in one pipe write. A reader thread takes
the replies, copies each result out of its slot, and hands them to the loop in one callback per reply
message, where the slots are freed and the futures resolved.

With several GPU processes (``gpu_devices``) the client has a pipe to each, all sharing this intake's
one ring (a slot belongs to one request, whichever GPU answers it, so the ring's bound and /dev/shm use
do not grow with the GPUs); ``worker.ipc.router`` sends each request to the GPU with the least
outstanding work, and a reader thread per pipe takes that GPU's replies.

If a GPU process goes away (its end of the pipe closes) or says it failed, every waiting request, on
every GPU, fails with a ``FatalError`` naming that GPU and ``on_fatal`` stops the worker: nothing
unfinished is committed (the same rule with one GPU or eight: a death is loud).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

from worker import log
from worker.errors import FatalError, SharedMemoryFull
from worker.gpu.requests import InferenceRequest, InferenceResult
from worker.ipc import payload, wire
from worker.ipc.router import GpuRouter
from worker.ipc.shm import Segment, room_to_come, unlink

OVERFLOW_ADVICE = ("room for images larger than ipc_slot_bytes, each in a segment of its own until answered "
                   "(the chart: sharedMemory.overflowPerIntake)")
# A large image that finds /dev/shm full while only other intakes' large images hold the room looks again
# this often, and gives up (stopping the worker) after this long: theirs are answered in a batch's time.
OVERFLOW_POLL_S = 0.05
OVERFLOW_WAIT_S = 30.0

# How long a failed send waits for the reader thread's account of why the GPU process went (see ``_flush``).
LINK_VERDICT_S = 1.0


class GpuClient:
    def __init__(self, conns: Sequence[Connection], segment: Segment, slots: int, slot_bytes: int,
                 decodes_on_device: bool, heartbeat: Callable[[], float] | None = None,
                 devices: Sequence[str] = ("0",), on_sent: Sequence[Callable[[], None]] = ()) -> None:
        self.conns = list(conns)
        self.devices = list(devices)  # each pipe's GPU device index, for messages
        if len(self.devices) != len(self.conns):
            raise ValueError(f"{len(self.conns)} GPU links but {len(self.devices)} device names")
        self.router = GpuRouter(len(self.conns))
        self._on_sent = list(on_sent)  # per GPU, called once per request routed there (a metric)
        self.segment = segment
        self.slot_bytes = slot_bytes
        self.decodes_on_device = decodes_on_device
        self.on_fatal: Callable[[BaseException], None] | None = None
        self.fatal_error: BaseException | None = None
        self._beat = heartbeat
        self._free: deque[int] = deque(range(slots))
        self._slots = asyncio.Semaphore(slots)
        self._ids = itertools.count(1)
        # id -> future, slot, overflow, gpu, bytes
        self._pending: dict[int, tuple[asyncio.Future, int, bool, int, int]] = {}
        self._overflows = 0  # of those, images in a segment of their own (each frees /dev/shm room when answered)
        self._overflow_freed = asyncio.Event()
        self._overflow_pattern = wire.overflow_pattern(segment.name)  # every intake's large images of the run
        self._outgoing: list[list[wire.Request]] = [[] for _ in self.conns]
        self._flush_scheduled = False
        self._closing = False
        self._broken: set[int] = set()  # links a send failed on, waiting for their reader's verdict
        self._loop: asyncio.AbstractEventLoop | None = None
        self._readers = [threading.Thread(target=self._read, args=(g,), daemon=True,
                                          name="gpu-link" if len(self.conns) == 1 else f"gpu-link-{d}")
                         for g, d in enumerate(self.devices)]
        self._log = log.get("ipc")

    def _who(self, gpu: int) -> str:
        """"GPU process" with one GPU (the message it always was), "GPU process gpu-1" with several."""
        return "GPU process" if len(self.conns) == 1 else f"GPU process gpu-{self.devices[gpu]}"

    @property
    def heartbeat(self) -> float:
        return self._beat() if self._beat is not None else 0.0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for reader in self._readers:
            reader.start()

    def alive(self) -> bool:
        return self.fatal_error is None and all(r.is_alive() for r in self._readers)

    def queue_depth(self) -> int:
        return len(self._pending)

    # --- requests ------------------------------------------------------------------------
    async def put(self, request: InferenceRequest) -> None:
        """Write the request's image into a free slot (waiting for one) and queue its header."""
        if self.fatal_error is not None:
            raise self._stopped()
        await self._slots.acquire()
        slot = self._free.popleft()
        rid = next(self._ids) & 0xFFFFFFFF
        try:
            kind, parts, info = self._parts(request)
            nbytes = sum(len(p) for p in parts)
            overflow = nbytes > self.slot_bytes
            if overflow:  # rare (images over a slot): a segment of its own, unlinked when answered
                await self._write_overflow(rid, nbytes, parts)
            else:
                _write(self.segment.buf, slot * self.slot_bytes, parts)
        except BaseException:
            self._release(slot)
            raise
        where = request.context
        gpu = self.router.pick(nbytes)
        if self._on_sent:
            self._on_sent[gpu]()
        self._pending[rid] = (request.future, slot, overflow, gpu, nbytes)
        self._overflows += overflow
        self._outgoing[gpu].append(wire.Request(kind, -1 if overflow else slot, rid, nbytes,
                                                int(where.get("partition", -1)), int(where.get("offset", -1)), info))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def _write_overflow(self, rid: int, nbytes: int, parts: list[Any]) -> None:
        """Write an image larger than a slot into a segment of its own. Where /dev/shm has no room for it
        now, the run's large images in flight free theirs when answered: wait for one of this intake's, or,
        with none, look again for the other intakes' (at most OVERFLOW_WAIT_S). Where even all of them
        would not make room, none is coming: SharedMemoryFull stops the worker."""
        name = wire.overflow_name(self.segment.name, rid)
        loop = asyncio.get_running_loop()
        warned, looking_since = False, None  # since when only other intakes' images could free room
        while True:
            try:
                seg = Segment.create(name, max(1, nbytes), OVERFLOW_ADVICE)
                break
            except SharedMemoryFull as exc:
                if room_to_come(self._overflow_pattern) < nbytes:
                    raise
                if not warned:
                    warned = True
                    self._log.warning("no room in /dev/shm for a large image; waiting for the run's earlier ones",
                                      nbytes=nbytes, ours_in_flight=self._overflows, error=str(exc))
                if self._overflows:
                    looking_since = None
                    self._overflow_freed.clear()
                    await self._overflow_freed.wait()
                else:
                    looking_since = loop.time() if looking_since is None else looking_since
                    if loop.time() - looking_since >= OVERFLOW_WAIT_S:
                        raise
                    await asyncio.sleep(OVERFLOW_POLL_S)
                if self.fatal_error is not None:
                    raise self._stopped() from None
        try:
            _write(seg.buf, 0, parts)
        finally:
            seg.close()

    def _stopped(self) -> FatalError:
        return FatalError(f"GPU process has stopped: {self.fatal_error}")

    def _unlink_overflow(self, rid: int) -> None:
        unlink(wire.overflow_name(self.segment.name, rid))
        self._overflows -= 1
        self._overflow_freed.set()

    @staticmethod
    def _parts(request: InferenceRequest) -> tuple[wire.Kind, list[Any], Any]:
        if request.encoded is not None:
            return wire.Kind.ENCODED, [request.encoded.data], request.encoded.info
        return wire.Kind.ROWS, [memoryview(a).cast("B") for a in request.inputs], None

    def _flush(self) -> None:
        self._flush_scheduled = False
        for gpu, conn in enumerate(self.conns):
            batch, self._outgoing[gpu] = self._outgoing[gpu], []
            if not batch or self.fatal_error is not None or gpu in self._broken:
                continue
            try:
                conn.send_bytes(wire.pack_requests(batch))
            except (OSError, ValueError) as exc:
                # The GPU process closed its end. Why is for the reader thread to say: its FATAL message
                # (the CUDA error, say), or the end of the stream, may be read a moment after this send
                # failed, and the pod's log must name the cause, not the broken pipe. This verdict stands
                # only if the reader says nothing within LINK_VERDICT_S (``_gpu_gone`` keeps the first).
                self._broken.add(gpu)
                asyncio.get_running_loop().call_later(LINK_VERDICT_S, self._gpu_gone, FatalError(
                    f"{self._who(gpu)} link broken: {type(exc).__name__}: {exc}"))

    def _release(self, slot: int) -> None:
        self._free.append(slot)
        self._slots.release()

    # --- replies (reader thread, then the loop) ------------------------------------------
    def _read(self, gpu: int) -> None:
        assert self._loop is not None
        buf = self.segment.buf
        conn = self.conns[gpu]
        while True:
            try:
                message = conn.recv_bytes()
            except (EOFError, OSError):
                if not self._closing:
                    self._loop.call_soon_threadsafe(self._gpu_gone, FatalError(
                        f"{self._who(gpu)} exited: unfinished messages are left uncommitted"))
                return
            if message[:1] == wire.FATAL:
                text = bytes(message[1:]).decode("utf-8", "replace")
                self._loop.call_soon_threadsafe(self._gpu_gone, FatalError(f"{self._who(gpu)} failed: {text}"))
                return
            answers = []
            for reply in wire.unpack_replies(message):
                if reply.placement == wire.Placement.SLOT:
                    start = reply.slot * self.slot_bytes
                    data = bytes(buf[start:start + reply.nbytes])
                else:
                    data = reply.inline
                answers.append((reply.request_id, reply.status, data))
            self._loop.call_soon_threadsafe(self._answer, answers)

    def _answer(self, answers: list[tuple[int, wire.Status, bytes]]) -> None:
        for rid, status, data in answers:
            entry = self._pending.pop(rid, None)
            if entry is None:
                continue
            future, slot, overflow, gpu, nbytes = entry
            if overflow:
                self._unlink_overflow(rid)
            self.router.done(gpu, nbytes)
            self._release(slot)
            if future.done():  # cancelled meanwhile (drain cut, revoke)
                continue
            if status == wire.Status.OK:
                doc = payload.decode_result(data)
                future.set_result(InferenceResult([], queue_s=doc["q"], inference_s=doc["i"], batch_size=doc["b"],
                                                  postprocessed=doc["p"]))
            else:
                future.set_exception(payload.decode_error(status, data))

    def _gpu_gone(self, error: FatalError) -> None:
        if self.fatal_error is not None:
            return
        self.fatal_error = error
        for rid, (future, _slot, overflow, _gpu, _n) in list(self._pending.items()):
            if overflow:
                self._unlink_overflow(rid)
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        self._log.error("gpu link lost", error=str(error))
        if self.on_fatal is not None:
            self.on_fatal(error)

    def stop(self, timeout: float = 5.0) -> None:
        """Close our end (blocking is fine: the worker calls it off the loop at shutdown)."""
        self._closing = True
        for conn in self.conns:
            shutdown_socket(conn)  # wakes the reader blocked in recv: it sees the end and returns
        deadline = time.monotonic() + timeout
        for reader in self._readers:
            reader.join(max(0.0, deadline - time.monotonic()))
        for conn in self.conns:
            try:
                conn.close()
            except OSError:
                pass


def shutdown_socket(conn: Connection) -> None:
    """Shut a duplex Pipe's socket down in both directions. Closing its descriptor in one thread does
    not wake another thread blocked reading it; a shutdown does (the reader sees end of file)."""
    try:
        sock = socket.socket(fileno=os.dup(conn.fileno()))
    except (OSError, ValueError):
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


def _write(buf: memoryview, start: int, parts: list[Any]) -> None:
    pos = start
    for part in parts:
        n = len(part)
        buf[pos:pos + n] = part
        pos += n

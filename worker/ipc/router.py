"""Which GPU process an intake sends a request to: the one with the least outstanding work.

Pure: the intake's ``GpuClient`` calls ``GpuRouter.pick`` when it sends and ``done`` when the answer (or
the failure) arrives. Each intake sees only its own outstanding requests; with K intakes each keeping
its own share level, the GPUs' queues stay level too, and no cross-process counter is needed on the
hot path.

Requests first, bytes second: the GPU thread batches by image count (``max_batch_size``), so the count
is what fills a GPU's queue; bytes (JPEG sizes with device decoding) separate GPUs of equal count. Ties
rotate (``start``), so that at low load, where every GPU's queue is empty, the GPUs take turns instead
of the first one taking everything and the others never warming their caches.
"""

from __future__ import annotations

from collections.abc import Sequence


def choose(requests: Sequence[int], nbytes: Sequence[int], start: int = 0) -> int:
    """Index of the GPU with the fewest outstanding requests, then bytes; among equals, the first at or
    after ``start`` (wrapping)."""
    n = len(requests)
    if n == 0 or len(nbytes) != n:
        raise ValueError(f"choose: {n} request counts and {len(nbytes)} byte counts (need the same, >= 1)")
    best = start % n
    for step in range(1, n):
        i = (start + step) % n
        if (requests[i], nbytes[i]) < (requests[best], nbytes[best]):
            best = i
    return best


class GpuRouter:
    """Outstanding requests and bytes per GPU, and the rotating tie-break."""

    def __init__(self, gpus: int) -> None:
        if gpus < 1:
            raise ValueError(f"GpuRouter needs at least one GPU, got {gpus}")
        self.requests = [0] * gpus
        self.nbytes = [0] * gpus
        self.sent = [0] * gpus  # every request routed to each GPU (a counter, for metrics and tests)
        self._next = 0

    def pick(self, nbytes: int) -> int:
        gpu = choose(self.requests, self.nbytes, self._next)
        self._next = gpu + 1
        self.requests[gpu] += 1
        self.nbytes[gpu] += nbytes
        self.sent[gpu] += 1
        return gpu

    def done(self, gpu: int, nbytes: int) -> None:
        self.requests[gpu] -= 1
        self.nbytes[gpu] -= nbytes

"""A messages-per-second limit for the consume path (``worker replay --rate``).

A backfill must not starve the live consumers of the same brokers and GPUs, so a replay can hand
messages to the pipeline no faster than ``rate`` per second. ``TokenBucket`` is the pure policy (a
clock is injected, tests use a fake one); ``RateLimiter`` is the asyncio face the consume loop awaits.

The bucket holds up to ``burst`` tokens and refills at ``rate`` per second. ``reserve(n)`` takes n
tokens at once, letting the balance go negative, and returns how long the caller must wait before
acting: reservations queue behind each other in order, so concurrent callers cannot overshoot the
rate, and nothing needs to be rolled back when a waiting caller is cancelled mid-sleep (a cancelled
caller only makes the next one wait a little longer than needed; the average rate still holds).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class TokenBucket:
    def __init__(self, rate: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0 messages/s, got {rate}")
        self.rate = float(rate)
        # One second's worth by default: smooth enough for brokers, and a rate below 1/s still lets
        # a single message through.
        self.burst = float(burst) if burst is not None else max(1.0, self.rate)
        if self.burst < 1:
            raise ValueError(f"burst must be >= 1 message, got {self.burst}")
        self._clock = clock
        self._tokens = self.burst
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def available(self) -> float:
        self._refill()
        return self._tokens

    def reserve(self, n: float = 1) -> float:
        """Take ``n`` tokens; return the seconds to wait before the ``n`` messages may go (0: now)."""
        self._refill()
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class RateLimiter:
    """``await limiter.acquire(n)`` returns once ``n`` more messages fit within the rate."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.bucket = TokenBucket(rate, burst)
        self.waited_s = 0.0  # total time spent throttled, for the replay summary

    async def acquire(self, n: int = 1) -> None:
        delay = self.bucket.reserve(n)
        if delay > 0:
            self.waited_s += delay
            await asyncio.sleep(delay)

"""Probes and metrics over HTTP, served on the event loop (aiohttp).

- ``/healthz`` (liveness): models loaded, and the event loop and the GPU thread both beat recently. A
  wedged loop or a dead GPU thread fails it, so Kubernetes restarts the pod. It fails until the models
  are loaded too: the GPU thread does not beat while TensorRT builds an engine (minutes), and the
  chart's startup probe, not liveness, is what gives start-up its time.
- ``/readyz`` (readiness): models loaded and warmed, consumer joined its group, broker reachable, and
  publishing not stalled (no acknowledgement for ``STALL_AFTER_S`` of failed sends: worker.intake.publish).
- ``/metrics``: Prometheus text format, plus ``worker_ready`` (1 while ``/readyz`` would answer 200), so
  that an alert on readiness needs no kube-state-metrics.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from worker import log
from worker.metrics import Metrics

STALE_AFTER_S = 30.0


@dataclass
class HealthState:
    models_ready: bool = False
    joined: bool = False
    broker_ok: bool = False
    publishing: bool = True  # False while sends have failed past the bound (Publisher.on_stalled)
    loop_heartbeat: float = field(default_factory=time.monotonic)
    gpu_heartbeat: Callable[[], float] = time.monotonic
    gpu_alive: Callable[[], bool] = lambda: True

    broker_lost: bool = False  # reachable once, then not: the next success says so in the log

    def publish_stalled(self, stalled: bool) -> None:
        self.publishing = not stalled

    def broker_state(self, ok: bool, error: str = "") -> None:
        """Every source of broker news (the probe, a send, a start-up attempt) goes through here, so the
        log says "broker unreachable" and "broker reachable again" once per outage, whichever noticed."""
        if not ok and self.broker_ok:
            log.get("worker").warning("broker unreachable", error=error or None)
            self.broker_lost = True
        elif ok and not self.broker_ok and self.broker_lost:
            log.get("worker").info("broker reachable again")
            self.broker_lost = False
        self.broker_ok = ok

    def loop_beat(self) -> None:
        self.loop_heartbeat = time.monotonic()

    def liveness(self, now: float | None = None) -> tuple[bool, dict]:
        now = time.monotonic() if now is None else now
        loop_age = now - self.loop_heartbeat
        gpu_age = now - self.gpu_heartbeat()
        checks = {"models_ready": self.models_ready, "event_loop_heartbeat_age_s": round(loop_age, 3),
                  "gpu_heartbeat_age_s": round(gpu_age, 3), "gpu_thread_alive": self.gpu_alive()}
        ok = self.models_ready and loop_age < STALE_AFTER_S and gpu_age < STALE_AFTER_S and self.gpu_alive()
        return ok, checks

    def readiness(self) -> tuple[bool, dict]:
        checks = {"models_ready": self.models_ready, "consumer_joined": self.joined,
                  "broker_reachable": self.broker_ok, "publishing": self.publishing}
        return all(checks.values()), checks


READY_METRIC = "worker_ready"


def exposition(state: HealthState, metrics: Metrics) -> bytes:
    """The metrics and this server's own readiness gauge (not in any Metrics registry: in ``worker run``
    the children's snapshots are merged, and readiness is the supervisor's view over all of them)."""
    ok, _ = state.readiness()
    ready = (f"# HELP {READY_METRIC} 1 while the worker is ready (/readyz answers 200).\n"
             f"# TYPE {READY_METRIC} gauge\n{READY_METRIC} {1.0 if ok else 0.0}\n")
    return metrics.exposition() + ready.encode()


def make_app(state: HealthState, metrics: Metrics) -> web.Application:
    def respond(ok: bool, checks: dict) -> web.Response:
        return web.Response(status=200 if ok else 503, content_type="application/json",
                            text=json.dumps({"ok": ok, **checks}))

    async def healthz(_: web.Request) -> web.Response:
        return respond(*state.liveness())

    async def readyz(_: web.Request) -> web.Response:
        return respond(*state.readiness())

    async def prometheus(_: web.Request) -> web.Response:
        return web.Response(body=exposition(state, metrics),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    app = web.Application()
    app.add_routes([web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", prometheus)])
    return app


class HealthServer:
    def __init__(self, state: HealthState, metrics: Metrics, port: int, host: str = "0.0.0.0") -> None:
        self._runner = web.AppRunner(make_app(state, metrics), access_log=None)
        self.port = port
        self.host = host

    async def start(self) -> int:
        """Start serving; returns the bound port (useful with port 0 in tests)."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
        if sockets:
            self.port = sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        await self._runner.cleanup()

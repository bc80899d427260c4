"""Run a bench part on a thread of its own: it takes the device there, as the GPU thread does, and
leaves the caller's thread (the event loop's, often) without a CUDA context."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def on_own_thread(fn: Callable[[], T], name: str) -> T:
    """``fn()`` on a new thread; its result, or its exception re-raised here."""
    box: dict[str, object] = {}

    def main() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=main, name=name)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]

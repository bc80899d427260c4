"""structlog set-up: JSON lines off a terminal (for log collectors), coloured console on one."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog


def drop_empty(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Leave out fields bound to None so that lines stay short."""
    return {k: v for k, v in event_dict.items() if v is not None}


class _Handler(logging.StreamHandler):
    """The root handler ``configure`` installs (and replaces when called again)."""


_stream: Any = None  # where configure() sends the lines


def configure(log_format: str = "auto", level: str = "info", stream: Any = None) -> None:
    global _stream
    stream = _stream = stream or sys.stderr
    if log_format == "auto":
        log_format = "console" if stream.isatty() else "json"
    renderer: Any = (structlog.processors.JSONRenderer() if log_format == "json"
                     else structlog.dev.ConsoleRenderer(colors=stream.isatty()))
    level_no = logging.getLevelNamesMapping()[level.upper()]
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            stamp,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            drop_empty,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        # One write() per line, newline included: the supervisor, the GPU processes and the intakes share
        # one stdout/stderr, and print() writes the line and its newline apart, so with unbuffered streams
        # (PYTHONUNBUFFERED, as in the image) another process's line could land between the two: two JSON
        # documents on one line, which a log collector drops.
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # The libraries (aiokafka) log through the standard library: the same lines (JSON off a terminal, with
    # event, level, timestamp, plus logger), at warning and above (aiokafka's info and debug are chatty).
    handler = _Handler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.stdlib.add_logger_name,
            stamp,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            drop_empty,
            renderer,
        ]))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(logging.WARNING, level_no))


def get(name: str | None = None, **bound: Any) -> Any:
    return structlog.get_logger(name).bind(**bound) if bound else structlog.get_logger(name)


def bind_process(name: str) -> None:
    """Every line of this process (any thread) names it: ``process=gpu`` or ``process=intake-2``."""
    def add_process(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        event_dict.setdefault("process", name)
        return event_dict

    processors = [p for p in structlog.get_config()["processors"] if getattr(p, "__name__", "") != "add_process"]
    structlog.configure(processors=[add_process, *processors])


class _LockFreeWriter:
    """structlog's logger for a signal handler: the line goes out in os.write calls, without the stream's
    lock, which the code the signal interrupted (in the same thread) may be holding."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        data = (message + "\n").encode()
        try:
            fd = self._stream.fileno()
        except (AttributeError, OSError, ValueError):  # an in-memory stream (tests): no fd to write to
            self._stream.write(data.decode())
            return
        while data:
            data = data[os.write(fd, data):]

    warning = info = error = msg


def for_signal_handler() -> Any:
    """A logger that is safe to call from a signal handler: the configured lines (JSON or console, with
    the process name), written without taking a lock."""
    return structlog.wrap_logger(_LockFreeWriter(_stream or sys.stderr))

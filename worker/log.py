"""structlog set-up: JSON lines off a terminal (for log collectors), coloured console on one; each line
written whole, though the pod's processes share one stdout (``_Lines``)."""

from __future__ import annotations

import fcntl
import logging
import os
import select
import sys
import threading
from typing import Any

import structlog


def drop_empty(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Leave out fields bound to None so that lines stay short."""
    return {k: v for k, v in event_dict.items() if v is not None}


class _Lines:
    """Where this process's lines go, each one whole.

    The supervisor, its GPU processes and its intakes share one stdout (a pipe, in a container), so:
    - a line and its newline go out in one write (print() wrote them apart, and with unbuffered streams,
      as in the image, another process's line could land between them: two JSON documents on one line,
      which a log collector drops);
    - a pipe takes a write of up to PIPE_BUF (4 KiB) whole, and a longer one (a traceback, a stack dump)
      can be cut into by another process's line: those are written holding a file lock the processes
      share (``lock_lines``: flock on a file of the run folder, each process with its own descriptor; the
      kernel releases it if the holder dies);
    - threads of one process take turns on a lock of their own.
    """

    def __init__(self) -> None:
        self.stream: Any = sys.stderr
        self.lock_fd: int | None = None
        self._thread_lock = threading.Lock()
        self._flocked = False

    def write(self, line: str) -> None:
        with self._thread_lock:
            if self.lock_fd is None or len(line) < select.PIPE_BUF // 4:  # < 4 KiB even as UTF-8: whole
                self._put(line)
                return
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
            self._flocked = True
            try:
                self._put(line)
            finally:
                self._flocked = False
                fcntl.flock(self.lock_fd, fcntl.LOCK_UN)

    def _put(self, line: str) -> None:
        self.stream.write(line)
        self.stream.flush()

    def write_in_signal_handler(self, line: str) -> None:
        """No lock of this process: the code the signal interrupted, in this very thread, may hold one
        (waiting for it would never end). The line goes out in os.write calls; the shared file lock is
        taken unless this process already holds it (the interrupted code, or another of its threads, mid-line:
        then the two lines may be cut into each other, neither lost)."""
        data = line.encode()
        try:
            fd = self.stream.fileno()
        except (AttributeError, OSError, ValueError):  # an in-memory stream (tests): no descriptor
            self.stream.write(line)
            return
        flock = self.lock_fd is not None and not self._flocked
        if flock:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX)  # type: ignore[arg-type]
        try:
            while data:
                data = data[os.write(fd, data):]
        finally:
            if flock:
                fcntl.flock(self.lock_fd, fcntl.LOCK_UN)  # type: ignore[arg-type]


_LINES = _Lines()
LINE_LOCK_FILE = "log.lock"  # in the run folder (worker.supervisor.rundir): the lock of lock_lines


class _LineLogger:
    """structlog's logger: the rendered line to ``_LINES``."""

    def __init__(self, signal_handler: bool = False) -> None:
        self._write = _LINES.write_in_signal_handler if signal_handler else _LINES.write

    def msg(self, message: str) -> None:
        self._write(message + "\n")

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


class _Handler(logging.Handler):
    """The root handler ``configure`` installs (and replaces when called again): the standard library's
    records (aiokafka's) to ``_LINES`` like every other line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _LINES.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging's own rule: a failing handler must not raise
            self.handleError(record)


def lock_lines(path: str | None) -> None:
    """Share the line lock of the processes writing to one stdout: the file at ``path`` (created if
    missing); None closes this process's descriptor (an in-process supervisor that stopped)."""
    if _LINES.lock_fd is not None:
        os.close(_LINES.lock_fd)
        _LINES.lock_fd = None
    if path is not None:
        _LINES.lock_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def configure(log_format: str = "auto", level: str = "info", stream: Any = None) -> None:
    stream = _LINES.stream = stream or sys.stderr
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
        logger_factory=lambda *_args: _LineLogger(),
        cache_logger_on_first_use=False,
    )
    # The libraries (aiokafka) log through the standard library: the same lines (JSON off a terminal, with
    # event, level, timestamp, plus logger), at warning and above (aiokafka's info and debug are chatty).
    handler = _Handler()
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


def for_signal_handler() -> Any:
    """A logger that is safe to call from a signal handler: the configured lines (JSON or console, with
    the process name), written without this process's locks (``_Lines.write_in_signal_handler``)."""
    return structlog.wrap_logger(_LineLogger(signal_handler=True))

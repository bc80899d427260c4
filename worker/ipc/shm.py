"""Named shared-memory segments: a file under /dev/shm, mapped.

Not ``multiprocessing.shared_memory``: before Python 3.13 every process that attaches a segment
registers it with the resource tracker, which then unlinks it (and warns) when that process exits, so
an intake's exit would pull the ring out from under the GPU process. Here only the supervisor, which
creates the segments, unlinks them: on every exit path, and at the next start for segments whose
creator is gone (kill -9).

Names: ``<PREFIX><creator pid>.<its start time>-<what>``: a segment is stale when no process with
that pid and start time exists (in a container the supervisor is PID 1 after every restart, and an
in-memory /dev/shm outlives a container restart within the pod, so the pid alone cannot tell).
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

SHM_DIR = Path("/dev/shm")
PREFIX = "gpuworker-"


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def creator_token(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{pid}.{start_time(pid) or 0}"


def segment_name(what: str, token: str | None = None) -> str:
    return f"{PREFIX}{token or creator_token()}-{what}"


class Segment:
    """A mapped segment. ``buf`` is a writable memoryview over all of it."""

    def __init__(self, name: str, size: int, create: bool) -> None:
        self.name = name
        self.path = SHM_DIR / name
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            else:
                size = os.fstat(fd).st_size
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.size = size
        self.buf = memoryview(self._map)

    @classmethod
    def create(cls, name: str, size: int) -> Segment:
        return cls(name, size, create=True)

    @classmethod
    def attach(cls, name: str) -> Segment:
        return cls(name, 0, create=False)

    def close(self) -> None:
        """Unmap (this process only). Views handed out must be gone first; if some are still alive the
        mapping stays until they are (it goes with the process)."""
        try:
            self.buf.release()
            self._map.close()
        except BufferError:
            pass

    def unlink(self) -> None:
        unlink(self.name)


def unlink(name: str) -> None:
    try:
        (SHM_DIR / name).unlink()
    except FileNotFoundError:
        pass


def owned_by(token: str) -> list[str]:
    """Names of the segments a creator made (to unlink at its exit)."""
    return sorted(p.name for p in SHM_DIR.glob(f"{PREFIX}{token}-*"))


def clean_stale() -> list[str]:
    """Unlink segments whose creator process is gone (left behind by a kill -9); returns their names."""
    removed = []
    for path in SHM_DIR.glob(f"{PREFIX}*"):
        token = path.name[len(PREFIX):].split("-", 1)[0]
        pid_text, _, started = token.partition(".")
        if not pid_text.isdigit():
            continue
        if start_time(int(pid_text)) != started:
            unlink(path.name)
            removed.append(path.name)
    return sorted(removed)

"""Named shared-memory segments: a file under /dev/shm, mapped.

Not ``multiprocessing.shared_memory``: before Python 3.13 every process that attaches a segment
registers it with the resource tracker, which then unlinks it (and warns) when that process exits, so
an intake's exit would pull the ring out from under the GPU process. Here only the supervisor, which
creates the segments, unlinks them: on every exit path, and at the next start for segments whose
creator is gone (kill -9).

Names: ``<PREFIX><creator pid>.<its start time>-<what>``: a segment is stale when no process with
that pid and start time exists (in a container the supervisor is PID 1 after every restart, and an
in-memory /dev/shm outlives a container restart within the pod, so the pid alone cannot tell).

A segment's pages are allocated when it is created and mapped in full wherever it is opened (``_reserve``,
MAP_POPULATE): a /dev/shm too small fails at creation with the sizes, not as a SIGBUS at whichever later
write first finds no page, and the first burst of images writes and reads pages that are already there
instead of faulting each one in while the GPU thread waits.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
from pathlib import Path

from worker.errors import SharedMemoryFull

SHM_DIR = Path("/dev/shm")
PREFIX = "gpuworker-"
# Map every page at mmap time (Linux); elsewhere 0: pages fault in on first use, as before.
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


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

    def __init__(self, name: str, size: int, create: bool, advice: str = "") -> None:
        self.name = name
        self.path = SHM_DIR / name
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
                _reserve(fd, size, self.path, advice)
            else:
                size = os.fstat(fd).st_size
            self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE)
        except BaseException:
            if create:
                unlink(name)
            raise
        finally:
            os.close(fd)
        self.size = size
        self.buf = memoryview(self._map)

    @classmethod
    def create(cls, name: str, size: int, advice: str = "") -> Segment:
        """``advice``: what to change if /dev/shm has no room, after the size of /dev/shm itself."""
        return cls(name, size, create=True, advice=advice)

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


def _reserve(fd: int, size: int, path: Path, advice: str) -> None:
    """Allocate the segment's pages now (tmpfs zero-fills them). A sparse file would take its pages at
    first write, and a write that finds /dev/shm full kills the process with SIGBUS."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without fallocate: pages on first use
            return
        if exc.errno not in (errno.ENOSPC, errno.ENOMEM):
            raise
        free = shutil.disk_usage(path.parent).free
        raise SharedMemoryFull(
            f"{path.parent} has no room for {path.name} ({_size(size)}; {_size(free)} free, "
            f"{os.strerror(exc.errno)}): give the container a larger /dev/shm (docker: --shm-size)"
            + (f", {advice}" if advice else "")) from exc


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def room_to_come(pattern: str) -> int:
    """Bytes /dev/shm would have free once every segment matching ``pattern`` is gone: its free space now
    plus theirs (a run's large images in flight, each unlinked when answered; see wire.overflow_pattern)."""
    held = 0
    for path in SHM_DIR.glob(pattern):
        try:
            held += path.stat().st_blocks * 512
        except FileNotFoundError:  # answered meanwhile
            pass
    return shutil.disk_usage(SHM_DIR).free + held


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

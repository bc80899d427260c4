"""Children die with their parent: no orphaned intake, GPU process or embedded broker after a kill -9."""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` when the parent exits; exit now if it is already gone (it may have died
    between the spawn and this call)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the link's end-of-file still stops the children
        pass
    if os.getppid() != parent_pid:
        os._exit(1)

"""The intake's decode pool threads lower their own priority (decode_nice); the event loop's does not."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from worker.errors import ConfigError
from worker.intake.pool import decode_pool
from worker.settings import Settings

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")


def _nice_of_calling_thread() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@linux_only
def test_decode_threads_take_the_nice_value_and_the_caller_keeps_its_own():
    before = _nice_of_calling_thread()
    target = min(19, before + 7)
    with decode_pool(2, target) as pool:
        seen = {pool.submit(_nice_of_calling_thread).result() for _ in range(8)}
    assert seen == {target}
    assert _nice_of_calling_thread() == before  # per thread: the submitting (event loop) thread unchanged


@linux_only
def test_nice_zero_leaves_the_threads_alone():
    before = _nice_of_calling_thread()
    with decode_pool(1, 0) as pool:
        assert pool.submit(_nice_of_calling_thread).result() == before


@linux_only
def test_a_thread_already_nicer_is_not_raised_back():
    def nicer_then_pool() -> int:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, _nice_of_calling_thread() + 10))
        from worker.intake.pool import lower_thread_priority

        lower_thread_priority(1)  # asks for less than it has: never a raise in priority
        return _nice_of_calling_thread()

    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(nicer_then_pool()))
    t.start()
    t.join()
    assert result[0] >= 10


@pytest.mark.parametrize("bad", [-1, 20])
def test_decode_nice_out_of_range_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="decode_nice must be 0..19"):
        Settings(decode_nice=bad)


@linux_only
def test_a_refused_priority_change_leaves_the_pool_decoding(monkeypatch):
    def refused(*args):
        raise PermissionError("not permitted here")

    monkeypatch.setattr(os, "setpriority", refused)
    with decode_pool(1, 10) as pool:  # the initializer must not break the pool
        assert pool.submit(lambda: 6 * 7).result() == 42

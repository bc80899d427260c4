"""The bench's stall watch (benchmarks/stall.py): pure rule, and the coroutine on a fake counter."""

import asyncio
from types import SimpleNamespace

from benchmarks import stall


def test_stalled_only_when_still_for_the_whole_window_and_short():
    assert not stall.stalled(changed_at=10.0, now=69.0, count=5, expected=10, stall_s=60)
    assert stall.stalled(changed_at=10.0, now=70.0, count=5, expected=10, stall_s=60)
    assert not stall.stalled(changed_at=10.0, now=500.0, count=10, expected=10, stall_s=60)  # complete
    assert not stall.stalled(changed_at=10.0, now=500.0, count=5, expected=10, stall_s=0)  # watch off


def test_watch_returns_with_evidence_when_the_count_stands_still(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    progress = SimpleNamespace(value=0)

    async def main():
        async def moving():
            for _ in range(3):
                await asyncio.sleep(0.02)
                progress.value += 1
        mover = asyncio.create_task(moving())
        why = await stall.watch(progress, 10, [], lambda: {}, "t", stall_s=0.2, every_s=0.01)
        await mover
        return why

    why = asyncio.run(main())
    assert "at 3 of 10" in why
    files = list(tmp_path.glob("stall-t-*.txt"))
    assert len(files) == 1 and str(files[0]) in why

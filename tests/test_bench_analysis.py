"""The bench's pure accounting: the latency bound of the 50%-load run and the CPU counted from the first
message. Plain calls on hand-written numbers; no broker, no timing."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from benchmarks import cpu_time
from benchmarks.round_trip import bound_run, latency_bound


def _rate_run(p99: float, batch_ms: float | None, max_wait: float = 5.0, fraction: float = 0.5) -> dict:
    return {"fraction_of_peak": fraction, "latency_ms": {"p50": 1.0, "p99": p99}, "gpu_batch_ms": batch_ms,
            "settings": {"max_wait_ms": max_wait}}


RTT = {"latency_ms": {"p50": 2.0, "p99": 7.5}}


def test_bound_is_max_wait_plus_three_batches_plus_the_broker_round_trip_p99():
    b = latency_bound(_rate_run(p99=30.0, batch_ms=6.0), RTT)
    assert b["bound_ms"] == pytest.approx(5.0 + 18.0 + 7.5)  # 30.5
    assert b["met"] is True and b["p99_ms"] == 30.0 and b["broker_round_trip_p99_ms"] == 7.5
    assert b["batch_ms"] == 6.0 and b["max_wait_ms"] == 5.0 and b["fraction_of_peak"] == 0.5


def test_bound_not_met_just_above_and_met_on_equality():
    assert latency_bound(_rate_run(p99=30.6, batch_ms=6.0), RTT)["met"] is False
    assert latency_bound(_rate_run(p99=30.5, batch_ms=6.0), RTT)["met"] is True


def test_bound_needs_every_number():
    assert latency_bound(None, RTT) is None
    assert latency_bound(_rate_run(p99=10.0, batch_ms=6.0), None) is None
    assert latency_bound(_rate_run(p99=10.0, batch_ms=None), RTT) is None  # no batch ran
    assert latency_bound(_rate_run(p99=10.0, batch_ms=6.0), {"latency_ms": {"p99": None}}) is None


def test_the_bound_is_about_the_50_percent_run():
    runs = [_rate_run(1.0, 1.0, fraction=0.9), _rate_run(2.0, 1.0, fraction=0.5)]
    assert bound_run(runs)["latency_ms"]["p99"] == 2.0
    assert bound_run([_rate_run(1.0, 1.0, fraction=0.9)]) is None
    assert bound_run([]) is None


def test_value_at_takes_the_last_reading_at_or_before():
    samples = [(1.0, 10.0), (2.0, 20.0), (3.0, 35.0)]
    assert cpu_time.value_at(samples, 0.5) is None  # before any reading
    assert cpu_time.value_at(samples, 1.0) == 10.0
    assert cpu_time.value_at(samples, 2.5) == 20.0
    assert cpu_time.value_at(samples, 9.0) == 35.0
    assert cpu_time.value_at([], 1.0) is None


def test_intake_cpu_counts_each_intake_from_its_own_first_message():
    # intake 11 started late: 3.0 s of start-up before its first message, which must not count
    end = {10: 5.0, 11: 4.0, 12: 2.5}
    reports = [{"pid": 10, "cpu_at_first_message_s": 1.0, "consumed": 4000},
               {"pid": 11, "cpu_at_first_message_s": 3.0, "consumed": 1000},
               {"pid": 12, "cpu_at_first_message_s": None, "consumed": 0}]  # got no partition
    out = cpu_time.intake_cpu(end, reports)
    assert out["cpu_s"] == pytest.approx(4.0 + 1.0)
    assert out["without_messages"] == 1
    assert [(p["pid"], p["cpu_s"], p["ms_per_message"]) for p in out["processes"]] == [(10, 4.0, 1.0),
                                                                                      (11, 1.0, 1.0)]


def test_intake_cpu_without_an_end_reading_leaves_that_intake_out():
    out = cpu_time.intake_cpu({}, [{"pid": 7, "cpu_at_first_message_s": 1.0, "consumed": 3}])
    assert out["cpu_s"] == 0 and out["processes"] == [] and out["without_messages"] == 1


async def _eventually(check, tries: int = 500) -> None:
    """Let the hook's task run until ``check()`` holds (or the tries run out: the asserts then say why)."""
    for _ in range(tries):
        if check():
            return
        await asyncio.sleep(0.01)


class _Worker:
    def __init__(self) -> None:
        self.counts = {"consumed": 0}


async def test_first_message_hook_reads_this_process_cpu_once_a_message_was_consumed():
    hook = cpu_time.FirstMessageCpu(poll_s=0.001)
    worker = _Worker()
    task = asyncio.create_task(hook.during(worker))
    await asyncio.sleep(0.01)
    assert not task.done() and hook.at_first is None  # nothing consumed yet: still looking
    worker.counts["consumed"] = 3
    await _eventually(lambda: hook.at_first is not None)
    assert hook.at_first is not None and hook.at_first >= 0
    worker.counts["published"] = 2  # the event loop's own CPU is read as messages finish
    await _eventually(lambda: hook.finished_at_last == 2)
    task.cancel()
    report = hook.report(worker, 0)
    assert report["pid"] == os.getpid() and report["consumed"] == 3
    assert report["cpu_at_first_message_s"] == hook.at_first
    assert report["loop_finished"] == 2 and report["loop_cpu_s"] >= 0


async def test_first_message_hook_reads_each_thread_groups_cpu_as_messages_finish():
    hook = cpu_time.FirstMessageCpu(poll_s=0.001, loop_every_s=0.005, groups_every_s=0.0)
    worker = _Worker()
    worker.counts["consumed"] = 1
    task = asyncio.create_task(hook.during(worker))
    while hook.at_first is None:
        await asyncio.sleep(0.005)
    sum(i * i for i in range(300_000))  # CPU on the event loop between the first reading and the next
    worker.counts["published"] = 5
    await _eventually(lambda: hook.groups_finished == 5)
    task.cancel()
    report = hook.report(worker, 0)
    assert report["groups_finished"] == 5 and report["groups_cpu_s"]["event_loop"] > 0


def test_thread_stats_reads_a_busy_threads_cpu_and_lets_go_of_an_ended_ones_descriptor():
    stats = cpu_time.ThreadStats()
    done = threading.Event()
    seen: dict[str, float] = {}

    def spin() -> None:
        end = time.thread_time() + 0.05
        while time.thread_time() < end:  # 50 ms of this thread's own CPU (5 clock ticks)
            pass
        seen.update(stats.groups())  # read while this thread still runs
        done.wait(5)

    thread = threading.Thread(target=spin, name="spinner_0")
    thread.start()
    while not seen:
        time.sleep(0.005)
    assert seen["spinner"] >= 0.03 and "event_loop" in seen
    kept = set(stats._fds)
    assert thread.native_id in kept
    done.set()
    thread.join()
    after = stats.groups()
    assert "spinner" not in after and thread.native_id not in stats._fds  # ended: its descriptor closed
    assert after["event_loop"] == pytest.approx(stats.seconds(threading.main_thread().native_id), abs=0.02)
    stats.close()
    assert not stats._fds


def test_intake_cpu_splits_each_intakes_cpu_by_thread_group():
    reports = [{"pid": 10, "cpu_at_first_message_s": 1.0, "consumed": 4000, "groups_finished": 1000,
                "groups_cpu_s": {"event_loop": 0.1, "decode": 0.5, "native": 0.05}},
               {"pid": 11, "cpu_at_first_message_s": 1.0, "consumed": 4000, "groups_finished": 3000,
                "groups_cpu_s": {"event_loop": 0.3, "decode": 1.5}},
               {"pid": 12, "cpu_at_first_message_s": 1.0, "consumed": 10}]  # never read: left out of the split
    out = cpu_time.intake_cpu({10: 5.0, 11: 5.0, 12: 1.1}, reports)
    assert out["processes"][0]["groups_ms_per_message"] == {"event_loop": 0.1, "decode": 0.5, "native": 0.05}
    assert out["processes"][2]["groups_ms_per_message"] is None
    # all intakes: CPU seconds over messages, not a mean of the per-intake figures
    assert out["groups_ms_per_message"] == {"decode": 0.5, "event_loop": 0.1, "native": 0.0125}


def test_intake_cpu_gives_the_event_loops_share_per_finished_message():
    reports = [{"pid": 10, "cpu_at_first_message_s": 1.0, "consumed": 4000, "loop_cpu_s": 0.4, "loop_finished": 4000}]
    out = cpu_time.intake_cpu({10: 5.0}, reports)
    assert out["processes"][0]["loop_ms_per_message"] == pytest.approx(0.1)


def test_middle_rate_leaves_out_the_ramp_and_the_tail():
    from benchmarks.end_to_end import middle_rate

    # 100 results: the first 10 over 5 s (ramp), 80 at 100/s, the last 10 over 5 s (tail)
    times = [i * 0.5 for i in range(10)] + [5.0 + i * 0.01 for i in range(80)] + [5.8 + i * 0.5 for i in range(10)]
    assert middle_rate(times[::-1]) == pytest.approx(100.0, rel=0.05)  # order of arrival does not matter
    whole = len(times) / (max(times) - min(times))
    assert whole < 10.0  # the whole run's rate is the headline: ramp and tail weigh on it


def test_timeline_counts_results_per_bin_from_the_first_message():
    from benchmarks.end_to_end import timeline

    assert timeline([10.01, 10.02, 10.07, 10.26], 10.0) == [2, 1, 0, 0, 0, 1]
    assert timeline([9.99, 10.0], 10.0) == [2]  # a result stamped before t0 (clock jitter) counts in the first
    assert timeline([], 10.0) == []


def test_longest_gap_is_the_longest_wait_between_two_results_and_when_it_began():
    from benchmarks.end_to_end import longest_gap

    assert longest_gap([10.30, 10.02, 10.05, 10.35], 10.0) == {"ms": 250.0, "after_s": 0.05}  # any order
    assert longest_gap([10.1], 10.0) is None and longest_gap([], 10.0) is None


def test_intake_spans_are_seconds_from_the_first_message():
    from benchmarks.end_to_end import intake_spans

    reports = [{"t_first": 100.05, "t_last": 101.5}, {"t_first": None, "t_last": None}, {}]
    assert intake_spans(reports, 100.0) == [[0.05, 1.5], None, None]


def test_slowest_batches_are_told_apart_by_their_gpu_time_with_when_they_started():
    from benchmarks.end_to_end import slowest_batches

    def row(gpu_ms: float, consumed: float, dlq: bool = False) -> dict:  # received 0.5 s after consumed
        return {"dlq": dlq, "recv_t": consumed + 0.5, "timings_ms": {"inference": gpu_ms, "end_to_end": 500.0}}

    rows = ([row(369.5, 100.02), row(369.5, 100.01)] + [row(22.1, 100.4 + i * 0.01) for i in range(3)]
            + [row(23.7, 101.0), row(999.0, 100.0, dlq=True), {"dlq": False, "recv_t": 101.0, "timings_ms": {}}])
    assert slowest_batches(rows, 100.0) == [{"ms": 369.5, "images": 2, "consumed_at_s": 0.01},
                                           {"ms": 23.7, "images": 1, "consumed_at_s": 1.0},
                                           {"ms": 22.1, "images": 3, "consumed_at_s": 0.4}]
    assert slowest_batches(rows, 100.0, n=1)[0]["ms"] == 369.5
    assert slowest_batches([], 100.0) == []


def test_middle_rate_needs_enough_results_and_time():
    from benchmarks.end_to_end import middle_rate

    assert middle_rate([1.0, 2.0, 3.0]) is None
    assert middle_rate([4.0] * 20) is None


def test_analysis_gives_the_bound_with_small_records_and_beside_it_with_image_sized_ones():
    from benchmarks.report import analysis
    from worker.settings import Settings

    result = {"rates": [_rate_run(p99=60.0, batch_ms=6.0)], "round_trip": RTT,
              "round_trip_image_sized": {"latency_ms": {"p50": 20.0, "p99": 40.0}}}
    out = analysis(result, Settings())
    assert out["latency_bound"]["bound_ms"] == pytest.approx(30.5) and out["latency_bound"]["met"] is False
    sized = out["latency_bound_image_sized"]
    assert sized["bound_ms"] == pytest.approx(5.0 + 18.0 + 40.0) and sized["met"] is True
    assert "latency_bound_image_sized" not in analysis({"rates": result["rates"], "round_trip": RTT}, Settings())


def test_summary_says_how_far_apart_the_intakes_started_and_ended():
    from benchmarks import report

    result = {"bench": {"pipeline": {"name": "demo", "label": "x"}, "device": {"requested": "cpu"},
                        "settings": {"max_batch_size": 8, "max_wait_ms": 5.0, "decoder": "cpu", "decode_threads": 2},
                        "date": "2026-12-06", "git_commit": "0" * 40, "host": {"cpu_count": 2, "cpu": "x"},
                        "versions": {"python": "3", "onnxruntime": "1", "numpy": "2", "cv2": "4"}},
              "images": {"count": 10, "mean_bytes": 1000},
              "worker": {"cpu_busy_fraction": {"intake_processes": 1.0}, "cpu_ms_per_message": {"intake_processes": 0.1},
                         "intake_spans_s": [[0.0, 1.0], None, [0.5, 1.6]],
                         "slowest_batches": [{"ms": 369.53, "images": 128, "consumed_at_s": 0.012}]}}
    lines = report.summary_lines(result)
    assert "worker run, intakes' first messages 0.50 s apart, last ones 0.60 s apart (of 1.60 s)" in lines
    assert ("worker run, slowest GPU batches: 369.5 ms (128 images, consumed 0.01 s after the first message)"
            in lines)

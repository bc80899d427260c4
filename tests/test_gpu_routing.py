"""Several GPUs, by plain calls: which GPU gets a request (worker.ipc.router) and which devices get a GPU
process (worker.gpu.devices)."""

from __future__ import annotations

import pytest

from worker import settings as settings_mod
from worker.errors import ConfigError
from worker.gpu.devices import DevicePlan, GpuDevice, Mode, parse, resolve
from worker.ipc.router import GpuRouter, choose


# --- the router ----------------------------------------------------------------------------------------
def test_the_gpu_with_fewest_outstanding_requests_is_chosen() -> None:
    assert choose([5, 2, 7], [0, 0, 0]) == 1
    assert choose([5, 2, 7], [0, 0, 0], start=2) == 1  # the rotation only breaks ties


def test_bytes_break_a_tie_of_requests() -> None:
    assert choose([3, 3], [900_000, 80_000]) == 1
    assert choose([3, 4], [900_000, 80_000]) == 0  # requests first: the batcher fills by image count


def test_ties_go_to_the_first_gpu_at_or_after_start_wrapping() -> None:
    assert [choose([1, 1, 1], [0, 0, 0], start) for start in range(5)] == [0, 1, 2, 0, 1]
    assert choose([2, 1, 1], [0, 0, 0], start=0) == 1
    assert choose([1, 2, 1], [0, 0, 0], start=1) == 2
    assert choose([1, 1, 2], [0, 0, 0], start=2) == 0


def test_choose_refuses_mismatched_or_empty_counts() -> None:
    with pytest.raises(ValueError):
        choose([], [])
    with pytest.raises(ValueError):
        choose([1, 2], [1])


def test_an_idle_pod_takes_turns() -> None:
    r = GpuRouter(2)
    turns = []
    for _ in range(4):  # every request answered before the next: both queues are empty each time
        g = r.pick(100)
        turns.append(g)
        r.done(g, 100)
    assert turns == [0, 1, 0, 1]


def test_a_busy_gpu_is_passed_over_until_it_answers() -> None:
    r = GpuRouter(2)
    assert r.pick(100) == 0  # GPU 0 holds this one
    for _ in range(5):  # GPU 1 answers each at once: it keeps the shorter queue
        g = r.pick(100)
        assert g == 1
        r.done(g, 100)
    r.done(0, 100)
    assert r.requests == [0, 0] and r.sent == [1, 5]


def test_equal_queues_the_gpu_with_fewer_bytes_gets_the_next() -> None:
    r = GpuRouter(2)
    assert (r.pick(1_000_000), r.pick(10)) == (0, 1)
    assert r.pick(10) == 1  # one request each; GPU 1's is the smaller image


def test_outstanding_counts_return_to_zero_when_everything_is_answered() -> None:
    r = GpuRouter(3)
    picked = [(r.pick(n), n) for n in (10, 20, 30, 40, 50, 60, 70)]
    assert sorted(r.requests) == [2, 2, 3] and sum(r.nbytes) == 280
    for g, n in picked:
        r.done(g, n)
    assert r.requests == [0, 0, 0] and r.nbytes == [0, 0, 0] and sum(r.sent) == 7


def test_one_gpu_gets_everything() -> None:
    r = GpuRouter(1)
    assert {r.pick(n) for n in range(50)} == {0}


# --- the devices -----------------------------------------------------------------------------------------
def never(_why: str = "") -> tuple[int, str]:
    raise AssertionError("the driver must not be asked")


def sees(n: int, why: str = ""):
    return lambda: (n, why)


@pytest.mark.parametrize("text, plan", [
    ("", DevicePlan(Mode.SINGLE)),
    ("auto", DevicePlan(Mode.AUTO)),
    (" AUTO ", DevicePlan(Mode.AUTO)),
    ("0,1", DevicePlan(Mode.LIST, indices=(0, 1))),
    ("3", DevicePlan(Mode.LIST, indices=(3,))),
    ("cpu:2", DevicePlan(Mode.CPU, count=2)),
])
def test_parse(text, plan) -> None:
    assert parse(text) == plan


@pytest.mark.parametrize("text, said", [
    ("0,0", "listed twice"), ("cpu:0", "count >= 1"), ("cpu:x", "count >= 1"), ("gpu0", "give auto"),
    ("0,,1", "give auto"), ("-1", "give auto"),
])
def test_parse_refuses(text, said) -> None:
    with pytest.raises(ConfigError, match=said):
        parse(text)


def test_a_bad_value_is_a_settings_error_where_it_enters() -> None:
    with pytest.raises(ConfigError, match="gpu_devices='1,1'"):
        settings_mod.load(environ={"WORKER_GPU_DEVICES": "1,1"})


def test_the_default_is_the_one_gpu_worker_without_asking_the_driver() -> None:
    s = settings_mod.load(environ={})
    assert s.gpu_devices == ""
    assert resolve(parse(s.gpu_devices), "auto", 0, never) == [GpuDevice(0)]
    assert resolve(parse(""), "cuda", 3, never) == [GpuDevice(3)]
    assert GpuDevice(0).label(several=False) == "gpu"  # process="gpu" as before
    assert GpuDevice(1).label(several=True) == "gpu-1"


def test_auto_is_every_visible_device() -> None:
    assert resolve(parse("auto"), "cuda", 0, sees(2)) == [GpuDevice(0), GpuDevice(1)]
    assert resolve(parse("auto"), "auto", 0, sees(8)) == [GpuDevice(i) for i in range(8)]


def test_auto_without_cuda_is_one_cpu_process_or_an_error_with_device_cuda() -> None:
    assert resolve(parse("auto"), "cpu", 0, never) == [GpuDevice(0)]
    assert resolve(parse("auto"), "auto", 0, sees(0, "no driver")) == [GpuDevice(0)]
    with pytest.raises(ConfigError, match="not usable: no driver"):
        resolve(parse("auto"), "cuda", 0, sees(0, "no driver"))


def test_a_list_needs_every_listed_device_and_cuda() -> None:
    assert resolve(parse("1,0"), "cuda", 0, sees(2)) == [GpuDevice(1), GpuDevice(0)]
    with pytest.raises(ConfigError, match=r"sees 2 device\(s\) \(0..1\); not there: 2"):
        resolve(parse("0,2"), "cuda", 0, sees(2))
    with pytest.raises(ConfigError, match="CUDA is not usable: pycuda missing"):
        resolve(parse("0,1"), "auto", 0, sees(0, "pycuda missing"))
    with pytest.raises(ConfigError, match="use cpu:N"):
        resolve(parse("0,1"), "cpu", 0, never)


def test_cpu_devices_are_a_test_aid_for_device_cpu_only() -> None:
    assert resolve(parse("cpu:2"), "cpu", 0, never) == [GpuDevice(0), GpuDevice(1)]
    with pytest.raises(ConfigError, match="set device=cpu"):
        resolve(parse("cpu:2"), "cuda", 0, never)


# --- probes and metrics over several GPU processes ---------------------------------------------------------
def test_readiness_waits_for_every_gpu_process_and_finds_the_intakes_after_them() -> None:
    from worker.ipc.board import WIDTH, Row, intake_row
    from worker.supervisor import ProcessHealth

    board = [0.0] * (WIDTH * (2 + 3))  # two GPU processes, three intakes
    health = ProcessHealth(board, intakes=3, gpus=2)
    for i in (1, 2, 3):
        Row(board, intake_row(i, 2)).set(joined=True, broker_ok=True)
    Row(board, 0).set(ready=True)
    ok, checks = health.readiness()
    assert not ok and checks["gpus_ready"] == 1 and checks["gpus"] == 2 and checks["intakes_joined"] == 3
    Row(board, 1).set(ready=True)
    assert health.readiness()[0]
    assert [intake_row(i, 1) for i in (1, 2, 3)] == [1, 2, 3]  # one GPU: the board as it always was


def test_merged_metrics_label_each_gpu_process_with_its_device() -> None:
    from worker.metrics import Metrics, merge_expositions

    g0, g1, intake = Metrics(), Metrics(), Metrics()
    g0.batch_size.observe(8)
    g1.batch_size.observe(4)
    intake.gpu_requests.labels(gpu="1").inc(4)
    text = merge_expositions({"gpu-0": g0.exposition(), "gpu-1": g1.exposition(), "intake-1": intake.exposition()},
                             {"gpu-0": {"gpu": "0"}, "gpu-1": {"gpu": "1"}}).decode()
    assert 'worker_batch_size_sum{gpu="0",process="gpu-0"} 8.0' in text
    assert 'worker_batch_size_sum{gpu="1",process="gpu-1"} 4.0' in text
    assert 'worker_gpu_requests_total{gpu="1",process="intake-1"} 4.0' in text

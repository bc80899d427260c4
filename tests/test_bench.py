"""The bench (`python -m benchmarks`) as a user runs it: a tiny run of every part on the CPU, checked for structure and for
counts that add up. No timing is asserted: timings belong to the bench's own output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

COUNT = 40
ROOT = Path(__file__).resolve().parents[1]  # `python -m benchmarks` runs from a checkout


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "bench.json"
    env = {**os.environ, "WORKER_MODEL_CACHE": str(tmp / "models"), "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "benchmarks", "--pipeline", "demo", "--device", "cpu",
           "--count", str(COUNT), "--unique", "16", "--baseline-count", "10", "--max-batch-size", "8",
           "--sweep-batch", "4", "--sweep-wait", "1", "--sweep-count", "20", "--rates", "0.5",
           "--rate-seconds", "1", "--decode-threads", "1,2", "--ceiling-seconds", "0.1",
           "--decode-workers", "2", "--json", str(out), "--markdown", str(tmp / "bench.md")]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=420, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    return json.loads(out.read_text()), text, (tmp / "bench.md").read_text()


def _complete(run: dict, expected: int) -> None:
    assert run["count"] == expected
    assert run["missing"] == 0 and run["duplicates"] == 0
    assert run["results"] + run["dead_lettered"] == expected
    assert run["exit_code"] == 0
    counts = run["worker_counts"]
    assert counts["consumed"] == expected
    assert counts["published"] == run["results"] and counts["dead_lettered"] == run["dead_lettered"]
    assert counts["failed"] == 0
    assert run["images_per_s"] > 0 and run["batches"] >= 1
    assert run["images_per_s_middle"] is None or run["images_per_s_middle"] > 0  # None under 10 results
    assert 1 <= run["mean_batch_size"] <= run["settings"]["max_batch_size"]
    assert set(run["latency_ms"]) >= {"p50", "p95", "p99"}
    assert run["latency_ms"]["p50"] <= run["latency_ms"]["p99"]


def test_environment_is_recorded(bench):
    result, _, _ = bench
    assert result["errors"] == {}
    env = result["bench"]
    assert env["git_commit"] and env["date"]
    assert set(env["versions"]) >= {"python", "worker", "onnxruntime", "numpy", "cv2"}
    assert env["device"]["runtime"] == "cpu"
    assert env["pipeline"]["models"] == ["channel_means", "gray_thumbnail"]
    assert result["images"]["count"] == COUNT and result["images"]["width"] == 640


def test_ceiling_measures_every_batch_size_of_the_run_and_the_sweep(bench):
    result, _, _ = bench
    ceiling = result["ceiling"]
    assert [r["batch_size"] for r in ceiling["engine_api"]] == [1, 4, 8]
    assert all(r["images_per_s"] > 0 and r["iterations"] >= 5 for r in ceiling["engine_api"])
    assert "device_resident" not in ceiling  # a CPU runtime has no device to keep inputs on
    assert "host batch buffer" in ceiling["definitions"]["cpu"]
    g = result["gpu_thread"]
    assert g["count"] == COUNT and 1 <= g["mean_batch_size"] <= 8


def test_worker_baseline_sweeps_and_rates_account_for_every_input(bench):
    result, _, _ = bench
    _complete(result["worker"], COUNT)
    assert result["worker"]["mode"] == "preloaded"
    b = result["baseline"]
    assert b["results"] == b["count"] == 10 and b["missing"] == 0
    assert [r["settings"]["max_batch_size"] for r in result["sweeps"]["batch"]] == [4]
    assert [r["settings"]["max_wait_ms"] for r in result["sweeps"]["wait"]] == [1.0]
    for run in result["sweeps"]["batch"] + result["sweeps"]["wait"]:
        _complete(run, 20)
    (rate,) = result["rates"]
    assert rate["mode"] == "rate" and rate["fraction_of_peak"] == 0.5
    _complete(rate, rate["count"])
    assert rate["target_rate"] == pytest.approx(0.5 * result["worker"]["images_per_s"])
    assert result["broker"]["records"] == COUNT


def test_broker_round_trip_and_the_latency_bound_of_the_50_percent_run(bench):
    result, text, _ = bench
    rt = result["round_trip"]
    assert rt["received"] == rt["count"] >= 20
    assert rt["target_rate"] == pytest.approx(result["rates"][0]["target_rate"])
    assert rt["latency_ms"]["p50"] <= rt["latency_ms"]["p99"]
    (rate,) = result["rates"]
    assert rate["gpu_batch_ms"] > 0
    lb = result["analysis"]["latency_bound"]
    assert lb["p99_ms"] == rate["latency_ms"]["p99"] and lb["broker_round_trip_p99_ms"] == rt["latency_ms"]["p99"]
    assert lb["bound_ms"] == pytest.approx(rate["settings"]["max_wait_ms"] + 3 * rate["gpu_batch_ms"]
                                           + rt["latency_ms"]["p99"])
    assert "latency at 50% of peak: p99" in text and "broker round trip, no worker" in text
    # the same at the images' size, reported beside it; the bound keeps the small records
    big = result["round_trip_image_sized"]
    assert big["received"] == big["count"] == rt["count"] and big["payload_bytes"] > 10 * rt["payload_bytes"]
    assert f"records of {big['payload_bytes']} B" in text


@pytest.mark.kafka
def test_the_bench_runs_on_apache_kafka_too(tmp_path):
    """``--broker kafka``: the run's broker is Apache Kafka (PLAINTEXT only, no certificates), started and
    stopped by the bench; the worker run and the 50% run account for every input, and the broker's round
    trips are measured through it (where tansu's own latency is what the latency bound would measure). Two
    intakes, and Kafka's own initial rebalance delay: no run's group rebalances once its members have joined
    (at the tests' delay of 0 the 50% run's second intake forced one)."""
    from tests.kafka_broker import tools_missing

    why = tools_missing()
    if why:
        pytest.skip(why)
    out = tmp_path / "bench.json"
    env = {**os.environ, "WORKER_MODEL_CACHE": str(tmp_path / "models"), "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "benchmarks", "--broker", "kafka", "--pipeline", "demo", "--device", "cpu",
           "--count", str(COUNT), "--unique", "16", "--max-batch-size", "8", "--rates", "0.5", "--rate-seconds", "1",
           "--ceiling-seconds", "0.1", "--decode-workers", "2", "--intake-processes", "2",
           "--log-level", "warning", "--skip", "decode,broker,baseline,sweeps,gpu_thread", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=420, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    result = json.loads(out.read_text())
    assert result["bench"]["broker"]["kind"] == "kafka" and result["bench"]["broker"]["version"].startswith("4.")
    assert result["bench"]["broker"]["initial_rebalance_delay_ms"] == 3000
    assert "local broker (kafka) on 127.0.0.1:" in text
    assert "because it is rebalancing" not in text
    _complete(result["worker"], COUNT)
    (rate,) = result["rates"]
    assert rate["missing"] == 0 and rate["duplicates"] == 0 and rate["results"] == rate["count"]
    assert result["round_trip"]["received"] == result["round_trip"]["count"]
    assert result["analysis"]["latency_bound"]["p99_ms"] == rate["latency_ms"]["p99"]


def test_intake_cpu_is_counted_per_intake_from_its_first_message(bench):
    result, _, _ = bench
    for run in [result["worker"], *result["rates"]]:
        ic = run["intake_cpu"]
        assert ic["without_messages"] + len(ic["processes"]) == run["settings"]["intake_processes"]
        assert sum(p["consumed"] for p in ic["processes"]) == run["worker_counts"]["consumed"]
        assert run["cpu_s"]["intake_processes"] == pytest.approx(sum(p["cpu_s"] for p in ic["processes"]), abs=1e-3)
        assert set(run["cpu_ms_per_message"]) >= {"intake_processes", "gpu_process", "broker_process"}


def test_broker_read_gives_each_client_s_floor_of_cpu_per_message(bench):
    """Each client reads the worker run's topic alone, in a process of its own: every record, and the
    CPU that took per record (the least an intake with that client can spend)."""
    result, text, _ = bench
    floor = result["broker"]
    assert set(floor["clients"]) == {"aiokafka", "librdkafka"}
    for client, c in floor["clients"].items():
        assert c["client"] == client and c["records"] == COUNT
        assert c["cpu_ms_per_message"] >= 0 and c["records_per_s"] >= 0  # 40 records may all come in the first poll
        assert f"broker read, no processing ({client} alone)" in text
    assert floor["records_per_s"] == floor["clients"]["aiokafka"]["records_per_s"]  # the bench's broker ceiling


def test_decode_capacity_rows_and_ratios(bench):
    result, _, _ = bench
    assert {(r["decoder"], r["threads"]) for r in result["decode"]} == {
        ("cpu", 1), ("cpu", 2), ("cpu-reduced", 1), ("cpu-reduced", 2)}
    ratios = result["analysis"]["ratios"]
    assert set(ratios) >= {"worker_over_ceiling", "worker_over_baseline", "worker_over_gpu_thread"}
    w = result["worker"]["images_per_s"]
    assert ratios["worker_over_baseline"] == pytest.approx(w / result["baseline"]["images_per_s"])
    assert result["analysis"]["bound"]["stage"] in result["analysis"]["capacities"]


def test_table_is_printed_and_written(bench):
    _, text, md = bench
    for label in ("engine API, batch 8", "GPU thread alone", "worker (Kafka->decode->GPU->Kafka)",
                  "baseline (per message, batch 1)", "decode cpu-reduced, 2 threads", "worker at 50% of peak"):
        assert label in text and label in md
    assert "ratios: worker_over_ceiling" in text


@pytest.mark.parametrize("client", ["aiokafka", "librdkafka"])
def test_group_join_reports_when_each_member_of_a_fresh_group_got_its_partitions(broker, client):
    """benchmarks.group_join (the late-intake experiment of docs/benchmarks.md, run 24) on the real broker:
    every member assigned, after the subscription, within the experiment's deadline."""
    from benchmarks.group_join import one_run

    times = one_run(broker.bootstrap, client, members=2, deadline_s=20.0)
    assert len(times) == 2 and times == sorted(times)
    assert 0 < times[0] <= times[1] < 20.0

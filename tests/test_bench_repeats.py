"""benchmarks.repeats: repeated bench runs grouped by variant, on hand-written results (pure; no broker)."""

from __future__ import annotations

import json

import pytest

from benchmarks import repeats

BASE = ("python -m benchmarks --pipeline resnet50 --device cuda --count 8000 --max-batch-size 128 "
        "--skip decode,broker,baseline --decoder {decoder} --json /tmp/res/{i}.json --log-level info")


def _result(decoder: str, i: int, ips: float, ceiling: float = 6000.0, middle: float | None = None,
            firsts: tuple[float, ...] = (0.0, 0.01), loop: float = 0.5, missing: int = 0, minute: int = 0) -> dict:
    return {
        "bench": {"command": BASE.format(decoder=decoder, i=i), "date": f"2026-12-07T10:{minute:02d}:00+00:00",
                  "git_commit": "04514e7abcdef0123", "device": {"gpu_name": "NVIDIA H100 80GB HBM3"},
                  "settings": {"max_batch_size": 128}},
        "ceiling": {"device_resident": [{"batch_size": 1, "images_per_s": 500.0},
                                        {"batch_size": 128, "images_per_s": ceiling}]},
        "worker": {"images_per_s": ips, "images_per_s_middle": middle, "count": 8000, "results": 8000 - missing,
                   "missing": missing, "intake_spans_s": [[f, 1.4] for f in firsts],
                   "gpu_thread_busy_fraction": 0.97, "gpu_batch_ms": 23.0, "mean_batch_size": 127.0,
                   "intake_cpu": {"processes": [{"loop_ms_per_message": loop}, {"loop_ms_per_message": loop}]}},
    }


def test_command_flags_leave_out_where_a_run_writes():
    flags = repeats.command_flags(BASE.format(decoder="hybrid", i=3) + " --sweep-intakes 1,2 --no-warmup")
    assert flags["--decoder"] == "hybrid" and flags["--count"] == "8000" and flags["--sweep-intakes"] == "1,2"
    assert flags["--no-warmup"] == ""
    assert repeats.command_flags("python -m benchmarks --decoder=hybrid --json=x.json") == {"--decoder": "hybrid"}
    assert "--json" not in flags and "--log-level" not in flags
    assert "python" not in flags and "-m" not in flags


def test_labels_name_only_the_flags_that_differ():
    a = {"--decoder": "hybrid", "--count": "8000"}
    b = {"--decoder": "nvimgcodec", "--count": "8000", "--rates": "0.5"}
    assert repeats.labels([a, b]) == ["--decoder hybrid (no --rates)", "--decoder nvimgcodec --rates 0.5"]
    assert repeats.labels([a, dict(a)]) == ["all", "all"]


def test_a_run_row_is_against_its_own_ceiling_and_flags_a_late_intake():
    row = repeats.run_row(_result("hybrid", 1, ips=5400.0, ceiling=6000.0, middle=5700.0, firsts=(0.0, 1.0)))
    assert row["ratio"] == pytest.approx(0.9) and row["middle_ratio"] == pytest.approx(0.95)
    assert row["intakes_apart_s"] == pytest.approx(1.0) and row["late_intake"] is True
    assert row["loop_ms_per_message"] == pytest.approx(0.5) and row["complete"] is True
    on_time = repeats.run_row(_result("hybrid", 1, ips=5400.0, firsts=(0.0, 0.3)))
    assert on_time["late_intake"] is False
    assert repeats.run_row(_result("hybrid", 1, ips=5400.0, missing=2))["complete"] is False


def test_a_run_without_a_ceiling_has_no_ratio():
    result = _result("hybrid", 1, ips=5400.0)
    result["ceiling"] = {}
    row = repeats.run_row(result)
    assert row["ratio"] is None and row["middle_ratio"] is None


def test_summary_groups_by_variant_in_the_order_they_ran():
    runs = [_result("nvimgcodec", 2, ips=5580.0, minute=2), _result("hybrid", 1, ips=5000.0, minute=1),
            _result("hybrid", 3, ips=5460.0, minute=3, firsts=(0.0, 1.01)), _result("nvimgcodec", 4, ips=4800.0, minute=4),
            _result("hybrid", 5, ips=4900.0, minute=5)]
    s = repeats.summarise(runs, target=0.9)
    assert s["runs"] == 5 and [v["label"] for v in s["variants"]] == ["--decoder hybrid", "--decoder nvimgcodec"]
    hybrid, card = s["variants"]
    assert hybrid["ratios"] == pytest.approx([5000 / 6000, 0.91, 4900 / 6000])  # by date, not argument order
    assert hybrid["median"] == pytest.approx(5000 / 6000) and hybrid["lowest"] == pytest.approx(4900 / 6000)
    assert hybrid["reached"] == 1 and hybrid["late_intakes"] == 1 and hybrid["n"] == 3
    assert card["ratios"] == pytest.approx([0.93, 0.8]) and card["reached"] == 1
    assert card["median"] == pytest.approx(0.865)
    assert s["cards"] == ["NVIDIA H100 80GB HBM3"] and s["commits"] == ["04514e7abcde"]
    assert s["dates"] == ["2026-12-07T10:01:00+00:00", "2026-12-07T10:05:00+00:00"]


def test_markdown_marks_late_intakes_and_missing_results():
    runs = [_result("hybrid", 1, ips=5400.0, firsts=(0.0, 1.0)), _result("hybrid", 2, ips=5500.0, missing=1, minute=1)]
    table = repeats.markdown(repeats.summarise(runs))
    assert "0.900*, 0.917!" in table
    # both ratios reach 0.9: the count is of ratios; the mark tells the reader the second run lost results
    assert "| all | 2 |" in table and "2 of 2" in table


def test_main_reads_files_skips_unreadable_ones_and_writes_both_outputs(tmp_path, capsys):
    paths = []
    for i, ips in enumerate((5500.0, 5300.0)):
        p = tmp_path / f"{i}.json"
        p.write_text(json.dumps(_result("nvimgcodec", i, ips=ips, minute=i)))
        paths.append(str(p))
    (tmp_path / "cut.json").write_text('{"bench": ')  # a run killed by its timeout
    out_json, out_md = tmp_path / "s.json", tmp_path / "s.md"
    code = repeats.main([*paths, str(tmp_path / "cut.json"), "--target", "0.9", "--json", str(out_json),
                         "--markdown", str(out_md)])
    assert code == 0
    summary = json.loads(out_json.read_text())
    assert summary["runs"] == 2 and summary["variants"][0]["reached"] == 1
    assert len(summary["unreadable"]) == 1 and "cut.json" in summary["unreadable"][0]
    assert out_md.read_text() in capsys.readouterr().out


def test_main_without_a_readable_run_exits_2(tmp_path):
    (tmp_path / "cut.json").write_text("")
    assert repeats.main([str(tmp_path / "cut.json")]) == 2

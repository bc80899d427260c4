"""CPU sizing from cgroup quotas (plain calls on files written here)."""

from pathlib import Path

from worker.policy.cpus import decode_threads_for, intake_processes_for, quota_cpus


def test_cgroup_v2_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("700000 100000\n")
    assert quota_cpus(tmp_path) == 7.0


def test_cgroup_v2_unlimited(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert quota_cpus(tmp_path) is None


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("250000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert quota_cpus(tmp_path) == 2.5


def test_no_cgroup_files(tmp_path: Path) -> None:
    assert quota_cpus(tmp_path) is None


def test_intakes_and_threads() -> None:
    assert [intake_processes_for(n) for n in (1, 2, 3, 4, 7, 16, 64)] == [1, 1, 1, 1, 3, 7, 8]
    assert decode_threads_for(7, 3) == 2
    assert decode_threads_for(1, 4) == 1

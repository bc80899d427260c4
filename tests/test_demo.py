"""`worker demo` as a user runs it: a subprocess, its own broker, exit code and printed summary."""

import os
import re
import subprocess
import sys


def test_demo_200_exits_0_and_reports_200_results(tmp_path):
    env = {**os.environ, "WORKER_MODEL_CACHE": str(tmp_path / "models"), "COLUMNS": "120"}
    proc = subprocess.run([sys.executable, "-m", "worker", "demo", "--count", "200"], env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert re.search(r"results\s*│\s*200\s*│", out), out[-3000:]
    assert re.search(r"duplicates\s*│\s*0\s*│", out), out[-3000:]
    assert "OK: 200 inputs, 200 results, 0 dead-lettered" in out

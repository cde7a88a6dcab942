#!/usr/bin/env bash
# The GPU benchmarks in one go (docs/benchmarks.md): full-size FLUX.1 at 1024², Wan2.1-1.3B at 480p (CFG) and
# HunyuanVideo, random bf16 weights, each variant of bench/run.py. Each model has its own time limit so one slow
# model cannot eat the others' time. Results: $OUT (or ./out/gpu) as <model>.json and <model>.log.
#
# Needs torch with CUDA; diffusers may come as wheels in .whl/perf (pip download diffusers==0.42.1 importlib_metadata).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
if ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/perf/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"

run() {  # run <name> <seconds> <bench.run args...>
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" python3 -m bench.run "$@" --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log" | grep -v Warning
}
run flux_full "${FLUX_LIMIT:-240}" --model flux --size full --repeats 2
run wan_full_33f "${WAN_LIMIT:-170}" --model wan --size full --frames 33
run hunyuan_full_small "${HUNYUAN_LIMIT:-150}" --model hunyuan --size full --frames 33 --height 320 --width 512 --no-overhead

#!/usr/bin/env bash
# The speed stack in one device call (docs/benchmarks.md, "Speed stack"): python -m bench.gpu_stack on the GPU,
# stopped at LIMIT seconds (default 570) whatever happens; its own budget (--budget, default 520 s) stops new cases
# before that. Results in $OUT: gpu_stack.json (rewritten after every case) and gpu_stack.log.
#
# Carry .whl (bench/gpu_env.sh download): .whl/perf (diffusers) unless the machine has it, .whl/speed (torchao,
# for the float8 cases; without it they are skipped with the reason). Extra arguments go to bench.gpu_stack, e.g.
#   bash bench/gpu_stack.sh --phases flux,per_call --budget 400
set -uo pipefail
OUT=${OUT:-out/gpu_stack}
mkdir -p "$OUT"
source "$(dirname "$0")/gpu_env.sh"
install_missing diffusers .whl/perf || exit 1
install_missing torchao .whl/speed || echo "torchao missing: the float8 cases will be skipped"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
describe_machine
timeout "${LIMIT:-570}" python3 -m bench.gpu_stack --json "$OUT/gpu_stack.json" "$@" 2>&1 | tee "$OUT/gpu_stack.log" \
  | grep -v -e Warning -e "experimental feature" -e "Failed to load"

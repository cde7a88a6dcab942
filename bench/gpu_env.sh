# Sourced by the GPU scripts (gpu.sh, gpu_stack.sh): installs carried wheels the device machine lacks, puts the
# repository on PYTHONPATH and prints the machine. The device machine has torch with CUDA but no registry; wheels
# travel in .whl/ (ignored by git; name it in the device call's carry). Fetch them here with:
#   bash bench/gpu_env.sh download      # .whl/perf: diffusers 0.42.1; .whl/speed: torchao 0.18.0
# (diffusers needs nothing else there: its other requirements are in the machine's image.)
SITE=${SITE:-/tmp/site}
export PYTHONUNBUFFERED=1

install_missing() {  # install_missing <python module> <wheel folder>: install the carried wheels if the module is absent
  python3 -c "import $1" 2>/dev/null && return 0
  [ -d "$2" ] || { echo "$1 is not installed and $2 was not carried"; return 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$2"/*.whl \
    || return 1
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
}

describe_machine() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
}

if [ "${1:-}" = download ]; then  # here, not on the device machine: Python 3.12 x86-64 wheels for it
  platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64"
  for spec in perf:diffusers==0.42.1 speed:torchao==0.18.0; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
      -d ".whl/${spec%%:*}" "${spec#*:}" || exit 1
  done
  ls -l .whl/perf .whl/speed
fi

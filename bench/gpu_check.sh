#!/usr/bin/env bash
# The GPU check on a lent device machine (docs/benchmarks.md, "GPU rows"), as one command:
#   here:    bench/gpu_check.sh --fetch-wheels     # once: the server's wheels missing there, into .whl/
#   device:  bench/gpu_check.sh [--budget-s 540]   # run with carry [".whl", ".ref"]
# On the device it installs the carried wheels and the three latentpi distributions into
# /tmp/site (nothing else is installed there), checks parity on the reference files when .ref/
# holds them (cp ../shared/reference/*.npz .ref/ here first), then runs bench/gpu_check.py and
# writes its JSON to $OUT (or ./gpu-check-out).
set -euo pipefail
cd "$(dirname "$0")/.."

# Versions from uv.lock; the device image already has jax, flax, orbax, numpy, msgpack, ml-dtypes,
# sentencepiece, prometheus-client, pillow, h11, anyio and click.
WHEELS=(starlette==1.10.0 uvicorn==0.54.0 websockets==17.4)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  grep -qx '/.ref/' .git/info/exclude 2>/dev/null || echo '/.ref/' >> .git/info/exclude
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "${WHEELS[@]}"
  # Pure-Python wheels of our own distributions: the device has no build backend (hatchling).
  .venv/bin/python -m pip wheel -q --no-deps -w .whl ./protocol ./server 2>/dev/null \
    || python3 -m pip wheel -q --no-deps -w .whl ./protocol ./server
  exit 0
fi

site=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
  .whl/*.whl
export PYTHONPATH="$site" PYTHONUNBUFFERED=1
out="${OUT:-gpu-check-out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
if compgen -G ".ref/*.npz" > /dev/null; then
  python3 -c 'import sys; from latentpi.cli import main; main(sys.argv[1:])' parity .ref/*.npz \
    | tee "$out/parity.txt" || echo "parity FAILED"
fi
python3 bench/gpu_check.py --out "$out/gpu_check.json" "$@"

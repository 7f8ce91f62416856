#!/usr/bin/env bash
# The prepared GPU check (issue 6): one run on an accelerator machine, well inside 10 minutes.
#
#   bash bench/gpu_check.sh OUTDIR        # OUTDIR defaults to $OUT, else ./gpu_check_out
#
# It prints the environment (card, driver, torch, CUDA), runs the GPU tests, bench/transfer.py
# at 1, 4 and 16 GB, the pipeline benchmark (its GPU column) and the app's lifecycle on CUDA
# (bench/lifecycle.py), and writes each output to OUTDIR. Each step has its own time limit, so
# one that hangs or fails does not lose the others.
#
# The lent machines have torch, scipy, scikit-image, pillow, safetensors, psutil, tqdm and
# pytest but not PyAV or soundfile: carry their wheels for that machine's Python (see
# /work/.library/device/README.md, "a Python package missing there"), e.g. av==18.1.0 and
# soundfile==0.14.0 (+ cffi, pycparser), and install them before calling this script.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False
py=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}

step env 30 bash -c "date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv; \
  $py -c 'import torch; print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda, torch.cuda.get_device_name())'"
step pytest_gpu 150 "$py" -m pytest -q -m gpu -p no:cacheprovider tests/gpu_control tests/pipelines
step transfer 240 "$py" bench/transfer.py --sizes 1 4 16 --repeat 3
step pipeline 90 "$py" bench/pipeline.py --sizes 256,512 --repeats 2 --rss-seconds 10,60
step lifecycle 60 "$py" bench/lifecycle.py --device cuda --size 512
# The pool, sharing and model-family benchmarks (issues 10-12): a second run, GPU_CHECK_MORE=1
# bash bench/gpu_check.sh OUTDIR, when the first one has left the device time for it.
if [ "${GPU_CHECK_MORE:-0}" = 1 ]; then
  step pool 150 "$py" bench/pool.py --device cuda:0 --size-mb 2000
  step models 200 "$py" bench/models.py
  step share 150 "$py" bench/share.py --device cuda:0
fi

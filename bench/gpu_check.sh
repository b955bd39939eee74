#!/usr/bin/env bash
# Every knowmux strategy once on each engine, on this machine's GPU: TTFT and decode
# tokens/s per strategy (bench/gpu_check.py). Runs unchanged on a GPU machine:
#
#   in the image:   docker run --gpus all knowmux bench/gpu_check.sh
#   in a checkout:  make setup && bench/gpu_check.sh            (the venv at .venv is used)
#                   bench/gpu_check.sh --model /models/Llama-3.1-8B-Instruct --dtype bfloat16
#
# On a machine without a GPU, --dry-run rehearses the same steps on the CPU (the tests
# run it with a tiny model). Any other flag goes to bench/gpu_check.py (--help there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
dry=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && dry=1; done
if [ "$dry" = 0 ] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch sees no CUDA device here; use --dry-run to rehearse on the CPU" >&2
    exit 2
fi
exec "$PY" -m bench.gpu_check "$@"

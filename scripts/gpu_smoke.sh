#!/usr/bin/env bash
# What an operator runs first on a GPU node, after `make setup-gpu`:
#   scripts/gpu_smoke.sh [--np N] [--epochs E] [--out DIR]
# One short digits job on all local GPUs (N: the GPUs nvidia-smi lists). It fails unless the
# driver can run Horovod's CUDA 13 kernels, each rank sees exactly one GPU (its local rank's),
# and every gradient allreduce in the Horovod timeline is NCCL_ALLREDUCE; it prints the
# throughput per GPU. The checks are scripts/gpu_checks.py (tested in tests/test_gpu_checks.py).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv-gpu/bin/python}
[ -x "$PY" ] || { echo "gpu_smoke: no $PY: run 'make setup-gpu' first" >&2; exit 2; }
command -v nvidia-smi >/dev/null || { echo "gpu_smoke: no nvidia-smi: this is not a GPU node" >&2; exit 2; }
exec "$PY" "$ROOT/scripts/gpu_checks.py" smoke "$@"

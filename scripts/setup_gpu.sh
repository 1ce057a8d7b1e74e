#!/usr/bin/env bash
# The GPU environment, .venv-gpu (docs/setup.md, "The GPU build"), beside the CPU one:
#   1. apt: the same Open MPI and C++ tool chain as scripts/setup.sh;
#   2. .venv-gpu with setup.cfg's packages, TensorFlow from the `gpu` extra
#      (tensorflow[and-cuda]: the CUDA 12 runtime, cuDNN and NCCL as nvidia-* wheels);
#   3. Horovod 0.28.1 from its sdist with both patches (cpu, then gpu), built with
#      HOROVOD_GPU_OPERATIONS=NCCL against the NCCL wheel, TF ops, Gloo and MPI;
#      its CUDA code is compiled by the machine's nvcc (CUDA_HOME, or the nvcc on PATH);
#   4. a check that `horovodrun --check-build` lists TensorFlow, MPI, Gloo and NCCL.
#
# Idempotent like scripts/setup.sh: the Horovod wheel is kept in pip's cache folder keyed
# by the TensorFlow version, the CUDA version of nvcc and both patches.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
VENV=${VENV:-$ROOT/.venv-gpu}
LOG_PREFIX=setup-gpu
EXTRAS=(test demo)
APT_PACKAGES=(libopenmpi-dev openmpi-bin build-essential cmake patch python3-dev)
PATCH_KINDS=(cpu gpu)
# shellcheck source=scripts/setup_lib.sh
. "$ROOT/scripts/setup_lib.sh"

# --- 1. system packages -------------------------------------------------------
apt_install "${APT_PACKAGES[@]}"

# --- the CUDA compiler ----------------------------------------------------------
CUDA_HOME=${HOROVOD_CUDA_HOME:-${CUDA_HOME:-}}
if [ -z "$CUDA_HOME" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null; then
    CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
  fi
fi
[ -n "$CUDA_HOME" ] && [ -x "$CUDA_HOME/bin/nvcc" ] ||
  die "no nvcc: set CUDA_HOME to a CUDA toolkit (13.x, see docs/setup.md)"
CUDA_VERSION=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9][0-9.]*\),.*/\1/p')
[ -n "$CUDA_VERSION" ] || die "cannot read the CUDA version from $CUDA_HOME/bin/nvcc --version"
# Compute capabilities of Horovod's CUDA kernels (SASS for each, PTX for the last). nvcc 13
# starts at Turing (7.5); a CUDA 12 toolkit can still build Volta (7.0), and Blackwell from 12.8.
case "$CUDA_VERSION" in
  12.[0-7]|12.[0-7].*) default_cc=70,75,80,86,89,90 ;;
  12.*) default_cc=70,75,80,86,89,90,100,120 ;;
  *) default_cc=75,80,86,89,90,100,120 ;;
esac
CUDA_CC_LIST=${HOROVOD_BUILD_CUDA_CC_LIST:-$default_cc}

# --- 2. virtual environment ---------------------------------------------------
venv_create
want=$( (cat setup.cfg "${PATCHES[@]}" scripts/setup_gpu.sh scripts/setup_lib.sh scripts/requirements.py
         echo "$CUDA_VERSION") | sha256sum | cut -c1-16)
if stamp_current "$want"; then
  log "environment up to date ($VENV)"
  exit 0
fi
log "installing Python packages (TensorFlow with CUDA: several GB)"
python_packages gpu "${EXTRAS[@]}"

# --- 3. Horovod -----------------------------------------------------------------
hvd_ok() {
  "$VENV/bin/horovodrun" --check-build 2>/dev/null >"$1" || return 1
  local what
  for what in TensorFlow MPI Gloo NCCL; do grep -q "\[X\] $what" "$1" || return 1; done
}
build_gpu() {  # SOURCE CACHE_DIR LOG
  local nccl_lib
  nccl_lib=$(dirname "$3")/nccl-lib
  # The NCCL wheel has libnccl.so.2 but no libnccl.so for the linker to find.
  mkdir -p "$nccl_lib"
  ln -sf "$NCCL_DIR/lib/libnccl.so.2" "$nccl_lib/libnccl.so"
  # TensorFlow 2.21's XLA headers include HighwayHash and FarmHash relative to their
  # own repositories, which the wheel ships under include/external/.
  local tf_inc=$site/tensorflow/include/external
  # The rpath finds libnccl.so.2 in the nvidia-nccl-cu12 wheel from site-packages/horovod/*/.
  HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
    HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
    HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_CUDA_HOME="$CUDA_HOME" \
    HOROVOD_NCCL_LINK=SHARED HOROVOD_NCCL_INCLUDE="$NCCL_DIR/include" HOROVOD_NCCL_LIB="$nccl_lib" \
    HOROVOD_BUILD_CUDA_CC_LIST="$CUDA_CC_LIST" \
    CXXFLAGS="${CXXFLAGS:-} -I$tf_inc/highwayhash -I$tf_inc/farmhash_archive/src" \
    LDFLAGS="${LDFLAGS:-} -Wl,-rpath,\$ORIGIN/../../nvidia/nccl/lib" \
    PATH="$CUDA_HOME/bin:$PATH" MAKEFLAGS="-j$(nproc)" \
    "${PIP[@]}" wheel -v --no-deps --no-build-isolation -w "$2" "$1" >"$3" 2>&1
}
check_out=$(mktemp)
trap 'rm -f "$check_out"' EXIT
site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
NCCL_DIR=$site/nvidia/nccl
[ -f "$NCCL_DIR/include/nccl.h" ] && [ -f "$NCCL_DIR/lib/libnccl.so.2" ] ||
  die "no NCCL in $NCCL_DIR (tensorflow[and-cuda] installs nvidia-nccl-cu12)"
patch_sha=$(cat "${PATCHES[@]}" | sha256sum | cut -c1-12)
marker="cuda$CUDA_VERSION-$patch_sha"
if ! hvd_ok "$check_out" || [ "$(cat "$VENV/.horovod-build" 2>/dev/null)" != "$marker" ]; then
  tf_version=$("$PY" -c "import tensorflow as tf; print(tf.__version__)" 2>/dev/null)
  horovod_install "$(horovod_cache_dir "gpu-tf$tf_version-cuda$CUDA_VERSION-$patch_sha")" build_gpu \
    "(NCCL, CUDA $CUDA_VERSION) against TensorFlow $tf_version"
  hvd_ok "$check_out" || { cat "$check_out" >&2; die "horovodrun --check-build does not list TensorFlow, MPI, Gloo and NCCL"; }
  echo "$marker" >"$VENV/.horovod-build"
fi
log "horovodrun --check-build:"
grep -E '\[X\] (TensorFlow|MPI|Gloo|NCCL)' "$check_out" | awk '{$1=$1} !seen[$0]++' | sed 's/^/    /'

# --- 4. this project ------------------------------------------------------------
project_install "gpu,horovod-build,$(IFS=,; echo "${EXTRAS[*]}")" "$want"
log "done: activate with 'source .venv-gpu/bin/activate'; check with 'make check-gpu-build'"

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
PY=$VENV/bin/python
EXTRAS=(test demo)
APT_PACKAGES=(libopenmpi-dev openmpi-bin build-essential cmake patch python3-dev)

log() { printf '[setup-gpu] %s\n' "$*"; }
die() { printf '[setup-gpu] error: %s\n' "$*" >&2; exit 1; }
reqs() { "$PYTHON" scripts/requirements.py "$@"; }

# --- 1. system packages -------------------------------------------------------
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing apt packages: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

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
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
HOROVOD_VERSION=$(reqs --only horovod install | sed -n 's/^horovod==//p')
[ -n "$HOROVOD_VERSION" ] || die "setup.cfg does not pin horovod==VERSION in install_requires"
PATCHES=("$ROOT/scripts/horovod-$HOROVOD_VERSION-tf2.21-cpu.patch" "$ROOT/scripts/horovod-$HOROVOD_VERSION-tf2.21-gpu.patch")
for p in "${PATCHES[@]}"; do [ -f "$p" ] || die "no Horovod patch: $p"; done
if [ ! -x "$PY" ]; then
  log "creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$PY" -m pip --disable-pip-version-check)

stamp=$VENV/.setup-stamp
want=$( (cat setup.cfg "${PATCHES[@]}" scripts/setup_gpu.sh scripts/requirements.py; echo "$CUDA_VERSION") |
  sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PY" -c "import horovod.tensorflow" 2>/dev/null; then
  touch "$stamp"
  log "environment up to date ($VENV)"
  exit 0
fi

log "installing Python packages (TensorFlow with CUDA: several GB)"
"${PIP[@]}" install -q --upgrade pip setuptools wheel
mapfile -t first < <(reqs --without horovod --without mpi4py gpu install horovod-build "${EXTRAS[@]}")
[ ${#first[@]} -gt 0 ] || die "no requirements read from setup.cfg"
"${PIP[@]}" install -q "${first[@]}"
"$PY" -c "import mpi4py" 2>/dev/null || "${PIP[@]}" install -q --no-binary mpi4py "$(reqs --only mpi4py install)"

# --- 3. Horovod -----------------------------------------------------------------
hvd_ok() {
  "$VENV/bin/horovodrun" --check-build 2>/dev/null >"$1" || return 1
  local what
  for what in TensorFlow MPI Gloo NCCL; do grep -q "\[X\] $what" "$1" || return 1; done
}
check_out=$(mktemp)
work=""
trap 'rm -f "$check_out"; [ -z "$work" ] || rm -rf "$work"' EXIT
site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
NCCL_DIR=$site/nvidia/nccl
[ -f "$NCCL_DIR/include/nccl.h" ] && [ -f "$NCCL_DIR/lib/libnccl.so.2" ] ||
  die "no NCCL in $NCCL_DIR (tensorflow[and-cuda] installs nvidia-nccl-cu12)"
patch_sha=$(cat "${PATCHES[@]}" | sha256sum | cut -c1-12)
marker="cuda$CUDA_VERSION-$patch_sha"
if ! hvd_ok "$check_out" || [ "$(cat "$VENV/.horovod-build" 2>/dev/null)" != "$marker" ]; then
  tf_version=$("$PY" -c "import tensorflow as tf; print(tf.__version__)" 2>/dev/null)
  key="tf$tf_version-cuda$CUDA_VERSION-$patch_sha"
  cache_dir=${HOROVOD_WHEEL_CACHE:-$("$PY" -m pip cache dir)/hvd-keras-cnn/horovod-$HOROVOD_VERSION-gpu-$key}
  wheel=$(ls "$cache_dir"/horovod-"$HOROVOD_VERSION"-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$wheel" ]; then
    log "building Horovod $HOROVOD_VERSION (NCCL, CUDA $CUDA_VERSION) against TensorFlow $tf_version"
    work=$(mktemp -d)
    "${PIP[@]}" download -q --no-deps --no-binary :all: -d "$work" "horovod==$HOROVOD_VERSION"
    tar -xzf "$work/horovod-$HOROVOD_VERSION.tar.gz" -C "$work"
    for p in "${PATCHES[@]}"; do
      patch -s -p1 -d "$work/horovod-$HOROVOD_VERSION" <"$p" || die "the Horovod patch does not apply: $p"
    done
    # The NCCL wheel has libnccl.so.2 but no libnccl.so for the linker to find.
    mkdir -p "$work/nccl-lib"
    ln -s "$NCCL_DIR/lib/libnccl.so.2" "$work/nccl-lib/libnccl.so"
    # TensorFlow 2.21's XLA headers include HighwayHash and FarmHash relative to their
    # own repositories, which the wheel ships under include/external/.
    tf_inc=$site/tensorflow/include/external
    mkdir -p "$cache_dir"
    # The rpath finds libnccl.so.2 in the nvidia-nccl-cu12 wheel from site-packages/horovod/*/.
    HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
      HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
      HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_CUDA_HOME="$CUDA_HOME" \
      HOROVOD_NCCL_LINK=SHARED HOROVOD_NCCL_INCLUDE="$NCCL_DIR/include" HOROVOD_NCCL_LIB="$work/nccl-lib" \
      HOROVOD_BUILD_CUDA_CC_LIST="$CUDA_CC_LIST" \
      CXXFLAGS="${CXXFLAGS:-} -I$tf_inc/highwayhash -I$tf_inc/farmhash_archive/src" \
      LDFLAGS="${LDFLAGS:-} -Wl,-rpath,\$ORIGIN/../../nvidia/nccl/lib" \
      PATH="$CUDA_HOME/bin:$PATH" MAKEFLAGS="-j$(nproc)" \
      "${PIP[@]}" wheel -v --no-deps --no-build-isolation -w "$cache_dir" "$work/horovod-$HOROVOD_VERSION" \
      >"$work/build.log" 2>&1 || {
      cp "$work/build.log" "$VENV/horovod-build.log"
      grep -E 'error|Error' "$work/build.log" | head -n 20 >&2
      die "Horovod build failed (log: $VENV/horovod-build.log)"
    }
    wheel=$(ls "$cache_dir"/horovod-"$HOROVOD_VERSION"-*.whl | head -n1)
  else
    log "reusing cached Horovod wheel $(basename "$wheel") ($key)"
  fi
  "${PIP[@]}" install -q --force-reinstall --no-deps "$wheel"
  hvd_ok "$check_out" || { cat "$check_out" >&2; die "horovodrun --check-build does not list TensorFlow, MPI, Gloo and NCCL"; }
  echo "$marker" >"$VENV/.horovod-build"
fi
log "horovodrun --check-build:"
grep -E '\[X\] (TensorFlow|MPI|Gloo|NCCL)' "$check_out" | awk '{$1=$1} !seen[$0]++' | sed 's/^/    /'

# --- 4. this project ------------------------------------------------------------
"${PIP[@]}" install -q --no-build-isolation -e ".[gpu,horovod-build,$(IFS=,; echo "${EXTRAS[*]}")]"
echo "$want" >"$stamp"
log "done: activate with 'source .venv-gpu/bin/activate'; check with 'make check-gpu-build'"

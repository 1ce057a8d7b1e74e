#!/usr/bin/env bash
# One-command set-up on Debian 12 (run as root, or with sudo available for apt):
#   1. apt: Open MPI and a C++ tool chain (for Horovod and mpi4py), Slurm and sshd (for tests);
#   2. .venv with the packages setup.cfg lists: TensorFlow (CPU), Keras 3, TensorBoard,
#      mpi4py (built against the system Open MPI), test tools and the linter;
#   3. Horovod 0.28.1 built from its sdist, patched for TF 2.21, with TF ops, Gloo and MPI;
#   4. a check that `horovodrun --check-build` lists TensorFlow, MPI and Gloo.
#
# Idempotent: every step checks first and does nothing when already done. The
# Horovod wheel is kept in pip's cache folder, keyed by the TensorFlow version and
# the patch, so a fresh clone on the same machine installs it without compiling.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
VENV=${VENV:-$ROOT/.venv}
LOG_PREFIX=setup
# The extras of setup.cfg installed besides `cpu` and `horovod-build`.
EXTRAS=(test demo)
# slurm-wlm and openssh-server: the Slurm and two-host tests start their own daemons.
APT_PACKAGES=(libopenmpi-dev openmpi-bin build-essential cmake patch python3-dev slurm-wlm openssh-server)
PATCH_KINDS=(cpu)
# shellcheck source=scripts/setup_lib.sh
. "$ROOT/scripts/setup_lib.sh"

# --- 1. system packages -------------------------------------------------------
apt_install "${APT_PACKAGES[@]}"

# --- 2. virtual environment ---------------------------------------------------
venv_create
# The stamp records what the environment was built from; a change re-runs pip.
want=$(cat setup.cfg "${PATCHES[@]}" scripts/setup.sh scripts/setup_lib.sh scripts/requirements.py | sha256sum | cut -c1-16)
if stamp_current "$want"; then
  log "environment up to date ($VENV)"
  exit 0
fi
log "installing Python packages"
python_packages cpu "${EXTRAS[@]}"

# --- 3. Horovod -----------------------------------------------------------------
hvd_ok() {
  "$VENV/bin/horovodrun" --check-build 2>/dev/null >"$1" || return 1
  grep -q '\[X\] TensorFlow' "$1" && grep -q '\[X\] MPI' "$1" && grep -q '\[X\] Gloo' "$1"
}
build_cpu() {  # SOURCE CACHE_DIR LOG
  HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
    HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
    MAKEFLAGS="-j$(nproc)" \
    "${PIP[@]}" wheel -q --no-deps --no-build-isolation -w "$2" "$1" >"$3" 2>&1
}
check_out=$(mktemp)
trap 'rm -f "$check_out"' EXIT
# The marker names the patch the installed Horovod was built with: a changed patch rebuilds it.
patch_sha=$(cat "${PATCHES[@]}" | sha256sum | cut -d' ' -f1)
if ! hvd_ok "$check_out" || [ "$(cat "$VENV/.horovod-patch-sha256" 2>/dev/null)" != "$patch_sha" ]; then
  tf_version=$("$PY" -c "import tensorflow as tf; print(tf.__version__)")
  horovod_install "$(horovod_cache_dir "tf$tf_version-${patch_sha:0:12}")" build_cpu \
    "against TensorFlow $tf_version (about 5 minutes on 2 cores)"
  hvd_ok "$check_out" || { cat "$check_out" >&2; die "horovodrun --check-build does not list TensorFlow, MPI and Gloo"; }
  echo "$patch_sha" >"$VENV/.horovod-patch-sha256"
fi
log "horovodrun --check-build:"
sed -n '/Available Frameworks/,/Available Tensor Operations/p' "$check_out" | grep -E '\[X\]' | sed 's/^/    /'

# --- 4. this project ------------------------------------------------------------
project_install "cpu,horovod-build,$(IFS=,; echo "${EXTRAS[*]}")" "$want"
log "done: activate with 'source .venv/bin/activate'"

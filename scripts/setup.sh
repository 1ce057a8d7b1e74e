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
PY=$VENV/bin/python
# The extras of setup.cfg installed besides `cpu` and `horovod-build`.
EXTRAS=(test demo)
# slurm-wlm and openssh-server: the Slurm and two-host tests start their own daemons.
APT_PACKAGES=(libopenmpi-dev openmpi-bin build-essential cmake patch python3-dev slurm-wlm openssh-server)

log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }
# setup.cfg is the one list of Python dependencies; this script installs from it in build order.
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

# --- 2. virtual environment ---------------------------------------------------
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
HOROVOD_VERSION=$(reqs --only horovod install | sed -n 's/^horovod==//p')
[ -n "$HOROVOD_VERSION" ] || die "setup.cfg does not pin horovod==VERSION in install_requires"
PATCH=$ROOT/scripts/horovod-$HOROVOD_VERSION-tf2.21-cpu.patch
[ -f "$PATCH" ] || die "no Horovod patch for $HOROVOD_VERSION: $PATCH"
if [ ! -x "$PY" ]; then
  log "creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$PY" -m pip --disable-pip-version-check)

# The stamp records what the environment was built from; a change re-runs pip.
stamp=$VENV/.setup-stamp
want=$(cat setup.cfg "$PATCH" scripts/setup.sh scripts/requirements.py | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PY" -c "import horovod.tensorflow" 2>/dev/null; then
  touch "$stamp"
  log "environment up to date ($VENV)"
  exit 0
fi

log "installing Python packages"
"${PIP[@]}" install -q --upgrade pip setuptools wheel
# TensorFlow first: Horovod compiles against the TensorFlow in the venv. Everything of
# setup.cfg but the two packages built below goes in this one pip call.
mapfile -t first < <(reqs --without horovod --without mpi4py cpu install horovod-build "${EXTRAS[@]}")
[ ${#first[@]} -gt 0 ] || die "no requirements read from setup.cfg"
"${PIP[@]}" install -q "${first[@]}"
# mpi4py from source, so that it links against the same Open MPI as Horovod.
"$PY" -c "import mpi4py" 2>/dev/null || "${PIP[@]}" install -q --no-binary mpi4py "$(reqs --only mpi4py install)"

# --- 3. Horovod -----------------------------------------------------------------
hvd_ok() {
  "$VENV/bin/horovodrun" --check-build 2>/dev/null >"$1" || return 1
  grep -q '\[X\] TensorFlow' "$1" && grep -q '\[X\] MPI' "$1" && grep -q '\[X\] Gloo' "$1"
}
check_out=$(mktemp)
trap 'rm -f "$check_out"' EXIT
# The marker names the patch the installed Horovod was built with: a changed patch rebuilds it.
patch_sha=$(sha256sum "$PATCH" | cut -d' ' -f1)
if ! hvd_ok "$check_out" || [ "$(cat "$VENV/.horovod-patch-sha256" 2>/dev/null)" != "$patch_sha" ]; then
  tf_version=$("$PY" -c "import tensorflow as tf; print(tf.__version__)")
  key="tf$tf_version-$(sha256sum "$PATCH" | cut -c1-12)"
  cache_dir=${HOROVOD_WHEEL_CACHE:-$("$PY" -m pip cache dir)/hvd-keras-cnn/horovod-$HOROVOD_VERSION-$key}
  wheel=$(ls "$cache_dir"/horovod-"$HOROVOD_VERSION"-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$wheel" ]; then
    log "building Horovod $HOROVOD_VERSION against TensorFlow $tf_version (about 5 minutes on 2 cores)"
    work=$(mktemp -d)
    "${PIP[@]}" download -q --no-deps --no-binary :all: -d "$work" "horovod==$HOROVOD_VERSION"
    tar -xzf "$work/horovod-$HOROVOD_VERSION.tar.gz" -C "$work"
    patch -s -p1 -d "$work/horovod-$HOROVOD_VERSION" <"$PATCH" || die "the Horovod patch does not apply"
    mkdir -p "$cache_dir"
    HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
      HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
      MAKEFLAGS="-j$(nproc)" \
      "${PIP[@]}" wheel -q --no-deps --no-build-isolation -w "$cache_dir" "$work/horovod-$HOROVOD_VERSION" \
      >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; die "Horovod build failed (log: $work/build.log)"; }
    rm -rf "$work"
    wheel=$(ls "$cache_dir"/horovod-"$HOROVOD_VERSION"-*.whl | head -n1)
  else
    log "reusing cached Horovod wheel $(basename "$wheel")"
  fi
  "${PIP[@]}" install -q --force-reinstall --no-deps "$wheel"
  hvd_ok "$check_out" || { cat "$check_out" >&2; die "horovodrun --check-build does not list TensorFlow, MPI and Gloo"; }
  echo "$patch_sha" >"$VENV/.horovod-patch-sha256"
fi
log "horovodrun --check-build:"
sed -n '/Available Frameworks/,/Available Tensor Operations/p' "$check_out" | grep -E '\[X\]' | sed 's/^/    /'

# --- 4. this project ------------------------------------------------------------
# Horovod (and mpi4py) are there now, so pip only checks their pins.
"${PIP[@]}" install -q --no-build-isolation -e ".[cpu,horovod-build,$(IFS=,; echo "${EXTRAS[*]}")]"
echo "$want" >"$stamp"
log "done: activate with 'source .venv/bin/activate'"

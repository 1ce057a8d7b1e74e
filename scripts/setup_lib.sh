# The steps scripts/setup.sh (.venv, CPU) and scripts/setup_gpu.sh (.venv-gpu, CUDA) share.
# Sourced, not run: the caller sets -euo pipefail, cd's to the repository, and sets
#   LOG_PREFIX  the tag of its log lines (setup, setup-gpu),
#   VENV        the virtual environment to make,
#   PATCH_KINDS the Horovod patches to apply, in order (an array of cpu, gpu):
#               scripts/horovod-VERSION-tf2.21-KIND.patch, VERSION as setup.cfg pins it.
# Every step checks first and does nothing when already done.

log() { printf '[%s] %s\n' "$LOG_PREFIX" "$*"; }
die() { printf '[%s] error: %s\n' "$LOG_PREFIX" "$*" >&2; exit 1; }
# setup.cfg is the one list of Python dependencies; both scripts install from it in build order.
reqs() { "$PYTHON" scripts/requirements.py "$@"; }

# apt_install PACKAGE...: the Debian packages that are not installed yet.
apt_install() {
  local missing=() p sudo=""
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  log "installing apt packages: ${missing[*]}"
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# venv_create: sets PYTHON, HOROVOD_VERSION, PATCHES, PY and PIP, and creates $VENV if it is missing.
venv_create() {
  PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
  HOROVOD_VERSION=$(reqs --only horovod install | sed -n 's/^horovod==//p')
  [ -n "$HOROVOD_VERSION" ] || die "setup.cfg does not pin horovod==VERSION in install_requires"
  local kind
  PATCHES=()
  for kind in "${PATCH_KINDS[@]}"; do
    PATCHES+=("scripts/horovod-$HOROVOD_VERSION-tf2.21-$kind.patch")
    [ -f "${PATCHES[-1]}" ] || die "no Horovod patch for $HOROVOD_VERSION: ${PATCHES[-1]}"
  done
  PY=$VENV/bin/python
  if [ ! -x "$PY" ]; then
    log "creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
  fi
  PIP=("$PY" -m pip --disable-pip-version-check)
}

# stamp_current WANT: true (and the stamp touched) when $VENV was made from WANT and imports Horovod.
# WANT is a hash of what the environment is built from; a change re-runs pip.
stamp_current() {
  local stamp=$VENV/.setup-stamp
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$1" ] && "$PY" -c "import horovod.tensorflow" 2>/dev/null || return 1
  touch "$stamp"
}

# python_packages TF_EXTRA EXTRA...: setup.cfg's packages, TensorFlow from TF_EXTRA (cpu or gpu).
python_packages() {
  local tf_extra=$1 first
  shift
  "${PIP[@]}" install -q --upgrade pip setuptools wheel
  # TensorFlow first: Horovod compiles against the TensorFlow in the venv. Everything of
  # setup.cfg but the two packages built afterwards goes in this one pip call.
  mapfile -t first < <(reqs --without horovod --without mpi4py "$tf_extra" install horovod-build "$@")
  [ ${#first[@]} -gt 0 ] || die "no requirements read from setup.cfg"
  "${PIP[@]}" install -q "${first[@]}"
  # mpi4py from source, so that it links against the same Open MPI as Horovod.
  "$PY" -c "import mpi4py" 2>/dev/null || "${PIP[@]}" install -q --no-binary mpi4py "$(reqs --only mpi4py install)"
}

# horovod_install CACHE_DIR BUILD WHAT: installs the Horovod wheel cached in CACHE_DIR; when there is
# none, downloads the sdist, applies PATCHES and runs `BUILD SOURCE_DIR CACHE_DIR LOG` to build it
# there (WHAT says what is being built, for the log). The cache folder's name holds everything
# the wheel depends on, so a fresh clone on the same machine installs it without compiling.
horovod_install() {
  local cache_dir=$1 build=$2 what=$3 wheel work p
  wheel=$(ls "$cache_dir"/horovod-"$HOROVOD_VERSION"-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$wheel" ]; then
    log "building Horovod $HOROVOD_VERSION $what"
    work=$(mktemp -d)
    "${PIP[@]}" download -q --no-deps --no-binary :all: -d "$work" "horovod==$HOROVOD_VERSION"
    tar -xzf "$work/horovod-$HOROVOD_VERSION.tar.gz" -C "$work"
    for p in "${PATCHES[@]}"; do
      patch -s -p1 -d "$work/horovod-$HOROVOD_VERSION" <"$p" || die "the Horovod patch does not apply: $p"
    done
    mkdir -p "$cache_dir"
    "$build" "$work/horovod-$HOROVOD_VERSION" "$cache_dir" "$work/build.log" || {
      cp "$work/build.log" "$VENV/horovod-build.log"
      tail -n 40 "$work/build.log" >&2
      rm -rf "$work"
      die "Horovod build failed (log: $VENV/horovod-build.log)"
    }
    rm -rf "$work"
    wheel=$(ls "$cache_dir"/horovod-"$HOROVOD_VERSION"-*.whl | head -n1)
  else
    log "reusing cached Horovod wheel $(basename "$wheel") ($(basename "$cache_dir"))"
  fi
  "${PIP[@]}" install -q --force-reinstall --no-deps "$wheel"
}

# horovod_cache_dir KEY: where the wheel of that build key is kept (HOROVOD_WHEEL_CACHE overrides).
horovod_cache_dir() {
  echo "${HOROVOD_WHEEL_CACHE:-$("$PY" -m pip cache dir)/hvd-keras-cnn/horovod-$HOROVOD_VERSION-$1}"
}

# project_install EXTRAS WANT: this project, editable, with EXTRAS (comma-separated); then the stamp.
project_install() {
  # Horovod (and mpi4py) are there now, so pip only checks their pins.
  "${PIP[@]}" install -q --no-build-isolation -e ".[$1]"
  echo "$2" >"$VENV/.setup-stamp"
}

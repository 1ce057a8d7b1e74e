#!/usr/bin/env bash
# Makes docs/tensorboard-scalars.png, the picture in README.md: a short digits
# run into a temporary folder, TensorBoard over it on loopback, and a
# screenshot of its Scalars page by headless Chromium.
#
#   scripts/tensorboard_screenshot.sh [OUT.png [RUN_DIR]]
#
# With RUN_DIR (a finished run), its events are shown and nothing is trained.
# Needs Chromium (Debian: apt-get install -y chromium); the tests do not.
set -euo pipefail

cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-docs/tensorboard-scalars.png}")
run=${2:-}
py=${PYTHON:-.venv/bin/python}
browser=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
[ -n "$browser" ] || { echo "tensorboard_screenshot: chromium not found (apt-get install -y chromium)" >&2; exit 2; }

work=$(mktemp -d)
tb=""
cleanup() {
    if [ -n "$tb" ]; then kill "$tb" 2>/dev/null || true; wait "$tb" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

if [ -z "$run" ]; then
    run=$work/run
    "$py" scripts/run_digits.py --set "run_dir=$run" --set train.epochs=12 --set train.export=false \
        --set tensorboard.step_frequency=5
fi
py=$(realpath -s "$py")

port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# From the run's folder, so that the page shows a relative path, not this machine's.
(cd "$run" && exec "$py" -m tensorboard.main --logdir tensorboard --host 127.0.0.1 --port "$port") 2>"$work/tensorboard.log" &
tb=$!

# TensorBoard reads the event files in the background: wait until it serves them.
"$py" - "$port" <<'EOF'
import json, sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/data/plugin/scalars/tags"
for _ in range(1200):  # minutes on a busy machine: it imports TensorFlow first
    try:
        tags = json.load(urllib.request.urlopen(url, timeout=5))
        if "loss" in tags.get("train", {}) and "accuracy" in tags.get("validation", {}):
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.5)
sys.exit("tensorboard_screenshot: TensorBoard did not serve the run's scalars")
EOF

mkdir -p "$(dirname "$out")"
# The virtual time budget lets the frontend load and draw its charts before the shot.
tags='^(loss|accuracy|learning_rate|images_per_sec|step/loss|rank_timing/straggler_ratio)$'
filter=$("$py" -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$tags")
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,1120 \
    --virtual-time-budget=30000 --screenshot="$out" \
    "http://127.0.0.1:$port/#scalars&_smoothingWeight=0&tagFilter=$filter" 2>"$work/chromium.log"
echo "wrote $out"

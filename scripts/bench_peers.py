"""The trainer against its peers on ResNet-50, and Keras 3's own cost (`make bench`'s `peers` and `keras_cost`).

peers: keras.applications ResNet-50 (weights=None), 224x224, 1000 classes,
16 images per rank, 2 ranks, SGD, one fixed synthetic batch, one intra-op and one
inter-op thread per rank, three ways, alternated in every repetition:
  - horovod: Horovod's synthetic-benchmark method on tf-keras (scripts/peer_horovod.py);
  - mwms: tf.distribute.MultiWorkerMirroredStrategy, tf-keras model.fit (scripts/peer_mwms.py);
  - trainer: python -m launch --np 2 --config configs/bench_resnet50.yaml.
Each run warms up for `steps` steps and times the next 2 x `steps` (the trainer:
3 epochs of `steps`, the first left out). Ratios trainer/peer per repetition.

keras_cost: single-process `fit` of the same model, batch 16, one thread
(scripts/bench_keras_cost.py): Keras 3 as keras.applications builds it, Keras 3
with trainer.batchnorm's fused BatchNormalization (what the trainer runs), and
tf-keras, alternated in every repetition.

tf-keras (Keras 2) runs only in the peers' processes: it is installed with
`pip install --target` into its own folder in pip's cache (once; keyed by the
TensorFlow version) and put on PYTHONPATH with TF_USE_LEGACY_KERAS=1 for those
runs only, so the project's environment stays Keras 3.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from importlib import metadata

from bench_common import ROOT, machine, stats, timestamp

PY = sys.executable
BATCH = 16  # images per rank
NP = 2
TIMEOUT = 3600  # seconds; a hung collective ends the run instead of the benchmark
# Where each peer differs from the trainer at default settings (docs/benchmarks.md).
DIFFERENCES = {
    "horovod": [
        "Keras 2 (tf-keras 2.21, TF_USE_LEGACY_KERAS=1) instead of Keras 3; BatchNorm is tf-keras's fused kernel",
        "plain SGD(0.01) without momentum; the trainer: SGD with Nesterov momentum 0.9, scaled learning rate",
        "a hand-written tf.function step, no fit loop, no callbacks, no metrics, no checkpoints",
        "inputs fed as a constant tensor, no tf.data; the trainer: one synthetic batch repeated through tf.data",
        "no input rescaling layer; the trainer rescales [0, 1] inputs for keras.applications' caffe-style ResNet",
        "Horovod's default cycle time and fusion threshold; Gloo controller, as the trainer",
    ],
    "mwms": [
        "Keras 2 (tf-keras 2.21, TF_USE_LEGACY_KERAS=1) instead of Keras 3; BatchNorm is tf-keras's fused kernel",
        "plain SGD(0.01) without momentum; the trainer: SGD with Nesterov momentum 0.9, scaled learning rate",
        "TensorFlow's collective ops (ring all-reduce over gRPC) instead of Horovod over Gloo",
        "no callbacks beyond a step clock, no accuracy metric, no checkpoints",
        "no input rescaling layer",
    ],
}


def tf_keras_path() -> str:
    """A folder holding tf-keras for this TensorFlow, installed there on first use."""
    # The distribution may be tensorflow or tensorflow-cpu: ask the module.
    tf_version = subprocess.run([PY, "-c", "import tensorflow as tf; print(tf.__version__)"], env=_env(),
                                capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    series = ".".join(tf_version.split(".")[:2])
    cache = os.environ.get("TF_KERAS_DIR") or os.path.join(
        subprocess.run([PY, "-m", "pip", "cache", "dir"], capture_output=True, text=True, check=True).stdout.strip(),
        "hvd-keras-cnn", f"tf-keras-{series}")
    if os.path.isdir(os.path.join(cache, "tf_keras")):
        return cache
    print(f"installing tf-keras~={series}.0 into {cache} (for the peers only)", flush=True)
    staging = tempfile.mkdtemp(prefix="tf-keras-", dir=os.path.dirname(cache) if os.path.isdir(
        os.path.dirname(cache)) else None)
    subprocess.run([PY, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    "--target", staging, f"tf-keras~={series}.0"], check=True)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    shutil.rmtree(cache, ignore_errors=True)
    shutil.move(staging, cache)  # in place only when complete: an interrupted install is redone
    return cache


def _env(tf_keras: str | None = None) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    if tf_keras:
        env["TF_USE_LEGACY_KERAS"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (tf_keras, ROOT, env.get("PYTHONPATH")) if p)
    return env


def _json_line(out: str, what: str) -> dict:
    """The last line holding a JSON object (horovodrun prefixes each rank's lines with its rank)."""
    for line in reversed(out.splitlines()):
        if "images_per_sec" in line:
            return json.loads(line[line.index("{"):])
    raise RuntimeError(f"{what} printed no result: {out[-2000:]}")


def _run(argv: list[str], env: dict, what: str) -> dict:
    res = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if res.returncode:
        raise RuntimeError(f"{what} failed ({res.returncode}): {res.stderr[-2000:]}")
    return _json_line(res.stdout, what)


def horovod_rate(tf_keras: str, steps: int) -> float:
    horovodrun = os.path.join(os.path.dirname(PY), "horovodrun")
    argv = [horovodrun if os.path.exists(horovodrun) else "horovodrun", "-np", str(NP), "-H", f"localhost:{NP}",
            "--gloo", PY, "scripts/peer_horovod.py", "--batch", str(BATCH), "--warmup", str(steps),
            "--steps", str(2 * steps)]
    return _run(argv, _env(tf_keras), "Horovod peer")["images_per_sec"]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def mwms_rate(tf_keras: str, steps: int) -> float:
    workers = [f"localhost:{p}" for p in _free_ports(NP)]
    procs = []
    for index in range(NP):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        procs.append(subprocess.Popen(
            [PY, "scripts/peer_mwms.py", "--batch", str(BATCH), "--warmup", str(steps), "--steps", str(2 * steps)],
            cwd=ROOT, env={**_env(tf_keras), "TF_CONFIG": json.dumps(tf_config)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        if p.returncode:
            raise RuntimeError(f"MultiWorkerMirroredStrategy peer failed ({p.returncode}): {err[-2000:]}")
    return _json_line(outs[0][0], "MultiWorkerMirroredStrategy peer")["images_per_sec"]


def trainer_rate(steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run(
            [PY, "-m", "launch", "--np", str(NP), "--config", "configs/bench_resnet50.yaml",
             "--set", f"run_dir={tmp}/run", "--set", f"data.global_batch_size={BATCH * NP}",
             "--set", f"train.steps_per_epoch={steps}", "--set", "train.epochs=3",
             # Outside the timed epochs, but at `auto` it recomputes the BatchNorm statistics over 4,096
             # images after every epoch of so short a run: minutes per run that time nothing.
             "--set", "train.precise_bn=false"],
            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT,
        )
        if res.returncode:
            raise RuntimeError(f"trainer np={NP} failed: {res.stderr[-2000:]}")
        with open(os.path.join(tmp, "run", "summary.json"), encoding="utf-8") as f:
            return json.load(f)["images_per_sec"]


def peers(repeats: int, steps: int) -> dict:
    tf_keras = tf_keras_path()
    runs = {"trainer": [], "horovod": [], "mwms": []}
    for rep in range(repeats):
        runs["horovod"].append(horovod_rate(tf_keras, steps))
        runs["mwms"].append(mwms_rate(tf_keras, steps))
        runs["trainer"].append(trainer_rate(steps))
        print(f"peers {rep + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in runs.items())
              + " images/s", flush=True)
    ratios = {f"trainer_vs_{peer}": stats([t / p for t, p in zip(runs["trainer"], runs[peer])])
              for peer in ("horovod", "mwms")}
    for name, r in ratios.items():
        print(f"{name}: median {r['median']:.3f} (min {r['min']:.3f}, max {r['max']:.3f}), target >= 1.0", flush=True)
    return {"model": "keras.applications.ResNet50(weights=None), 224x224, 1000 classes", "ranks": NP,
            "per_replica_batch_size": BATCH, "warmup_steps": steps, "timed_steps": 2 * steps, "repeats": repeats,
            "images_per_sec": {k: stats(v) for k, v in runs.items()}, **ratios, "target": 1.0,
            "peer_differences": DIFFERENCES, "machine": machine(), "date": timestamp()}


def keras_cost(repeats: int, steps: int) -> dict:
    tf_keras = tf_keras_path()
    impls = ("keras3", "keras3-fused", "tf-keras")
    runs = {impl: [] for impl in impls}
    for rep in range(repeats):
        for impl in impls:
            argv = [PY, "scripts/bench_keras_cost.py", "--impl", impl, "--warmup", "3", "--steps", str(steps)]
            env = _env(tf_keras if impl == "tf-keras" else None)
            runs[impl].append(_run(argv, env, f"bench_keras_cost --impl {impl}"))
        print(f"keras cost {rep + 1}/{repeats}: " + ", ".join(
            f"{k} {v[-1]['images_per_sec']:.2f} ({v[-1]['images_per_cpu_sec']:.2f} per CPU s)" for k, v in runs.items())
            + " images/s", flush=True)
    result = {"model": "ResNet50(weights=None), 224x224, 1000 classes", "batch": BATCH, "threads": 1,
              "timed_steps": steps, "repeats": repeats, "keras": metadata.version("keras"),
              "machine": machine(), "date": timestamp()}
    for key in ("images_per_sec", "images_per_cpu_sec"):
        rates = {impl: [r[key] for r in runs[impl]] for impl in impls}
        result[key] = {impl: stats(v) for impl, v in rates.items()}
        for a, b in (("keras3", "tf-keras"), ("keras3-fused", "tf-keras"), ("keras3-fused", "keras3")):
            ratio = f"{a}_vs_{b}".replace("-", "_") + ("" if key == "images_per_sec" else "_cpu")
            result[ratio] = stats([x / y for x, y in zip(rates[a], rates[b])])
    return result

"""Helpers the tests share: the repository root, running a command or a worker script from it, a free port,
a small filesystem, checkpoint folders, the evaluation path's per-image answers, against which the serving
tests compare the export, and a small image folder of shapes.

Kept apart from conftest.py, which pytest loads by itself and which holds only
fixtures: a test module imports these names explicitly (`from helpers import run`).
"""

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(argv, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    """Runs a command from the repository root and captures its output as text."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2", **kwargs.pop("env", {})}
    return subprocess.run(
        [str(a) for a in argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kwargs
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` now (a server started next may take it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# A checkpoint folder's name ends with its global step: `ckpt-<save number>-step-<step>`, or an
# older version's `step-<step>` (`-2`, `-3` when taken).
CHECKPOINT_STEP = re.compile(r"(?:^|-)step-(\d{9,})(?:-\d+)?$")


def checkpoint_step(path) -> int | None:
    """The global step in a checkpoint folder's name; None for anything else (best.json, a `*.tmp-*` save)."""
    m = CHECKPOINT_STEP.search(Path(path).name)
    return int(m.group(1)) if m else None


def checkpoint_steps(run_dir) -> list[int]:
    """The global steps of RUN_DIR's checkpoints, in ascending order."""
    folder = Path(run_dir) / "checkpoints"
    return sorted(s for s in map(checkpoint_step, folder.iterdir() if folder.is_dir() else []) if s is not None)


def checkpoint_dir(run_dir, step: int) -> Path:
    """The one checkpoint folder of RUN_DIR at global step `step`."""
    (found,) = [p for p in (Path(run_dir) / "checkpoints").iterdir() if checkpoint_step(p) == step]
    return found


def evaluation_predictions(run_dir, checkpoint: str = "latest", batch_size: int = 50):
    """(probabilities [N, classes], labels [N], encoded images [N]) of a run's validation records, in file order.

    The evaluation path, image by image: the run's model restored from
    `checkpoint` as trainer.evaluate restores it (the averaged weights with
    train.ema, as trainer.ema.EvaluatedWeights puts them in), applied to the validation
    stream (data_pipeline.reader.eval_stream with the run's crop) in this one
    process, in a graph as trainer.evaluation runs it (under the default
    precision, mixed_bfloat16 on a bfloat16 CPU, eager ops round apart from
    the graph's fused ones by up to 2e-3). The encoded images are the
    records' own bytes.
    """
    import numpy as np
    import tensorflow as tf

    from data_pipeline.metadata import load_metadata, shard_files
    from data_pipeline.reader import eval_stream
    from data_pipeline.records import parse_example
    from data_pipeline.stream_options import EvalOptions
    from trainer.assembly import build_compiled_model
    from trainer.checkpoint import CheckpointManager
    from trainer.config import load_config
    from trainer.data_spec import model_signature, resolve_data
    from trainer.ema import EvaluatedWeights
    from trainer.schedule import make_schedule

    cfg = load_config(str(Path(run_dir) / "config.yaml"))
    spec = resolve_data(cfg)
    model = build_compiled_model(cfg, spec, make_schedule(cfg.train, cfg.data.global_batch_size, 1,
                                                          spec.steps_per_epoch))
    manager = CheckpointManager(str(Path(run_dir) / "checkpoints"))
    manager.restore(model, manager.resolve(checkpoint), model_signature(cfg, spec))
    EvaluatedWeights(model, cfg.train.ema_evaluate).swap_in()
    files = shard_files(cfg.data.dir, load_metadata(cfg.data.dir), "validation")
    size, _, channels = spec.input_shape
    options = EvalOptions(per_replica_batch_size=batch_size, image_size=size, channels=channels,
                          crop_fraction=cfg.data.crop_fraction)
    predict = tf.function(lambda x: tf.cast(model(x, training=False), tf.float32), reduce_retracing=True)
    probabilities, labels = [], []
    for x, y in eval_stream(files, options):
        probabilities.append(predict(x).numpy())
        labels.append(y.numpy())
    encoded = [parse_example(r)["image/encoded"].numpy() for r in tf.data.TFRecordDataset(files)]
    return np.concatenate(probabilities), np.concatenate(labels), encoded


@contextlib.contextmanager
def small_filesystem(path: Path, size: str):
    """A tmpfs of `size` (e.g. "3m") mounted at `path` for the block, always unmounted after (needs root)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def resize_filesystem(path: Path, size: str) -> None:
    """Frees space on a small_filesystem: its size becomes `size`, its files stay."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


SHAPES = ("circle", "square", "triangle")


def write_shapes(folder: Path, per_class: int = 40, size: int = 64, seed: int = 0) -> Path:
    """A small image folder of three classes of shapes (PNG), each at a random place, size and colour.

    The quick start's case of a small data set of one's own: with the
    quick start's global batch of 64, one training step per epoch.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for label, shape in enumerate(SHAPES):
        (folder / shape).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(150, 256, 3)))
            draw = ImageDraw.Draw(image)
            r = int(rng.integers(size // 8, size // 3))
            cx, cy = (int(c) for c in rng.integers(r, size - r, 2))
            colour = tuple(int(c) for c in rng.integers(0, 110, 3))
            if label == 0:
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
            elif label == 1:
                draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
            image.save(folder / shape / f"{i:03d}.png")
    return folder


def worker_reports(tmp_path, script: str, *args, ranks: int = 2) -> list[dict]:
    """Runs `script` under horovodrun -np `ranks` (or as one plain process for 1); its REPORT lines, by rank."""
    path = tmp_path / "worker.py"
    path.write_text(script)
    argv = [sys.executable, str(path), *args]
    if ranks > 1:
        from launch.command import LaunchOptions, build_command

        opts = LaunchOptions(np=ranks, config="unused.yaml", python=sys.executable,
                             horovodrun=os.path.join(os.path.dirname(sys.executable), "horovodrun"))
        command, env = build_command(opts, dict(os.environ))
        argv = command[: command.index(sys.executable)] + argv
    else:
        env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    res = run(argv, env=env, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    reports = [json.loads(line.split("REPORT ", 1)[1]) for line in res.stdout.splitlines() if "REPORT " in line]
    assert len(reports) == ranks, res.stdout[-3000:]
    return sorted(reports, key=lambda r: r["rank"])

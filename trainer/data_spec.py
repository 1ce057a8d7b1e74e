"""What the model and the loop need to know about the data, from the config and metadata.json. TensorFlow-free.

The workers build their model and streams from `resolve_data`; the checks
that run before TensorFlow loads (the launcher, `launch slurm`,
trainer.train, trainer.evaluate) call the same function, so a config that
does not fit its data, or a checkpoint of another model, is refused before
any worker starts with the line a worker would print.
"""

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass

from data_pipeline import metadata as md
from trainer.checkpoint import CHECKPOINT_DIR, CheckpointManager, check_model
from trainer.config import ConfigError, ExperimentConfig, effective_batch_size
from trainer.model_check import ERROR_PREFIX, SIZE_PREFIX
from trainer.model_names import smallest_image_size


@dataclass(frozen=True)
class DataSpec:
    """What the model and the loop need to know about the data."""

    input_shape: tuple[int, int, int]
    num_classes: int
    steps_per_epoch: int
    train_files: list[str]
    val_files: list[str]
    num_train: int = 0
    num_val: int = 0
    train_shard_counts: tuple[int, ...] = ()
    label_offset: int = 0  # subtracted from every stored label by the reader (metadata.json; adopted shards)


def resolve_data(cfg: ExperimentConfig) -> DataSpec:
    """Fills the model's input shape, class count and steps per epoch from config and metadata."""
    m, t = cfg.model, cfg.train
    if cfg.data.synthetic:
        spec = DataSpec((m.image_size, m.image_size, m.channels), m.num_classes, t.steps_per_epoch, [], [])
    else:
        spec = _from_metadata(cfg)
    smallest = smallest_image_size(m.name)
    if not m.builder and spec.input_shape[0] < smallest:
        raise ConfigError(f"model.image_size={spec.input_shape[0]}: model {m.name} needs images of at least "
                          f"{smallest} pixels (set model.image_size; the images are resized to it)")
    if t.best_metric == "val_top5_accuracy" and spec.num_classes <= 5:
        raise ConfigError(f"train.best_metric='val_top5_accuracy': the data has {spec.num_classes} classes")
    return spec


def _from_metadata(cfg: ExperimentConfig) -> DataSpec:
    m, t = cfg.model, cfg.train
    # A broken metadata.json or a missing shard is the data's fault, not the config's:
    # md.DataError passes through and is reported as `data error:`, naming the file.
    meta = md.load_metadata(cfg.data.dir)
    shape = meta.get("image_shape")
    image_size = m.image_size or (shape[0] if shape and shape[0] == shape[1] else 0)
    if not image_size:
        raise ConfigError(
            f"model.image_size=0: the images in {cfg.data.dir!r} differ in size or are not square; set it")
    channels = m.channels or int(meta["channels"])
    num_classes = m.num_classes or len(meta["class_names"])
    if num_classes < len(meta["class_names"]):
        raise ConfigError(f"model.num_classes={num_classes}: the data has {len(meta['class_names'])} classes")
    n_train = md.num_examples(meta, "train")
    # One step is one optimizer update: accumulation_steps batches of global_batch_size.
    steps = t.steps_per_epoch or n_train // effective_batch_size(cfg)
    if steps < 1:
        raise ConfigError(
            f"data.global_batch_size={cfg.data.global_batch_size}: times train.accumulation_steps="
            f"{t.accumulation_steps}, larger than the {n_train} training examples"
        )
    return DataSpec(
        (image_size, image_size, channels), num_classes, steps,
        md.shard_files(cfg.data.dir, meta, "train"), md.shard_files(cfg.data.dir, meta, "validation"),
        n_train, md.num_examples(meta, "validation"),
        tuple(int(x["num_examples"]) for x in meta["splits"]["train"]["shards"]), md.label_offset(meta),
    )


def model_signature(cfg: ExperimentConfig, spec: DataSpec) -> dict:
    """What a checkpoint must match to be restored into this run's model."""
    name = cfg.model.builder or cfg.model.name
    return {"name": name, "input_shape": list(spec.input_shape), "num_classes": spec.num_classes}


def _checkpoints(cfg: ExperimentConfig) -> CheckpointManager:
    """The run's checkpoints, for reading only (the trainer's own manager comes from trainer.outputs)."""
    return CheckpointManager(os.path.join(cfg.run_dir, CHECKPOINT_DIR))


def check_start(cfg: ExperimentConfig) -> DataSpec:
    """The data spec of a training start; CheckpointError when the checkpoint it would resume from is of another model.

    Raises what a worker raises at the same point: ConfigError, DataError (metadata.json) or CheckpointError.
    """
    spec = resolve_data(cfg)
    if cfg.train.resume:
        manager = _checkpoints(cfg)
        path = manager.latest()
        if path is not None:
            check_model(path, manager.read_state(path), model_signature(cfg, spec))
    return spec


def check_evaluation(cfg: ExperimentConfig, which: str) -> DataSpec:
    """The same for trainer.evaluate and its checkpoint `which` (latest, best or a folder), which must exist."""
    spec = resolve_data(cfg)
    manager = _checkpoints(cfg)
    path = manager.resolve(which)
    check_model(path, manager.read_state(path), model_signature(cfg, spec))
    return spec


def check_model_build(cfg: ExperimentConfig, spec: DataSpec) -> None:
    """The model built once in a child process (trainer.model_check), when building it is the only check.

    For the launchers, before any worker starts, when model.builder,
    model.initial_weights or model.freeze_until is set: ConfigError with the
    child's line when the builder fails to import, raises or returns other
    shapes, the weights file matches nothing, or the model has no such layer.
    """
    m = cfg.model
    if m.builder or m.initial_weights or m.freeze_until:
        _model_child(cfg, spec, count=False)


def model_size(cfg: ExperimentConfig, spec: DataSpec) -> dict:
    """What every step allreduces, counted on the model built in a child process on the CPU (trainer.model_check).

    {trainable_params, trainable_bytes, trainable_tensors, state_params,
    state_bytes, state_tensors}; ConfigError as check_model_build's.
    """
    out = _model_child(cfg, spec, count=True)
    lines = [line[len(SIZE_PREFIX):] for line in out.splitlines() if line.startswith(SIZE_PREFIX)]
    if not lines:
        raise ConfigError(f"model: counting its variables printed no {SIZE_PREFIX.strip()!r} line")
    return json.loads(lines[-1])


def _model_child(cfg: ExperimentConfig, spec: DataSpec, count: bool) -> str:
    """Runs trainer.model_check on the config's model (its stdout), or raises ConfigError with its line."""
    args = {"model": dataclasses.asdict(cfg.model), "input_shape": list(spec.input_shape),
            "num_classes": spec.num_classes, "count": count}
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
    # The builder's module is found as the workers find it: from the folder the job starts in.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH", "")) if p)
    res = subprocess.run([sys.executable, "-m", "trainer.model_check", json.dumps(args)],
                         capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        lines = [line[len(ERROR_PREFIX):] for line in res.stderr.splitlines() if line.startswith(ERROR_PREFIX)]
        raise ConfigError(lines[-1] if lines else f"model: building it to check it exited with {res.returncode}: "
                          + " / ".join(res.stderr.strip().splitlines()[-3:]))
    return res.stdout

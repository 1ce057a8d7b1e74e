"""The value checks of an experiment config (trainer.config), each failing with one ConfigError line.

(check_environment fails with a DataError for a data folder without its files.)

    validate(cfg)                      # static checks of the values alone
    check_environment(cfg)             # the data folder and its files, on this machine
    check_run_dir(cfg.run_dir)         # a run folder this machine can create and write
    validate_world(cfg, world_size)    # checks that depend on the number of ranks

The functions take an ExperimentConfig (or, for best_mode, its TrainConfig)
but do not import trainer.config, which re-exports them: one direction of
import, no circle. Like trainer.config, this module needs no TensorFlow.
"""

import glob
import json
import os
import re

from data_pipeline.metadata import DataError
from trainer.model_names import BUILT_IN, MODEL_NAMES, close_names

OPTIMIZERS = ("adam", "sgd")
LR_DECAYS = ("cosine", "constant")
BEST_METRICS = ("val_accuracy", "val_loss", "val_top5_accuracy")
BEST_MODES = ("auto", "max", "min")
BUILDER_OUTPUTS = ("auto", "probabilities", "logits")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
WEIGHT_DECAY_EXCLUDES = ("batchnorm", "bias")
MAX_THREADS = 1024


class ConfigError(ValueError):
    """A configuration value that cannot be used; str(e) is a one-line message."""


def _check(ok: bool, key: str, value, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


def profile_range(text: str) -> tuple[int, int] | None:
    """`tensorboard.profile_steps` as (first, last) global steps, or None when empty."""
    if not text.strip():
        return None
    parts = text.split(",")
    try:
        first, last = (int(x) for x in parts)
    except ValueError:
        first = last = 0
    _check(1 <= first <= last, "tensorboard.profile_steps", text, "must be 'first,last' steps with 1 <= first <= last")
    return first, last


def validate(cfg) -> None:
    """Static checks of the values alone: no file system, no world size."""
    _check(bool(cfg.run_dir), "run_dir", cfg.run_dir, "must be set")
    _validate_data(cfg.data)
    _validate_model(cfg.model)
    _validate_train(cfg.train)
    _validate_runtime(cfg.runtime, cfg.tensorboard)
    d, m, t = cfg.data, cfg.model, cfg.train
    peak = t.base_learning_rate * d.global_batch_size * t.accumulation_steps / t.reference_batch_size
    _check(peak * t.weight_decay < 1, "train.weight_decay", t.weight_decay,
           f"times the peak learning rate {peak:g} must be < 1: each step multiplies the weights by 1 - their product")
    if d.synthetic:
        for key in ("image_size", "channels", "num_classes"):
            _check(getattr(m, key) > 0, f"model.{key}", getattr(m, key), "must be set (> 0) with data.synthetic")
        _check(t.steps_per_epoch > 0, "train.steps_per_epoch", t.steps_per_epoch,
               "must be set (> 0) with data.synthetic")
        return
    _check(bool(d.dir), "data.dir", d.dir, "must be set (or data.synthetic: true)")


def _validate_data(d) -> None:
    _check(d.global_batch_size > 0, "data.global_batch_size", d.global_batch_size, "must be > 0")
    _check(d.shuffle_buffer > 0, "data.shuffle_buffer", d.shuffle_buffer, "must be > 0")
    a = d.augment
    _check(0 < a.crop_area_min <= 1, "data.augment.crop_area_min", a.crop_area_min, "must be in (0, 1]")
    _check(a.randaugment_layers >= 0, "data.augment.randaugment_layers", a.randaugment_layers, "must be >= 0")
    _check(0 <= a.randaugment_magnitude <= 1, "data.augment.randaugment_magnitude", a.randaugment_magnitude,
           "must be in [0, 1]")
    _check(a.mixup_alpha >= 0, "data.augment.mixup_alpha", a.mixup_alpha, "must be >= 0 (0: off)")
    # Keras's CutMix takes at most 1 (its factor's bounds).
    _check(0 <= a.cutmix_alpha <= 1, "data.augment.cutmix_alpha", a.cutmix_alpha, "must be in [0, 1] (0: off)")
    _check(0 < d.crop_fraction <= 1, "data.crop_fraction", d.crop_fraction, "must be in (0, 1]")


def _validate_model(m) -> None:
    if m.builder:
        _check(bool(re.fullmatch(r"[\w.]+:\w+", m.builder)), "model.builder", m.builder,
               "must be package.module:function")
    elif m.name not in MODEL_NAMES:
        near = close_names(m.name)
        _check(False, "model.name", m.name, f"is not a built-in model ({', '.join(BUILT_IN)}) or a keras.applications "
               "name" + (f"; did you mean {' or '.join(near)}?" if near else " (docs/models.md lists them)"))
    _check(m.builder_output in BUILDER_OUTPUTS, "model.builder_output", m.builder_output,
           f"must be one of {', '.join(BUILDER_OUTPUTS)}")
    _check(m.unfreeze_epoch >= 0, "model.unfreeze_epoch", m.unfreeze_epoch, "must be >= 0")
    _check(bool(m.freeze_until) or not m.unfreeze_epoch, "model.unfreeze_epoch", m.unfreeze_epoch,
           "needs model.freeze_until")
    for key in ("image_size", "channels", "num_classes"):
        _check(getattr(m, key) >= 0, f"model.{key}", getattr(m, key), "must be >= 0")
    _check(m.channels in (0, 1, 3), "model.channels", m.channels, "must be 1, 3 or 0 (from the data)")


def _validate_train(t) -> None:
    _check(t.epochs > 0, "train.epochs", t.epochs, "must be > 0")
    _check(t.base_learning_rate > 0, "train.base_learning_rate", t.base_learning_rate, "must be > 0")
    _check(t.reference_batch_size > 0, "train.reference_batch_size", t.reference_batch_size, "must be > 0")
    _check(t.warmup_epochs >= 0, "train.warmup_epochs", t.warmup_epochs, "must be >= 0")
    _check(t.lr_decay in LR_DECAYS, "train.lr_decay", t.lr_decay, f"must be one of {', '.join(LR_DECAYS)}")
    _check(t.optimizer in OPTIMIZERS, "train.optimizer", t.optimizer, f"must be one of {', '.join(OPTIMIZERS)}")
    _check(0 <= t.momentum < 1, "train.momentum", t.momentum, "must be in [0, 1)")
    _check(0 <= t.weight_decay < 1, "train.weight_decay", t.weight_decay, "must be in [0, 1)")
    _check(set(weight_decay_exclusions(t.weight_decay_exclude)) <= set(WEIGHT_DECAY_EXCLUDES),
           "train.weight_decay_exclude", t.weight_decay_exclude,
           f"must be empty or a comma-separated list of {', '.join(WEIGHT_DECAY_EXCLUDES)}")
    # 1: the average would never leave the initial weights.
    _check(0 <= t.ema < 1, "train.ema", t.ema, "must be in [0, 1) (0: off)")
    _check(0 <= t.label_smoothing < 1, "train.label_smoothing", t.label_smoothing, "must be in [0, 1)")
    _check(t.steps_per_epoch >= 0, "train.steps_per_epoch", t.steps_per_epoch, "must be >= 0")
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", t.keep_checkpoints, "must be >= 1")
    _check(t.export_top_k >= 1, "train.export_top_k", t.export_top_k, "must be >= 1")
    _check(t.validate_every_epochs >= 0, "train.validate_every_epochs", t.validate_every_epochs, "must be >= 0")
    _check(t.best_metric in ("", *BEST_METRICS), "train.best_metric", t.best_metric,
           f"must be one of {', '.join(BEST_METRICS)} or empty")
    _check(t.best_mode in BEST_MODES, "train.best_mode", t.best_mode, f"must be one of {', '.join(BEST_MODES)}")
    _check(t.elastic_commit_steps >= 0, "train.elastic_commit_steps", t.elastic_commit_steps, "must be >= 0")
    _check(t.precision in PRECISIONS, "train.precision", t.precision, f"must be one of {', '.join(PRECISIONS)}")
    _check(t.initial_loss_scale >= 1, "train.initial_loss_scale", t.initial_loss_scale, "must be >= 1")
    _check(t.jit_compile.lower() in ("auto", "true", "false"), "train.jit_compile", t.jit_compile,
           "must be auto, true or false")
    _check(t.accumulation_steps >= 1, "train.accumulation_steps", t.accumulation_steps, "must be >= 1")
    _check(t.precise_bn.lower() in ("auto", "true", "false"), "train.precise_bn", t.precise_bn,
           "must be auto, true or false")
    _check(t.precise_bn_examples >= 1, "train.precise_bn_examples", t.precise_bn_examples, "must be >= 1")
    # Keras seeds rank r with train.seed + r, and takes 0 .. 2**32 - 1 only (-5 was a ValueError traceback).
    _check(0 <= t.seed < 2**31, "train.seed", t.seed, "must be in 0..2147483647")


def _validate_runtime(r, tb) -> None:
    _check(r.fault_stop_after_step >= 0, "runtime.fault_stop_after_step", r.fault_stop_after_step, "must be >= 0")
    _check(r.fault_slow_save_sec >= 0, "runtime.fault_slow_save_sec", r.fault_slow_save_sec, "must be >= 0")
    for key in ("intra_op_threads", "inter_op_threads"):
        # TensorFlow takes an int32 and starts that many threads; 100000000000 was a ValueError traceback.
        _check(0 <= getattr(r, key) <= MAX_THREADS, f"runtime.{key}", getattr(r, key), f"must be in 0..{MAX_THREADS}")
    _check(r.bind_cores in ("auto", "none"), "runtime.bind_cores", r.bind_cores, "must be auto or none")
    _check(tb.step_frequency >= 0, "tensorboard.step_frequency", tb.step_frequency, "must be >= 0")
    _check(tb.sample_images >= 0, "tensorboard.sample_images", tb.sample_images, "must be >= 0")
    profile_range(tb.profile_steps)


def check_environment(cfg) -> None:
    """Checks against this machine's file system: the shard folder and its files.

    Separate from validate() so that a job can be checked and submitted from a
    host that does not see the data (`launch slurm --no-data-check`). A folder
    that does not exist is the config's fault (ConfigError); a folder without
    metadata.json or shards is the data's (DataError, reported as `data error:`).
    """
    d = cfg.data
    if d.synthetic:
        return
    _check(os.path.isdir(d.dir), "data.dir", d.dir, "folder does not exist")
    if not os.path.isfile(os.path.join(d.dir, "metadata.json")):
        raise DataError(
            f"data.dir={d.dir!r}: has no metadata.json (build it with python -m data_pipeline.build_shards)")
    if not _listed_train_shards(d.dir) and not glob.glob(os.path.join(d.dir, "train-*-of-*.tfrecord")):
        raise DataError(f"data.dir={d.dir!r}: has no train-*.tfrecord shards")


def _listed_train_shards(data_dir: str) -> list:
    """The train shards metadata.json lists (adopted ones keep their own names, such as train-00000-of-01024).

    Only whether there are any: the full check of the file (data_pipeline.metadata) runs before training.
    """
    try:
        with open(os.path.join(data_dir, "metadata.json"), encoding="utf-8") as f:
            shards = json.load(f)["splits"]["train"]["shards"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return shards if isinstance(shards, list) else []


def check_run_dir(run_dir: str) -> None:
    """Rank 0 creates and writes run_dir: a path it cannot write fails here, before the workers start."""
    existing = os.path.abspath(run_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"run_dir {run_dir!r}: {existing!r} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run_dir {run_dir!r}: {existing!r} is not writable")


def weight_decay_exclusions(text: str) -> list[str]:
    """`train.weight_decay_exclude` as a list of its (lower-case) items."""
    return [item.strip().lower() for item in text.split(",") if item.strip()]


def best_mode(t) -> str:
    """`max` or `min`: the direction in which train.best_metric improves."""
    if t.best_mode != "auto":
        return t.best_mode
    return "min" if t.best_metric.endswith("loss") else "max"


def validate_world(cfg, world_size: int) -> None:
    """Checks that depend on the number of ranks."""
    gbs = cfg.data.global_batch_size
    _check(
        gbs % world_size == 0, "data.global_batch_size", gbs, f"is not divisible by the world size {world_size}"
    )
    # Mixup and cutmix pair the images of the batch a rank reads (all its micro-batches): alone, an image has
    # none to mix with.
    read = gbs // world_size * cfg.train.accumulation_steps
    _check(not cfg.data.augment.mixes or read >= 2, "data.global_batch_size", gbs,
           f"leaves {read} example per rank and step at the world size {world_size}: mixup and cutmix "
           "(data.augment.mixup_alpha, cutmix_alpha) need at least 2")

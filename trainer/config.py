"""Experiment configuration: typed dataclasses loaded from YAML, with overrides.

    cfg = load_config("configs/digits.yaml", ["train.epochs=5"])
    validate(cfg)                      # static checks of the values alone
    check_environment(cfg)             # the data folder and its files, on this machine
    validate_world(cfg, world_size)    # checks that depend on the number of ranks

Every problem raises ConfigError with one line that names the key and the
value. This module imports neither TensorFlow nor Horovod, so the launcher can
check a config before it starts any worker.
"""

import dataclasses
import glob
import os
import typing
from dataclasses import dataclass, field

import yaml

MODEL_NAMES = ("simple_cnn", "resnet20", "resnet50")
OPTIMIZERS = ("adam", "sgd")
LR_DECAYS = ("cosine", "constant")
BEST_METRICS = ("val_accuracy", "val_loss", "val_top5_accuracy")
BEST_MODES = ("auto", "max", "min")


class ConfigError(ValueError):
    """A configuration value that cannot be used; str(e) is a one-line message."""


@dataclass
class AugmentConfig:
    """Training-time augmentation, seeded per record (exact on resume).

    Off by default: right for small or symmetric-sensitive images such as the
    8x8 digits (a mirrored digit is another glyph, and a crop loses strokes).
    For natural photos (ImageNet-like) turn both on.

    Attributes:
      random_resized_crop: train on a random box of crop_area_min..1 of the
        image area, aspect ratio 3/4..4/3, resized to model.image_size.
      crop_area_min: smallest crop, as a fraction of the image area.
      flip: mirror left-right with probability 1/2.
    """

    random_resized_crop: bool = False
    crop_area_min: float = 0.08
    flip: bool = False


@dataclass
class DataConfig:
    """Input data.

    Attributes:
      dir: folder written by `python -m data_pipeline.build_shards`
        (train-*/validation-* shards and metadata.json).
      global_batch_size: examples per optimizer step, summed over all ranks.
        Each rank takes global_batch_size / world_size of them.
      synthetic: feed one random batch of the model's input shape instead of
        shards: measures training throughput without the input pipeline.
        Needs model.image_size, model.channels, model.num_classes and
        train.steps_per_epoch.
      shuffle_buffer: serialized records held by each rank's shuffle buffer.
      seed: data-order and augmentation seed; all ranks share it.
      augment: training-time augmentation (see AugmentConfig).
      crop_fraction: evaluation (and unaugmented training) keeps the central
        square of this fraction of the shorter side, resized to
        model.image_size (0.875 is the usual ImageNet figure; 1 only resizes
        a square image).
      verify_checksums: at start, check the SHA-256 of every shard against
        metadata.json (each rank hashes its share): one read of the data set.
      skip_corrupt_records: skip undecodable images and the rest of a shard
        after a corrupt record, with warnings, instead of stopping with an
        error that names the shard. Skipped records shift the data order.
    """

    dir: str = ""
    global_batch_size: int = 64
    synthetic: bool = False
    shuffle_buffer: int = 2048
    seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    crop_fraction: float = 1.0
    verify_checksums: bool = True
    skip_corrupt_records: bool = False


@dataclass
class ModelConfig:
    """The shared CNN.

    Attributes:
      name: one of simple_cnn, resnet20 (CIFAR-style) or resnet50
        (keras.applications, weights=None).
      image_size: input height and width; 0 takes them from the shards'
        metadata.json (when all images there have one size).
      channels: input channels; 0 takes them from metadata.json.
      num_classes: 0 takes the class count from metadata.json.
    """

    name: str = "simple_cnn"
    image_size: int = 0
    channels: int = 0
    num_classes: int = 0


@dataclass
class TrainConfig:
    """The optimisation.

    Attributes:
      epochs: total epochs of the run (a resumed run continues up to this).
      base_learning_rate: learning rate at reference_batch_size; the peak
        learning rate is base_learning_rate * global_batch_size /
        reference_batch_size (the linear scaling rule, Goyal et al. 2017).
      reference_batch_size: the batch size base_learning_rate is quoted for.
      warmup_epochs: epochs of linear warmup from the single-rank learning rate
        (peak / world_size) to the peak.
      lr_decay: after warmup, `cosine` (to 0 at the last step) or `constant`.
      optimizer: adam or sgd (with momentum, Nesterov).
      momentum: SGD momentum.
      steps_per_epoch: 0 derives it from the training set size:
        examples // global_batch_size, identical on every rank.
      resume: continue from the latest checkpoint in run_dir.
      keep_checkpoints: how many of the latest epoch checkpoints to keep.
      validate_every_epochs: evaluate on the whole validation split every N
        epochs, on all ranks at once; 0 evaluates only after the last epoch
        (which is always evaluated).
      best_metric: validation metric that picks the best checkpoint, kept
        besides the latest ones (val_accuracy, val_loss, val_top5_accuracy;
        empty: keep only the latest).
      best_mode: `max` or `min` for best_metric; `auto` is min for losses,
        max otherwise.
      seed: model initialisation seed (rank 0's weights are broadcast).
      export: write a TensorFlow SavedModel for serving at the end.
      elastic_commit_steps: in elastic mode (launch --elastic), also commit the
        training state every this many steps (0: at epoch ends only). A commit
        copies the variables to host memory and checks for added or removed
        hosts; a failed worker costs the steps since the last commit.
    """

    epochs: int = 10
    base_learning_rate: float = 0.1
    reference_batch_size: int = 256
    warmup_epochs: float = 0.0
    lr_decay: str = "cosine"
    optimizer: str = "sgd"
    momentum: float = 0.9
    steps_per_epoch: int = 0
    resume: bool = True
    keep_checkpoints: int = 3
    validate_every_epochs: int = 1
    best_metric: str = "val_accuracy"
    best_mode: str = "auto"
    seed: int = 42
    export: bool = True
    elastic_commit_steps: int = 0


@dataclass
class AllreduceConfig:
    """Gradient exchange.

    Attributes:
      fp16_compression: cast gradients to float16 for the allreduce, halving
        the bytes sent (Horovod's Compression.fp16).
    """

    fp16_compression: bool = False


@dataclass
class RuntimeConfig:
    """Process settings.

    Attributes:
      intra_op_threads: TensorFlow threads per op; 0 divides the cores of this
        machine between its local ranks, so ranks do not oversubscribe them.
      inter_op_threads: ops run at once; 0 as above.
      deterministic: enable TensorFlow op determinism (slower; exact reruns).
      log_all_ranks: log INFO from every rank, not only from rank 0, and the
        per-epoch details (evaluations, checkpoints written, metric records) at DEBUG.
    """

    intra_op_threads: int = 0
    inter_op_threads: int = 0
    deterministic: bool = False
    log_all_ranks: bool = False


@dataclass
class TensorBoardConfig:
    """What rank 0 writes under run_dir/tensorboard (see trainer.summaries).

    Attributes:
      step_frequency: every this many optimizer steps, write every numeric key
        of Keras' batch logs (rank 0's running loss and accuracy, step time,
        images/sec, and any key another callback adds), plus the learning
        rate, against the global step; 0 writes epoch scalars only.
      sample_images: images in the grid written from rank 0's first training
        batch of each start, as fed to the model; 0 writes none.
      histograms: write a histogram of every weight at the end of each epoch.
      profile_steps: `first,last` global steps (1-based, inclusive) to trace
        with the TensorFlow profiler on rank 0, for TensorBoard's Profile tab
        (needs the tensorboard-plugin-profile package); empty for none.
    """

    step_frequency: int = 20
    sample_images: int = 16
    histograms: bool = False
    profile_steps: str = ""


@dataclass
class ExperimentConfig:
    """One training run.

    Attributes:
      run_dir: where rank 0 writes checkpoints, TensorBoard events,
        config.yaml and summary.json.
    """

    run_dir: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    allreduce: AllreduceConfig = field(default_factory=AllreduceConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)


def _coerce(key: str, raw, typ):
    """Checks (and, for str fields, converts) one value against a field type."""
    if typ is bool:
        if isinstance(raw, bool):
            return raw
    elif typ is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
    elif typ is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
    elif typ is str:
        if raw is None:
            return ""
        if not isinstance(raw, (dict, list)):
            return str(raw)
    raise ConfigError(f"{key}={raw!r}: expected {typ.__name__}")


def _apply(obj, key: str, value) -> None:
    """Sets dotted `key` on a nested dataclass, checking the key and the type."""
    *parents, leaf = key.split(".")
    target = obj
    for i, part in enumerate(parents):
        sub = getattr(target, part, None) if part in {f.name for f in dataclasses.fields(target)} else None
        if not dataclasses.is_dataclass(sub):
            raise ConfigError(f"unknown config key {'.'.join(parents[: i + 1])!r}")
        target = sub
    hints = typing.get_type_hints(type(target))
    if leaf not in {f.name for f in dataclasses.fields(target)}:
        raise ConfigError(f"unknown config key {key!r}")
    typ = hints[leaf]
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping")
        for k, v in value.items():
            _apply(obj, f"{key}.{k}", v)
        return
    setattr(target, leaf, _coerce(key, value, typ))


def parse_override(text: str) -> tuple[str, object]:
    """`a.b=value` to (key, value); the value is read as a YAML scalar."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | None, overrides: typing.Sequence[str] = ()) -> ExperimentConfig:
    """Reads a YAML experiment file (or the defaults, for None) and applies overrides."""
    cfg = ExperimentConfig()
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except OSError as e:
            raise ConfigError(f"config file {path!r}: {e.strerror}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {path!r}{where}: not valid YAML") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path!r}: expected a mapping at the top level")
        for key, value in data.items():
            _apply(cfg, str(key), value)
    for text in overrides:
        _apply(cfg, *parse_override(text))
    return cfg


def to_dict(cfg: ExperimentConfig) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


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


def validate(cfg: ExperimentConfig) -> None:
    """Static checks of the values alone: no file system, no world size."""
    _check(bool(cfg.run_dir), "run_dir", cfg.run_dir, "must be set")
    d, m, t, r = cfg.data, cfg.model, cfg.train, cfg.runtime
    _check(d.global_batch_size > 0, "data.global_batch_size", d.global_batch_size, "must be > 0")
    _check(d.shuffle_buffer > 0, "data.shuffle_buffer", d.shuffle_buffer, "must be > 0")
    _check(0 < d.augment.crop_area_min <= 1, "data.augment.crop_area_min", d.augment.crop_area_min, "must be in (0, 1]")
    _check(0 < d.crop_fraction <= 1, "data.crop_fraction", d.crop_fraction, "must be in (0, 1]")
    _check(m.name in MODEL_NAMES, "model.name", m.name, f"must be one of {', '.join(MODEL_NAMES)}")
    for key in ("image_size", "channels", "num_classes"):
        _check(getattr(m, key) >= 0, f"model.{key}", getattr(m, key), "must be >= 0")
    _check(m.channels in (0, 1, 3), "model.channels", m.channels, "must be 1, 3 or 0 (from the data)")
    _check(t.epochs > 0, "train.epochs", t.epochs, "must be > 0")
    _check(t.base_learning_rate > 0, "train.base_learning_rate", t.base_learning_rate, "must be > 0")
    _check(t.reference_batch_size > 0, "train.reference_batch_size", t.reference_batch_size, "must be > 0")
    _check(t.warmup_epochs >= 0, "train.warmup_epochs", t.warmup_epochs, "must be >= 0")
    _check(t.lr_decay in LR_DECAYS, "train.lr_decay", t.lr_decay, f"must be one of {', '.join(LR_DECAYS)}")
    _check(t.optimizer in OPTIMIZERS, "train.optimizer", t.optimizer, f"must be one of {', '.join(OPTIMIZERS)}")
    _check(0 <= t.momentum < 1, "train.momentum", t.momentum, "must be in [0, 1)")
    _check(t.steps_per_epoch >= 0, "train.steps_per_epoch", t.steps_per_epoch, "must be >= 0")
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", t.keep_checkpoints, "must be >= 1")
    _check(t.validate_every_epochs >= 0, "train.validate_every_epochs", t.validate_every_epochs, "must be >= 0")
    _check(t.best_metric in ("", *BEST_METRICS), "train.best_metric", t.best_metric,
           f"must be one of {', '.join(BEST_METRICS)} or empty")
    _check(t.best_mode in BEST_MODES, "train.best_mode", t.best_mode, f"must be one of {', '.join(BEST_MODES)}")
    _check(t.elastic_commit_steps >= 0, "train.elastic_commit_steps", t.elastic_commit_steps, "must be >= 0")
    _check(r.intra_op_threads >= 0, "runtime.intra_op_threads", r.intra_op_threads, "must be >= 0")
    _check(r.inter_op_threads >= 0, "runtime.inter_op_threads", r.inter_op_threads, "must be >= 0")
    tb = cfg.tensorboard
    _check(tb.step_frequency >= 0, "tensorboard.step_frequency", tb.step_frequency, "must be >= 0")
    _check(tb.sample_images >= 0, "tensorboard.sample_images", tb.sample_images, "must be >= 0")
    profile_range(tb.profile_steps)
    if d.synthetic:
        for key in ("image_size", "channels", "num_classes"):
            _check(getattr(m, key) > 0, f"model.{key}", getattr(m, key), "must be set (> 0) with data.synthetic")
        _check(t.steps_per_epoch > 0, "train.steps_per_epoch", t.steps_per_epoch, "must be set (> 0) with data.synthetic")
        return
    _check(bool(d.dir), "data.dir", d.dir, "must be set (or data.synthetic: true)")


def check_environment(cfg: ExperimentConfig) -> None:
    """Checks against this machine's file system: the shard folder and its files.

    Separate from validate() so that a job can be checked and submitted from a
    host that does not see the data (`launch slurm --no-data-check`).
    """
    d = cfg.data
    if d.synthetic:
        return
    _check(os.path.isdir(d.dir), "data.dir", d.dir, "folder does not exist")
    _check(
        os.path.isfile(os.path.join(d.dir, "metadata.json")), "data.dir", d.dir,
        "has no metadata.json (build it with python -m data_pipeline.build_shards)",
    )
    _check(
        bool(glob.glob(os.path.join(d.dir, "train-*-of-*.tfrecord"))), "data.dir", d.dir, "has no train-*.tfrecord shards"
    )


def best_mode(t: TrainConfig) -> str:
    """`max` or `min`: the direction in which train.best_metric improves."""
    if t.best_mode != "auto":
        return t.best_mode
    return "min" if t.best_metric.endswith("loss") else "max"


def validate_world(cfg: ExperimentConfig, world_size: int) -> None:
    """Checks that depend on the number of ranks."""
    gbs = cfg.data.global_batch_size
    _check(
        gbs % world_size == 0, "data.global_batch_size", gbs, f"is not divisible by the world size {world_size}"
    )

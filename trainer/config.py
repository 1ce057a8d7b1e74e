"""Experiment configuration: typed dataclasses loaded from YAML, with overrides.

    cfg = load_config("configs/digits.yaml", ["train.epochs=5"])
    validate(cfg)                      # static checks of the values alone
    check_environment(cfg)             # the data folder and its files, on this machine
    validate_world(cfg, world_size)    # checks that depend on the number of ranks

Every problem raises ConfigError with one line that names the key and the
value. The checks live in trainer.config_checks and the YAML reading in
trainer.config_yaml; both are re-exported here, the import to use. None of
these modules imports TensorFlow or Horovod, so the launcher can check a
config before it starts any worker (a test keeps it so).
"""

import typing
from dataclasses import dataclass, field

from data_pipeline.augment import Augment  # one definition, shared with the reader
from trainer.config_checks import (  # noqa: F401  (re-exported: callers import them from here)
    BEST_METRICS,
    BEST_MODES,
    LR_DECAYS,
    OPTIMIZERS,
    PRECISIONS,
    ConfigError,
    best_mode,
    check_environment,
    check_run_dir,
    profile_range,
    validate,
    validate_world,
    weight_decay_exclusions,
)
from trainer.config_train import TrainConfig  # noqa: F401  (re-exported)
from trainer.config_yaml import dump_yaml, load_into, parse_override, to_dict  # noqa: F401  (re-exported)
from trainer.model_names import MODEL_NAMES  # noqa: F401  (re-exported)


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
      augment: training-time augmentation (see data_pipeline/augment.py).
      crop_fraction: evaluation (and unaugmented training) keeps the central
        square of this fraction of the shorter side, resized to
        model.image_size (0.875 is the usual ImageNet figure; 1 only resizes
        a square image).
      verify_checksums: at start, check the SHA-256 of every shard against
        metadata.json (each rank hashes its share): one read of the data set.
      skip_corrupt_records: skip undecodable images and the rest of a shard
        after a corrupt record, with warnings, instead of stopping with an
        error that names the shard. Skipped records shift the data order.
        The training count per epoch (`skipped_records`) is exact with
        deterministic_order, approximate without (docs/input-pipeline.md).
      deterministic_order: every rank reads its records in the same order in
        every run (ordered parallel reads and decodes), so a resumed run sees
        the same examples at the same steps as an uninterrupted one. false:
        parallel reads and decodes hand out whatever is ready first (faster
        only when one file or image is slow; the CPU cost is the same, see
        docs/benchmarks.md); the order then differs from run to run, and
        the per-epoch skipped_records is approximate. runtime.deterministic
        implies true.
    """

    dir: str = ""
    global_batch_size: int = 64
    synthetic: bool = False
    shuffle_buffer: int = 2048
    seed: int = 0
    augment: Augment = field(default_factory=Augment)
    crop_fraction: float = 1.0
    verify_checksums: bool = True
    skip_corrupt_records: bool = False
    deterministic_order: bool = True


@dataclass
class ModelConfig:
    """The shared CNN (docs/models.md).

    Attributes:
      name: simple_cnn (small, for digits-sized inputs), resnet20
        (CIFAR-style) or resnet50, or any keras.applications constructor by
        name (EfficientNetV2B0, MobileNetV3Small, ConvNeXtTiny, ResNet50V2,
        ...), built with weights=None (nothing is downloaded), its own head
        for the data's class count, and the input scaling its family expects
        applied to the pipeline's [0, 1] images (docs/models.md lists them).
        keras.applications models need at least 32 pixels (71 for Xception,
        75 for the Inception models); one-channel images are repeated to three.
      builder: `package.module:function` of your own model instead of
        model.name: a function (input_shape, num_classes) -> keras.Model,
        imported on every rank (the module must be importable there: on
        PYTHONPATH or under the folder the job starts in). The launcher
        imports and builds it before any worker starts and checks its input
        and output shapes.
      builder_output: what model.builder's model outputs: `probabilities`
        (a softmax), `logits` (a softmax is added, in float32), or `auto`,
        which runs the model once on random images and takes probabilities
        when every output row is non-negative and sums to 1.
      fused_batchnorm: the keras.applications models' BatchNormalization layers
        run as TensorFlow's fused kernel (trainer.batchnorm; same weights and
        results), measured faster here (docs/benchmarks.md); false keeps Keras's.
      image_size: input height and width; 0 takes them from the shards'
        metadata.json (when all images there have one size).
      channels: input channels; 0 takes them from metadata.json.
      num_classes: 0 takes the class count from metadata.json.
      initial_weights: a `.weights.h5` or `.keras` file to start from (for
        example ImageNet weights saved from keras.applications elsewhere, or
        another run's checkpoint model.weights.h5), loaded by rank 0 and
        broadcast when a run starts without a checkpoint. Layers whose weights
        differ in shape (a head for another class count) keep their random
        initialisation and are named in one log line; a file that matches no
        layer is an error before training.
      freeze_until: fine-tuning: the layers from the first up to and
        including this one (by name) are frozen, their BatchNormalization
        layers in inference mode, until model.unfreeze_epoch; empty: none.
      unfreeze_epoch: the epoch (1-based) from which every layer trains, with
        model.freeze_until; 0 keeps them frozen to the end.
    """

    name: str = "simple_cnn"
    builder: str = ""
    builder_output: str = "auto"
    fused_batchnorm: bool = True
    image_size: int = 0
    channels: int = 0
    num_classes: int = 0
    initial_weights: str = ""
    freeze_until: str = ""
    unfreeze_epoch: int = 0


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
      intra_op_threads: TensorFlow threads per op (at most 1024); 0 divides the
        cores of this machine between its local ranks, so ranks do not
        oversubscribe them.
      inter_op_threads: ops run at once (at most 1024); 0 as above.
      bind_cores: auto: on a CPU host, the ranks that share its cores each
        get their own share of them (whole cores, by socket, in local rank
        order), and all their threads run there; ranks that the launcher or
        a cgroup already gave their own cores keep them, and so do GPU ranks
        and elastic jobs. none: the scheduler places every thread on any
        allowed core. Rank 0 logs the cores of every rank.
      deterministic: enable TensorFlow op determinism (slower; exact reruns).
        The record order is deterministic without it (data.deterministic_order).
      log_all_ranks: log INFO from every rank, not only from rank 0, and the
        details at DEBUG: per epoch (evaluations, checkpoints written, metric
        records) and per start (weight digests, the shards each rank reads).
      fault_stop_after_step: fault injection, for tests only: every rank asks
        to stop as if signalled, so the run stops (and checkpoints) after this
        global step, when it trains that step; 0 never.
      log_batch_digests: for tests and debugging: every rank logs
        `batch_digest STEP LABELS IMAGES` (hashes) for each training batch its
        input pipeline produces, to compare the data of two runs step by step.
      fault_slow_save_sec: fault injection, for tests only: every checkpoint
        save holds its temporary folder this many seconds before it completes,
        as a slow filesystem would; 0 never.
    """

    intra_op_threads: int = 0
    inter_op_threads: int = 0
    bind_cores: str = "auto"
    deterministic: bool = False
    log_all_ranks: bool = False
    fault_stop_after_step: int = 0
    log_batch_digests: bool = False
    fault_slow_save_sec: float = 0.0


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


def effective_batch_size(cfg: ExperimentConfig) -> int:
    """Examples per optimizer step over all ranks: the batch the learning rate and the step count follow."""
    return cfg.data.global_batch_size * cfg.train.accumulation_steps


def load_config(path: str | None, overrides: typing.Sequence[str] = ()) -> ExperimentConfig:
    """Reads a YAML experiment file (or the defaults, for None) and applies overrides."""
    return load_into(ExperimentConfig(), path, overrides)

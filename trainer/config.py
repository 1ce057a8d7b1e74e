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
)
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
      label_smoothing: the training loss is the cross-entropy against labels
        smoothed by this much: 1 - label_smoothing + label_smoothing / classes
        for the true class, label_smoothing / classes for each other (Szegedy
        et al. 2016; 0.1 in the usual ImageNet recipe). The training `loss` is
        that smoothed loss, which cannot fall below the entropy of the smoothed
        labels; val_loss stays the plain cross-entropy, and the accuracies are
        unchanged in meaning.
      steps_per_epoch: 0 derives it from the training set size:
        examples // (global_batch_size * accumulation_steps), identical on
        every rank.
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
      seed: model initialisation seed (rank 0's weights are broadcast);
        0 to 2**31 - 1.
      export: write a TensorFlow SavedModel for serving at the end (RUN_DIR/export;
        see docs/serving.md).
      export_top_k: how many of the most probable classes (indices and names)
        the export's signatures return per image; at most the class count.
      elastic_commit_steps: in elastic mode (launch --elastic), also commit the
        training state every this many steps (0: at epoch ends only). A commit
        copies the variables to host memory and checks for added or removed
        hosts; a failed worker costs the steps since the last commit.
      precision: float32, mixed_bfloat16 or mixed_float16 (the Keras dtype
        policy: float32 weights, the layers compute in the 16-bit type; the
        last layer and its softmax stay float32); `auto` is mixed_bfloat16 on
        GPUs of compute capability >= 8.0, mixed_float16 on older GPUs and
        float32 on CPUs (docs/training.md).
      initial_loss_scale: with mixed_float16, the loss scale to start from; it
        halves on every step whose gradients overflow (that step is skipped on
        all ranks) and doubles after 2000 steps without overflow.
      jit_compile: `true` XLA-compiles the gradient computation and the
        optimizer update (the allreduce between them stays outside XLA);
        `auto` does so on GPUs only, as it measured slower on CPU.
      accumulation_steps: micro-batches per optimizer step: their gradients
        are summed locally, then allreduced and applied once (Horovod's
        backward_passes_per_step). The effective global batch, for the
        learning-rate scaling, steps per epoch and checkpoints, is
        global_batch_size * accumulation_steps.
      stop_on_nonfinite: stop every rank at the step where the loss (averaged
        over ranks) or a weight becomes NaN or inf, with exit code 3; no
        checkpoint is written of it, so the newest stays the last finite one.
        Under mixed_float16 a step whose gradients overflow is skipped, not a
        divergence. false: training goes on and the epoch line shows `nan`
        (checkpoints of non-finite weights are still never written).
      precise_bn: recompute the population mean and variance of every
        BatchNorm layer from the current weights over
        train.precise_bn_examples training examples (all ranks pooled, the
        training preprocessing), at the end of each validated epoch before
        its validation, and before the final weights are validated or
        exported; the checkpoint and the export then hold them (Wu and
        Johnson, "Rethinking 'Batch' in BatchNorm", 2021). `auto` does so,
        with one warning, only while the moving averages cannot have
        converged: while momentum ** (steps x accumulation_steps) > 0.001,
        the weight they still give their initial values (fewer than 688
        updates at Keras's momentum 0.99: small data sets, few epochs).
        `true`: at every validation; `false`: never (docs/training.md).
      precise_bn_examples: training examples over all ranks that each
        recomputation of train.precise_bn reads, at most the training set,
        rounded up to whole batches of data.global_batch_size.
    """

    epochs: int = 10
    base_learning_rate: float = 0.1
    reference_batch_size: int = 256
    warmup_epochs: float = 0.0
    lr_decay: str = "cosine"
    optimizer: str = "sgd"
    momentum: float = 0.9
    label_smoothing: float = 0.0
    steps_per_epoch: int = 0
    resume: bool = True
    keep_checkpoints: int = 3
    validate_every_epochs: int = 1
    best_metric: str = "val_accuracy"
    best_mode: str = "auto"
    seed: int = 42
    export: bool = True
    export_top_k: int = 5
    elastic_commit_steps: int = 0
    precision: str = "auto"
    initial_loss_scale: float = 32768.0
    jit_compile: str = "auto"
    accumulation_steps: int = 1
    stop_on_nonfinite: bool = True
    precise_bn: str = "auto"
    precise_bn_examples: int = 4096


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

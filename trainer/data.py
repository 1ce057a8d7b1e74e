"""The data side of a run: each rank's streams and the shard check (shapes and counts: trainer.data_spec).

Training and checkpoint evaluation (trainer.evaluate) both start here.
"""

import hashlib
import logging
import os

import keras
import tensorflow as tf

from data_pipeline import metadata as md
from data_pipeline.keras_augment import mix_batches
from data_pipeline.positions import files_at
from data_pipeline.reader import eval_stream, synthetic_dataset, train_stream
from data_pipeline.stream_options import EvalOptions, TrainOptions
from trainer.config import ExperimentConfig
from trainer.data_spec import DataSpec, resolve_data  # noqa: F401  (re-exported: the spec of the streams)
from trainer.distributed import DistContext
from trainer.evaluation import Evaluator

log = logging.getLogger(__name__)

PRECISE_BN_CACHE_BYTES = 256 << 20  # per rank: the decoded float32 images of the precise BatchNorm sample


def check_shards(cfg: ExperimentConfig, ctx: DistContext) -> None:
    """Each rank hashes its share of the shards: a damaged file stops the run before training."""
    if cfg.data.synthetic or not cfg.data.verify_checksums:
        return
    bad = md.corrupt_shards(cfg.data.dir, md.load_metadata(cfg.data.dir), ctx.size, ctx.rank)
    if bad and not cfg.data.skip_corrupt_records:
        raise md.DataError(f"shard {bad[0]!r} does not match its SHA-256 in metadata.json (truncated or changed); "
                           "rebuild the shards, or set data.skip_corrupt_records=true to skip its corrupt records")
    for path in bad:
        log.warning("shard %r does not match its SHA-256 in metadata.json: skipping its corrupt records", path)


def train_dataset(cfg: ExperimentConfig, spec: DataSpec, ctx: DistContext, per_replica: int, start_step: int,
                  skipped: tf.Variable | None = None):
    """This rank's training stream, starting where `start_step` steps left it.

    With data.skip_corrupt_records, `skipped` counts the undecodable records
    the stream replaced (see SkippedRecords).
    """
    size, channels = spec.input_shape[0], spec.input_shape[2]
    if cfg.data.synthetic:
        ds = synthetic_dataset(per_replica, size, channels, spec.num_classes, ctx.rank)
        if cfg.data.augment.mixes:
            # The model's loss takes soft labels then: mix the synthetic batch as the real ones would be.
            ds = mix_batches(ds, cfg.data.augment, spec.num_classes, cfg.data.seed, start_step, ctx.size, ctx.rank)
        return ds
    skip = start_step * per_replica
    mine = files_at(spec.train_files, list(spec.train_shard_counts), ctx.size, ctx.rank, cfg.data.seed, skip)
    log.debug("train shards read by this rank: %s", ",".join(os.path.basename(f) for f in mine))
    options = _train_options(cfg, spec, ctx, per_replica, skip,
                             (cfg.train.epochs * spec.steps_per_epoch - start_step) * per_replica)
    ds = train_stream(spec.train_files, options, skipped)
    return ds.enumerate(start_step).map(_log_digest) if cfg.runtime.log_batch_digests else ds


def precise_bn_dataset(cfg: ExperimentConfig, spec: DataSpec, ctx: DistContext, num_batches: int) -> tf.data.Dataset:
    """This rank's first `num_batches` training batches, for trainer.precise_bn: the same ones on every pass over it.

    The training stream's first records with their augmentation (the stream
    is a function of its position), read by a pipeline of its own: the
    training stream is neither consumed nor moved, and the sample does not
    depend on when it is read. The batch is BatchNorm's in training, the
    per-replica micro-batch. A sample of at most PRECISE_BN_CACHE_BYTES is
    decoded once and then held in memory: reading it costs more than the
    forward passes over it (on digits, 23 batches: 0.15 s of the call's 0.17 s).
    """
    per_replica = cfg.data.global_batch_size // ctx.size
    size, channels = spec.input_shape[0], spec.input_shape[2]
    if cfg.data.synthetic:
        return synthetic_dataset(per_replica, size, channels, spec.num_classes, ctx.rank).take(num_batches)
    ds = train_stream(spec.train_files, _train_options(cfg, spec, ctx, per_replica, 0, num_batches * per_replica))
    return ds.cache() if num_batches * per_replica * size * size * channels * 4 <= PRECISE_BN_CACHE_BYTES else ds


def _train_options(cfg: ExperimentConfig, spec: DataSpec, ctx: DistContext, per_replica: int, skip_records: int,
                   num_records: int) -> TrainOptions:
    """This rank's training stream options: `num_records` records after the first `skip_records`."""
    d = cfg.data
    return TrainOptions(
        per_replica_batch_size=per_replica, image_size=spec.input_shape[0], channels=spec.input_shape[2],
        num_shards=ctx.size, shard_index=ctx.rank, shard_counts=spec.train_shard_counts, crop_fraction=d.crop_fraction,
        threads=ctx.input_threads, deterministic=d.deterministic_order or cfg.runtime.deterministic,
        skip_corrupt=d.skip_corrupt_records, seed=d.seed, shuffle_buffer=d.shuffle_buffer,
        skip_records=skip_records, num_records=num_records, augment=d.augment, num_classes=spec.num_classes,
        label_offset=spec.label_offset,
    )


def _log_digest(step, batch):
    """Logs `batch_digest STEP LABELS IMAGES` as the pipeline produces the batch (ahead of its step)."""
    images, labels = batch

    def emit(step, labels, images):
        log.info("batch_digest %d %s %s", int(step), hashlib.sha256(labels.numpy().tobytes()).hexdigest()[:12],
                 hashlib.sha256(images.numpy().tobytes()).hexdigest()[:12])
        return step

    done = tf.py_function(emit, [step, labels, images], tf.int64)
    with tf.control_dependencies([done]):
        return tf.identity(images), tf.identity(labels)


def eval_dataset(cfg: ExperimentConfig, spec: DataSpec, ctx: DistContext, batch_size: int) -> tf.data.Dataset:
    """This rank's disjoint part of the validation split, one pass, with its last partial batch."""
    size, channels = spec.input_shape[0], spec.input_shape[2]
    if cfg.data.synthetic:
        return synthetic_dataset(batch_size, size, channels, spec.num_classes, 1000 + ctx.rank).take(1)
    files = spec.val_files
    if not files:
        log.warning("no validation shards in %s: evaluating on the training shards", cfg.data.dir)
        files = spec.train_files
    options = EvalOptions(
        per_replica_batch_size=batch_size, image_size=size, channels=channels, num_shards=ctx.size,
        shard_index=ctx.rank, crop_fraction=cfg.data.crop_fraction, threads=ctx.input_threads,
        skip_corrupt=cfg.data.skip_corrupt_records, label_offset=spec.label_offset,
    )
    return eval_stream(files, options)


def make_evaluator(cfg: ExperimentConfig, spec: DataSpec, ctx: DistContext, batch_size: int) -> Evaluator:
    # The count is known from metadata.json: checking it makes a shard that
    # holds fewer or more records than recorded an error, not a silent change
    # (with skip_corrupt_records, fewer are the records skipped).
    expected = 0 if cfg.data.synthetic else (spec.num_val if spec.val_files else spec.num_train)
    return Evaluator(ctx, lambda: eval_dataset(cfg, spec, ctx, batch_size), spec.num_classes, expected,
                     f"data.dir={cfg.data.dir!r}", skip_corrupt=cfg.data.skip_corrupt_records and bool(expected))


class SkippedRecords(keras.callbacks.Callback):
    """`skipped_records` in the epoch logs: the undecodable training records replaced this epoch, on all ranks.

    Runs on every rank (the sum is a collective) after AverageMetrics, which
    would turn the sum into a mean, and before the callbacks that read the
    logs: the epoch line, metrics.jsonl and TensorBoard.
    """

    def __init__(self, ctx: DistContext, counter: tf.Variable):
        super().__init__()
        self.ctx = ctx
        self.counter = counter
        self._start = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = int(self.counter.numpy())

    def on_epoch_end(self, epoch, logs=None):
        mine = int(self.counter.numpy()) - self._start
        total = int(self.ctx.sum_scalars({"skipped": mine}, "data.skipped")["skipped"])
        logs["skipped_records"] = total
        if total:
            log.warning("epoch %d: %d undecodable training records skipped, each replaced by the next record "
                        "(%d on this rank)", epoch + 1, total, mine)

"""Wires data, model, optimizer, callbacks and outputs into one training run."""

import logging
import os
import statistics
import time
from dataclasses import dataclass

import keras
import tensorflow as tf

from data_pipeline import metadata as md
from data_pipeline.reader import make_dataset, shard_files_for, synthetic_dataset
from trainer import callbacks as cb
from trainer.config import ConfigError, ExperimentConfig
from trainer.distributed import DistContext, weights_digest
from trainer.models import build_model
from trainer.outputs import make_outputs
from trainer.schedule import make_schedule
from trainer.step import DataParallelModel

log = logging.getLogger(__name__)


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


def resolve_data(cfg: ExperimentConfig) -> DataSpec:
    """Fills the model's input shape, class count and steps per epoch from config and metadata."""
    m, t = cfg.model, cfg.train
    if cfg.data.synthetic:
        return DataSpec((m.image_size, m.image_size, m.channels), m.num_classes, t.steps_per_epoch, [], [])
    try:
        meta = md.load_metadata(cfg.data.dir)
    except md.DataError as e:
        raise ConfigError(f"data.dir={cfg.data.dir!r}: {e}") from None
    shape = meta.get("image_shape")
    image_size = m.image_size or (shape[0] if shape and shape[0] == shape[1] else 0)
    if not image_size:
        raise ConfigError(f"model.image_size=0: the images in {cfg.data.dir!r} differ in size or are not square; set it")
    channels = m.channels or int(meta["channels"])
    num_classes = m.num_classes or len(meta["class_names"])
    if num_classes < len(meta["class_names"]):
        raise ConfigError(f"model.num_classes={num_classes}: the data has {len(meta['class_names'])} classes")
    n_train = md.num_examples(meta, "train")
    steps = t.steps_per_epoch or n_train // cfg.data.global_batch_size
    if steps < 1:
        raise ConfigError(
            f"data.global_batch_size={cfg.data.global_batch_size}: larger than the {n_train} training examples"
        )
    return DataSpec(
        (image_size, image_size, channels), num_classes, steps,
        md.shard_files(cfg.data.dir, meta, "train"), md.shard_files(cfg.data.dir, meta, "validation"),
        n_train, md.num_examples(meta, "validation"),
    )


def eval_dataset(cfg: ExperimentConfig, spec: DataSpec, batch_size: int) -> tf.data.Dataset:
    """Every validation example once, in order, including the last partial batch."""
    size, channels = spec.input_shape[0], spec.input_shape[2]
    if cfg.data.synthetic:
        return synthetic_dataset(batch_size, size, channels, spec.num_classes).take(1)
    files = spec.val_files
    if not files:
        log.warning("no validation shards in %s: evaluating on the training shards", cfg.data.dir)
        files = spec.train_files
    ds = make_dataset(files, 1, 0, batch_size, size, channels, training=False, drop_remainder=False)
    # The count is known from metadata.json: asserting it makes a shard that
    # holds fewer or more records than recorded an error, not a silent change.
    count = spec.num_val if spec.val_files else spec.num_train
    return ds.apply(tf.data.experimental.assert_cardinality(-(-count // batch_size)))


def build_optimizer(cfg: ExperimentConfig, schedule) -> keras.optimizers.Optimizer:
    if cfg.train.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=schedule)
    return keras.optimizers.SGD(learning_rate=schedule, momentum=cfg.train.momentum, nesterov=True)


def run(cfg: ExperimentConfig, ctx: DistContext) -> dict | None:
    """Trains (or resumes) to cfg.train.epochs; returns the summary on rank 0, None elsewhere."""
    started = time.time()
    # A different seed per rank on purpose: the initial broadcast, not luck,
    # must be what makes the replicas equal (the tests check this).
    keras.utils.set_random_seed(cfg.train.seed + ctx.rank)
    if cfg.runtime.deterministic:
        tf.config.experimental.enable_op_determinism()

    spec = resolve_data(cfg)
    gbs = cfg.data.global_batch_size
    per_replica = gbs // ctx.size
    log.info(
        "world size %d; global batch %d = %d per replica; %d steps per epoch; input shape %s; %d classes",
        ctx.size, gbs, per_replica, spec.steps_per_epoch, spec.input_shape, spec.num_classes,
    )

    if cfg.data.synthetic:
        train_ds = synthetic_dataset(per_replica, spec.input_shape[0], spec.input_shape[2], spec.num_classes, ctx.rank)
    else:
        log.info("train shards read by this rank: %s",
                 ",".join(os.path.basename(f) for f in shard_files_for(spec.train_files, ctx.size, ctx.rank) or []))
        train_ds = make_dataset(
            spec.train_files, ctx.size, ctx.rank, per_replica, spec.input_shape[0], spec.input_shape[2],
            training=True, seed=cfg.data.seed, shuffle_buffer=cfg.data.shuffle_buffer,
        )

    schedule = make_schedule(cfg.train, gbs, ctx.size, spec.steps_per_epoch)
    log.info("learning rate: peak %.6g (linear scaling), warmup from %.6g over %d steps, then %s",
             schedule.peak, schedule.initial, schedule.warmup_steps, schedule.decay)
    model = DataParallelModel.wrap(
        build_model(cfg.model.name, spec.input_shape, spec.num_classes), cfg.allreduce.fp16_compression
    )
    model.compile(
        optimizer=build_optimizer(cfg, schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        # Horovod's ops have no XLA kernels on CPU builds.
        jit_compile=False,
    )
    model.optimizer.build(model.trainable_variables)

    outputs = make_outputs(ctx, cfg)
    outputs.start()
    state = outputs.restore_latest(model) if cfg.train.resume else None
    initial_epoch = ctx.broadcast_object(state["epoch"] if state else 0, "resume.epoch")

    if initial_epoch >= cfg.train.epochs:
        summary = outputs.load_summary()
        if summary is not None or not ctx.is_chief:
            log.info("run in %s already finished at epoch %d", cfg.run_dir, initial_epoch)
            return summary
        history = {}  # training finished but the summary was never written: evaluate again
    else:
        log.info("weights before broadcast: %s", weights_digest(model.variables))
        callbacks = [
            cb.BroadcastInitialState(ctx),
            cb.EpochTimer(gbs, spec.steps_per_epoch),
            cb.SyncReplicaState(ctx),
            cb.AverageMetrics(ctx),
            cb.EpochLog(ctx.rank),
            *outputs.callbacks({"world_size": ctx.size, "global_batch_size": gbs}),
        ]
        history = model.fit(
            train_ds, epochs=cfg.train.epochs, initial_epoch=initial_epoch, steps_per_epoch=spec.steps_per_epoch,
            callbacks=callbacks, verbose=outputs.verbose, shuffle=False,
        ).history
        check_replicas_agree(ctx, model)

    val = outputs.evaluate(model, lambda: eval_dataset(cfg, spec, per_replica))
    if val is None:
        return None
    rates = history.get("images_per_sec", [])
    summary = {
        "val_accuracy": val["accuracy"],
        "val_loss": val["loss"],
        "epochs": cfg.train.epochs,
        "epochs_this_start": len(rates),
        "world_size": ctx.size,
        "global_batch_size": gbs,
        "per_replica_batch_size": per_replica,
        "steps_per_epoch": spec.steps_per_epoch,
        # The first epoch of a start includes graph tracing; leave it out when there are others.
        "images_per_sec": statistics.median(rates[1:] or rates) if rates else None,
        "train_loss": history["loss"][-1] if history else None,
        "train_accuracy": history["accuracy"][-1] if history else None,
        "model": cfg.model.name,
        "wall_time_sec": round(time.time() - started, 2),
    }
    outputs.finish(model, summary)
    return summary


def check_replicas_agree(ctx: DistContext, model) -> None:
    """Fails loudly if the ranks' models differ after training (they must not)."""
    digest = weights_digest(model.variables)
    log.info("weights after training: %s", digest)
    digests = ctx.allgather_object(digest, "final.digest")
    if len(set(digests)) != 1:
        raise RuntimeError(f"replicas diverged: weight digests by rank {digests}")

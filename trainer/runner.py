"""Wires data, model, optimizer, callbacks and outputs into one training run."""

import hashlib
import logging
import statistics
import time

import keras
import tensorflow as tf

from data_pipeline.reader import corrupt_shard_error
from trainer import callbacks as cb
from trainer.checkpoint import CheckpointError
from trainer.config import ConfigError, ExperimentConfig, dump_yaml
from trainer.data import DataSpec, check_shards, make_evaluator, resolve_data, train_dataset
from trainer.distributed import DistContext, weights_digest
from trainer.evaluation import PeriodicValidation, validation_logs
from trainer.models import build_model
from trainer.outputs import make_outputs
from trainer.preemption import StopOnRequest, StopRequest, Stopped
from trainer.schedule import make_schedule
from trainer.step import DataParallelModel

log = logging.getLogger(__name__)


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
    check_shards(cfg, ctx)
    gbs = cfg.data.global_batch_size
    per_replica = gbs // ctx.size
    log.info(
        "world size %d; global batch %d = %d per replica; %d steps per epoch; input shape %s; %d classes",
        ctx.size, gbs, per_replica, spec.steps_per_epoch, spec.input_shape, spec.num_classes,
    )

    schedule = make_schedule(cfg.train, gbs, ctx.size, spec.steps_per_epoch)
    log.info("learning rate: peak %.6g (linear scaling), warmup from %.6g over %d steps, then %s",
             schedule.peak, schedule.initial, schedule.warmup_steps, schedule.decay)
    model = build_compiled_model(cfg, spec, schedule)
    if cfg.train.best_metric == "val_top5_accuracy" and spec.num_classes <= 5:
        raise ConfigError(f"train.best_metric='val_top5_accuracy': the data has {spec.num_classes} classes")

    outputs = make_outputs(ctx, cfg)
    outputs.start()
    signature = model_signature(cfg, spec)
    spe, epochs = spec.steps_per_epoch, cfg.train.epochs
    request = StopRequest()
    request.install()
    model.stop_request = request
    config_sha = config_hash(cfg)
    validated: dict[int, dict] = {}

    def resume(ctx: DistContext, outputs) -> int:
        return resume_step(resume_state(ctx, cfg, outputs, model, signature), spe, gbs, ctx.size, schedule, model)

    def train(ctx: DistContext, outputs, start_step: int, extra_callbacks=()) -> dict | None:
        """Trains from `start_step` to the last epoch; None when there is nothing left to train."""
        if start_step >= epochs * spe:
            return None
        per_replica = gbs // ctx.size

        def checkpoint_state(step: int) -> dict:
            return {
                "epoch": step // spe, "steps_per_epoch": spe, "world_size": ctx.size, "global_batch_size": gbs,
                "peak_learning_rate": schedule.peak, "data_seed": cfg.data.seed, "config_sha256": config_sha,
                "model": signature,
            }

        log.info("weights before broadcast: %s", weights_digest(model.variables))
        timer = cb.StepTimer(ctx, gbs)
        # Built per context: an elastic resize changes which records each rank evaluates.
        validation = PeriodicValidation(make_evaluator(cfg, spec, ctx, per_replica),
                                        cfg.train.validate_every_epochs, epochs)
        callbacks = [
            cb.BroadcastInitialState(ctx),
            StopOnRequest(request),
            cb.EpochTimer(gbs),
            timer,
            cb.InputWait(),
            cb.AverageMetrics(ctx),
            validation,
            cb.EpochLog(ctx.rank),
            *outputs.callbacks(checkpoint_state, timer),
            *extra_callbacks,
        ]
        history: dict = {}
        for initial, end, steps in fit_phases(start_step, spe, epochs):
            # The phase's first step, from the schedule of phases: not from the
            # optimizer, whose step counter reaches ranks other than 0 only
            # with the broadcast at the start of fit.
            first_step = initial * spe + (spe - steps)
            try:
                dataset = train_dataset(cfg, spec, ctx, per_replica, first_step)
                if first_step == start_step:
                    outputs.write_input_sample(dataset, first_step + 1)
                phase = model.fit(
                    dataset,
                    epochs=end, initial_epoch=initial, steps_per_epoch=steps,
                    callbacks=callbacks, verbose=outputs.verbose, shuffle=False,
                ).history
            except (tf.errors.DataLossError, tf.errors.FailedPreconditionError) as e:  # a bad shard, if any is found
                # The per-epoch validation reads the validation shards inside fit too.
                err = corrupt_shard_error(spec.train_files, e, list(spec.train_shard_counts))
                if err is e and spec.val_files:
                    err = corrupt_shard_error(spec.val_files, e)
                raise err from None
            for key, values in phase.items():
                history.setdefault(key, []).extend(values)
            if request.stopped:
                # Rank 0 wrote its checkpoint in on_epoch_end; this collective
                # keeps the other ranks alive until it has.
                ctx.average_scalars({"stopped": 1.0}, "stop.barrier")
                raise Stopped(f"stopped at step {int(model.optimizer.iterations.numpy())} "
                              f"({request.signal_name or 'another rank was signalled'}); checkpoint written")
        check_replicas_agree(ctx, model)
        validated.update(validation.results)
        return history

    if ctx.elastic:
        # The global batch stays fixed when workers come and go (see README).
        from trainer import elastic

        ctx, outputs, history = elastic.train(
            ctx, model, spe, cfg.train.elastic_commit_steps, resume, train, lambda c: make_outputs(c, cfg)
        )
    else:
        history = train(ctx, outputs, resume(ctx, outputs))
    per_replica = gbs // ctx.size
    if history is None:
        summary = outputs.load_summary()
        if ctx.broadcast_object(summary is not None, "resume.finished"):
            log.info("run in %s already finished at epoch %d", cfg.run_dir, epochs)
            return summary
        # Training finished but the summary was never written: evaluate again,
        # on every rank, from rank 0's restored weights.
        ctx.broadcast_variables(model.variables, "eval.model")
        history = {}

    # The last epoch is always validated in fit, unless a stop ended it.
    val = validated.get(epochs) or make_evaluator(cfg, spec, ctx, per_replica).evaluate(model)
    rates = history.get("images_per_sec", [])
    summary = {
        **{k: v for k, v in validation_logs(val).items() if k.startswith("val_")},
        "val_examples": val["examples"],
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
    return outputs.finish(model, summary, log_validation=epochs not in validated)


def model_signature(cfg: ExperimentConfig, spec: DataSpec) -> dict:
    """What a checkpoint must match to be restored into this run's model."""
    return {"name": cfg.model.name, "input_shape": list(spec.input_shape), "num_classes": spec.num_classes}


def build_compiled_model(cfg: ExperimentConfig, spec: DataSpec, schedule) -> DataParallelModel:
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
    model.time_input = not cfg.runtime.deterministic
    return model


def fit_phases(start_step: int, steps_per_epoch: int, epochs: int) -> list[tuple[int, int, int]]:
    """(initial_epoch, epochs, steps_per_epoch) of the fit calls that continue from `start_step`.

    Keras starts every epoch at its first step, so a run stopped mid-epoch
    first finishes that epoch with a short fit, then runs the rest whole.
    """
    epoch, done = divmod(start_step, steps_per_epoch)
    phases = []
    if done:
        phases.append((epoch, epoch + 1, steps_per_epoch - done))
        epoch += 1
    if epoch < epochs:
        phases.append((epoch, epochs, steps_per_epoch))
    return phases


def resume_state(ctx: DistContext, cfg: ExperimentConfig, outputs, model, signature: dict) -> dict | None:
    """Rank 0 restores the latest checkpoint; every rank gets its state.json (or its error)."""
    return broadcast_restore(ctx, lambda: outputs.restore_latest(model, signature) if cfg.train.resume else None)


def broadcast_restore(ctx: DistContext, restore) -> dict | None:
    """Runs `restore` (which loads a checkpoint on rank 0 only); every rank gets its state or its error."""
    try:
        result = {"state": restore()}
    except CheckpointError as e:
        result = {"error": str(e)}
    result = ctx.broadcast_object(result, "resume.state")
    if "error" in result:
        raise CheckpointError(result["error"])
    return result["state"]


def resume_step(state: dict | None, spe: int, gbs: int, world_size: int, schedule, model) -> int:
    """The global step to continue at, re-positioned when the batch or world size changed."""
    if state is None:
        return 0
    step = int(state["global_step"])
    if state.get("world_size") != world_size:
        log.info(
            "checkpoint written at world size %s, resuming at %d: global batch %s -> %d, per-replica batch "
            "%s -> %d, peak learning rate %.6g -> %.6g",
            state.get("world_size"), world_size, state.get("global_batch_size"), gbs,
            (state.get("global_batch_size") or 0) // (state.get("world_size") or 1), gbs // world_size,
            state.get("peak_learning_rate", float("nan")), schedule.peak,
        )
    if state.get("steps_per_epoch") != spe:
        # The schedule is indexed by step: keep its position in epochs, not in steps.
        step = int(state["epoch"]) * spe
        log.info("steps per epoch %s -> %d: continuing at the start of epoch %d (step %d)",
                 state.get("steps_per_epoch"), spe, int(state["epoch"]) + 1, step)
        model.optimizer.iterations.assign(step)
    return step


def config_hash(cfg: ExperimentConfig) -> str:
    return hashlib.sha256(dump_yaml(cfg).encode()).hexdigest()


def check_replicas_agree(ctx: DistContext, model) -> None:
    """Fails loudly if the ranks' models differ after training (they must not)."""
    digest = weights_digest(model.variables)
    log.info("weights after training: %s", digest)
    digests = ctx.allgather_object(digest, "final.digest")
    if len(set(digests)) != 1:
        raise RuntimeError(f"replicas diverged: weight digests by rank {digests}")

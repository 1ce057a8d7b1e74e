"""Wires data, model, optimizer, callbacks and outputs into one training run.

`run` builds a TrainingRun (the data from trainer.data, the model from
trainer.assembly) and drives it: directly, or under Horovod elastic
(trainer.elastic), which calls its `resume` and `train` again after every
change of the worker set. The resume protocol is in trainer.resume.
"""

import functools
import logging
import statistics
import time

import keras
import tensorflow as tf

from data_pipeline.augment import describe as describe_augment
from data_pipeline.collective import on_root
from data_pipeline.reader import corrupt_shard_error
from trainer import callbacks as cb
from trainer.assembly import build_compiled_model, config_hash, run_precision
from trainer.checkpoint import CheckpointError
from trainer.config import ExperimentConfig, effective_batch_size
from trainer.data import SkippedRecords, check_shards, make_evaluator, precise_bn_dataset, train_dataset
from trainer.data_spec import model_signature, resolve_data
from trainer.distributed import DistContext, weights_digest
from trainer.ema import EvaluatedWeights, UseEvaluatedWeights, UseTrainingWeights, averages
from trainer.evaluation import PeriodicValidation, recorded_validation, validation_metrics
from trainer.failures import AgreeOnFailures, RunFailures, StopOnNonFinite
from trainer.freeze import set_phase, split_phases
from trainer.input_wait import InputWait
from trainer.outputs import make_outputs
from trainer.precise_bn import PreciseBatchNorm, PreciseStatistics, batches_for
from trainer.preemption import StopOnRequest, Stopped, StopRequest
from trainer.resume import fit_phases, resume_state, resume_step
from trainer.schedule import make_schedule

log = logging.getLogger(__name__)


def run(cfg: ExperimentConfig, ctx: DistContext) -> dict | None:
    """Trains (or resumes) to cfg.train.epochs; returns the summary on rank 0, None elsewhere."""
    started = time.time()
    # A different seed per rank on purpose: the initial broadcast, not luck,
    # must be what makes the replicas equal (the tests check this).
    keras.utils.set_random_seed(cfg.train.seed + ctx.rank)
    if cfg.runtime.deterministic:
        tf.config.experimental.enable_op_determinism()

    training = TrainingRun(cfg, ctx, started)
    outputs = training.make_outputs(ctx)
    outputs.start()
    training.request.install()
    if ctx.elastic:
        # The global batch stays fixed when workers come and go (see README).
        from trainer import elastic

        ctx, outputs, history = elastic.train(ctx, training, cfg.train.elastic_commit_steps)
    else:
        history = training.train(ctx, outputs, training.resume(ctx, outputs))
    summary = training.finish(ctx, outputs, history)
    # Rank 0's last writes (summary, export), and any before training: every rank leaves with their outcome.
    training.failures.agree(ctx, outputs.checkpoints, training.model, "failures.end")
    return summary


class TrainingRun:
    """What stays fixed for one run (config, data, schedule, model) and the steps of its loop.

    The distributed context and the outputs are arguments, not attributes:
    under elastic training both change whenever workers come and go.
    """

    def __init__(self, cfg: ExperimentConfig, ctx: DistContext, started: float):
        self.cfg = cfg
        self.started = started
        self.spec = spec = resolve_data(cfg)
        check_shards(cfg, ctx)
        # Per optimizer step: the schedule, the step count, checkpoints and throughput all follow it.
        self.global_batch = gbs = effective_batch_size(cfg)
        self.steps_per_epoch = spec.steps_per_epoch
        n = cfg.train.accumulation_steps
        log.info(
            "world size %d; global batch %d = %d per replica (%d micro-batches of %d); %d steps per epoch; "
            "input shape %s; %d classes", ctx.size, gbs, gbs // ctx.size, n, gbs // ctx.size // n,
            spec.steps_per_epoch, spec.input_shape, spec.num_classes,
        )
        self.schedule = schedule = make_schedule(cfg.train, gbs, ctx.size, spec.steps_per_epoch)
        log.info("learning rate: peak %.6g (linear scaling), warmup from %.6g over %d steps, then %s",
                 schedule.peak, schedule.initial, schedule.warmup_steps, schedule.decay)
        log.info("training augmentation: %s", describe_augment(cfg.data.augment))
        # Its signal handlers are installed by run(), once the outputs have started.
        self.request = StopRequest()
        self.failures = RunFailures(self.request, cfg.train.stop_on_nonfinite)
        self.precision = run_precision(cfg, ctx)
        self.model = build_compiled_model(cfg, spec, schedule, stop_request=self.request, precision=self.precision)
        # Undecodable training records replaced on this rank (data.skip_corrupt_records), over the whole start.
        self.skipped = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.signature = model_signature(cfg, spec)
        gbs_bn = cfg.data.global_batch_size  # BatchNorm's batch in training: the micro-batch
        self.precise_bn = PreciseBatchNorm(
            cfg.train.precise_bn, batches_for(cfg.train.precise_bn_examples, spec.num_train, gbs_bn), gbs_bn, n,
            functools.partial(precise_bn_dataset, cfg, spec))
        self.config_sha = config_hash(cfg)
        # Validation results by epoch, from every train() call (and the last one's from its checkpoint).
        self.validated: dict[int, dict] = {}
        self.logged_final = False  # the last epoch's validation logged by an earlier start

    def make_outputs(self, ctx: DistContext):
        """This rank's writer (trainer.outputs); rebuilt after an elastic reset, as the rank may change."""
        return make_outputs(ctx, self.cfg, self.failures)

    def resume(self, ctx: DistContext, outputs) -> int:
        """The global step to start at, from the latest checkpoint (collective: run once per job)."""
        state = resume_state(ctx, self.cfg, outputs, self.model, self.signature)
        epochs = self.cfg.train.epochs
        if state and "validation" in state and int(state["epoch"]) == epochs:
            # A stop on the run's last step, after its validation was logged: finish() must neither evaluate
            # it again nor log it again. Every rank has the state, so all decide alike (evaluation is collective).
            recorded = recorded_validation(state["validation"])
            if recorded is None:  # a checkpoint of an earlier version: evaluated again, not logged again
                self.logged_final = True
            else:
                self.validated[epochs] = recorded
        step = resume_step(state, self.steps_per_epoch, self.global_batch, ctx.size, self.schedule, self.model)
        # The epochs from the resume point on are trained (or completed) again, and recorded again.
        outputs.keep_records(step // self.steps_per_epoch)
        return step

    def checkpoint_state(self, ctx: DistContext, step: int) -> dict:
        """What a checkpoint written at `step` records about the run, besides the weights."""
        spe = self.steps_per_epoch
        return {
            "epoch": step // spe, "steps_per_epoch": spe, "world_size": ctx.size,
            "global_batch_size": self.global_batch, "peak_learning_rate": self.schedule.peak,
            "data_seed": self.cfg.data.seed, "config_sha256": self.config_sha, "model": self.signature,
        }

    def train(self, ctx: DistContext, outputs, start_step: int, extra_callbacks=()) -> dict | None:
        """Trains from `start_step` to the last epoch; None when there is nothing left to train."""
        spe, epochs = self.steps_per_epoch, self.cfg.train.epochs
        if start_step >= epochs * spe:
            return None
        log.debug("weights before broadcast: %s", weights_digest(self.model.variables))
        timer = cb.StepTimer(ctx, self.global_batch)
        # Built per context: an elastic resize changes which records each rank evaluates.
        every = self.cfg.train.validate_every_epochs
        validation = PeriodicValidation(self.evaluator(ctx), every, epochs)
        weights = self.evaluated_weights()
        callbacks = [
            cb.BroadcastInitialState(ctx),
            StopOnRequest(self.request, self.cfg.runtime.fault_stop_after_step),
            *([StopOnNonFinite(self.failures)] if self.cfg.train.stop_on_nonfinite else []),
            cb.EpochTimer(self.global_batch),
            timer,
            InputWait(),
            cb.AverageMetrics(ctx),
            *([SkippedRecords(ctx, self.skipped)] if self.cfg.data.skip_corrupt_records else []),
            UseEvaluatedWeights(weights, every, epochs),  # the average (train.ema), for the next two
            PreciseStatistics(self.precise_bn, ctx, spe, every, epochs),  # before the validation it serves
            validation,
            UseTrainingWeights(weights),  # before the checkpoint: it holds the training weights and the average
            cb.EpochLog(ctx.rank),
            *outputs.callbacks(functools.partial(self.checkpoint_state, ctx), timer),
            # Also what keeps the other ranks from going on before rank 0's checkpoint is written.
            AgreeOnFailures(ctx, self.failures, outputs.checkpoints),
            *extra_callbacks,
        ]
        history: dict = {}
        for initial, end, steps in split_phases(fit_phases(start_step, spe, epochs), self.cfg.model, spe):
            set_phase(self.model, self.cfg.model, initial)
            phase = self._fit(ctx, outputs, callbacks, start_step, initial, end, steps)
            for key, values in phase.items():
                history.setdefault(key, []).extend(values)
            if self.request.stopped:
                # Rank 0 wrote its checkpoint in on_epoch_end, or AgreeOnFailures
                # stopped every rank with the failure.
                raise Stopped(f"stopped at step {int(self.model.optimizer.iterations.numpy())} "
                              f"({self.request.signal_name or 'another rank was signalled'}); checkpoint written")
        check_replicas_agree(ctx, self.model)
        self.validated.update(validation.results)
        return history

    def _fit(self, ctx: DistContext, outputs, callbacks: list, start_step: int, initial: int, end: int,
             steps: int) -> dict:
        """One `fit` call of fit_phases; a damaged shard surfaces as an error that names it."""
        spe, spec = self.steps_per_epoch, self.spec
        # The phase's first step, from the schedule of phases: not from the
        # optimizer, whose step counter reaches ranks other than 0 only
        # with the broadcast at the start of fit.
        first_step = initial * spe + (spe - steps)
        try:
            dataset = train_dataset(self.cfg, spec, ctx, self.global_batch // ctx.size, first_step, self.skipped)
            if first_step == start_step:
                counted = int(self.skipped.numpy())
                outputs.write_input_sample(dataset, first_step + 1)
                self.skipped.assign(counted)  # the sample is read again in training: count it there
            return self.model.fit(
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

    def evaluated_weights(self) -> EvaluatedWeights:
        return EvaluatedWeights(self.model, self.cfg.train.ema_evaluate)

    def evaluator(self, ctx: DistContext):
        # The micro-batch: evaluation keeps no gradients, but its memory should not exceed training's.
        return make_evaluator(self.cfg, self.spec, ctx, self.cfg.data.global_batch_size // ctx.size)

    def finish(self, ctx: DistContext, outputs, history: dict | None) -> dict | None:
        """Validates if needed and writes the summary; returns it on rank 0, None elsewhere.

        `history` is None when there was nothing left to train: the summary of
        the finished run is returned, or written anew if it is missing.
        """
        epochs = self.cfg.train.epochs
        if history is None:
            # Rank 0 reads it; an unreadable one must stop every rank, not leave them waiting.
            summary = on_root(ctx.is_chief, lambda v: ctx.broadcast_object(v, "resume.finished"),
                              outputs.load_summary, CheckpointError)
            # One of an earlier start with fewer epochs is not this run's: its export is of older weights.
            if summary is not None and summary.get("epochs", epochs) >= epochs:
                log.info("run in %s already finished at epoch %d", self.cfg.run_dir, epochs)
                return summary if ctx.is_chief else None
            # Training finished but its summary was never written: the weights restored on rank 0
            # are evaluated again on every rank below, unless their checkpoint recorded the validation.
            ctx.broadcast_variables(self.model.variables, "eval.model")
            ctx.broadcast_variables(averages(self.model.optimizer), "eval.average")
            history = {}
        # Validation, the summary and the export see the same weights (the average with train.ema).
        with self.evaluated_weights().swapped() as weights:
            # The last epoch is always validated in fit, unless a stop cut it short,
            # or the run was stopped on its last step: its checkpoint recorded the validation.
            val = self.validated.get(epochs)
            if val is None:
                # The final weights' statistics, as the last epoch's validation would have had them.
                self.precise_bn.maybe_run(self.model, ctx, epochs * self.steps_per_epoch)
                val = self.evaluator(ctx).evaluate(self.model)
            summary = {**self.summary(ctx, history, val), "evaluated_weights": weights.name}
            logged = epochs in self.validated or self.logged_final
            return outputs.finish(self.model, summary, log_validation=not logged)

    def summary(self, ctx: DistContext, history: dict, val: dict) -> dict:
        """The run's summary.json: final validation, throughput and sizes."""
        rates = history.get("images_per_sec", [])
        return {
            **validation_metrics(val),
            "val_examples": val["examples"],
            "epochs": self.cfg.train.epochs,
            "epochs_this_start": len(rates),
            "world_size": ctx.size,
            "global_batch_size": self.global_batch,
            "per_replica_batch_size": self.global_batch // ctx.size,
            "steps_per_epoch": self.steps_per_epoch,
            # The first epoch of a start includes graph tracing; leave it out when there are others.
            "images_per_sec": statistics.median(rates[1:] or rates) if rates else None,
            "train_loss": history["loss"][-1] if history else None,
            "train_accuracy": history["accuracy"][-1] if history else None,
            "model": self.cfg.model.name,
            "precision": self.model.dtype_policy.name,  # train.precision as resolved (`auto`: alike on every rank)
            "wall_time_sec": round(time.time() - self.started, 2),
        }


def check_replicas_agree(ctx: DistContext, model) -> None:
    """Fails loudly if the ranks' models differ after training (they must not)."""
    average = averages(model.optimizer)
    if average:
        log.debug("EMA weights after training: %s", weights_digest(average))
    digest = weights_digest([*model.variables, *average])
    log.debug("weights after training: %s", digest)
    digests = ctx.allgather_object(digest, "final.digest")
    if len(set(digests)) != 1:
        raise RuntimeError(f"replicas diverged: weight digests by rank {digests}")

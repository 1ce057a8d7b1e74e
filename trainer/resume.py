"""Resuming: the checkpoint rank 0 restores, the step every rank continues at, and the fit calls from there."""

import logging

from data_pipeline.collective import on_root
from trainer.checkpoint import CheckpointError
from trainer.config import ConfigError, ExperimentConfig
from trainer.distributed import DistContext
from trainer.initial_weights import InitialWeightsError, start_from

log = logging.getLogger(__name__)


def broadcast_restore(ctx: DistContext, restore) -> dict | None:
    """Runs `restore` (which loads a checkpoint) on rank 0 only; every rank gets its state or its error."""
    return on_root(ctx.is_chief, lambda v: ctx.broadcast_object(v, "resume.state"), restore, CheckpointError)


def resume_state(ctx: DistContext, cfg: ExperimentConfig, outputs, model, signature: dict) -> dict | None:
    """Rank 0 restores the latest checkpoint; every rank gets its state.json (or its error).

    Without a checkpoint, rank 0 loads model.initial_weights instead (the
    start of fit broadcasts rank 0's weights to the others).
    """
    def restore():
        state = outputs.restore_latest(model, signature) if cfg.train.resume else None
        if state is None and cfg.model.initial_weights:
            start_from(model, cfg.model.initial_weights)
        return state

    return on_root(ctx.is_chief, lambda v: ctx.broadcast_object(v, "resume.state"), restore, CheckpointError,
                   catch=(InitialWeightsError, ConfigError))


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

"""Elastic training: workers may leave or join while the run goes on (horovodrun --min-np/--max-np).

Horovod's `hvd.elastic.run` re-enters a training function after every change
of the worker set: on a failed collective (a worker died) each survivor first
rolls back to the last commit; on a host change announced by the driver,
every worker leaves at the same commit. Horovod then re-initialises (new
ranks, new size), rank 0 broadcasts the committed state, and training goes on.

Horovod's `hvd.elastic.KerasState` reads Keras 2 internals (`optimizer.variables()`
as a method, `model.get_weights`), so `KerasState` below holds a Keras 3 model
and optimizer instead.

Collectives must not run before the elastic function: a worker that joins
later would enter them while the others are in `state.sync()`. The resume
from a checkpoint therefore happens inside the function, once, and the flag
that says so travels with the synced state.
"""

import logging

import horovod.tensorflow as hvd
import keras
import tensorflow as tf
from horovod.common.elastic import ObjectState, run_fn
from horovod.common.exceptions import HorovodInternalError

from trainer.config import ConfigError
from trainer.distributed import collective_failed

log = logging.getLogger(__name__)


class KerasState(ObjectState):
    """The committed state of a Keras 3 model and its optimizer, plus plain counters.

    `save` copies every model variable (weights, BatchNorm statistics,
    random-generator states) and every optimizer variable (slots and the step
    counter that positions the schedule) to host memory; `restore` assigns
    them back; `sync` broadcasts rank 0's values to all ranks. Keyword
    arguments become attributes that are committed and synced with them.
    """

    def __init__(self, model: keras.Model, ctx, **counters):
        self.model = model
        self.ctx = ctx
        self._saved: list = []
        self._save_variables()
        super().__init__(
            bcast_object=lambda obj: ctx.broadcast_object(obj, "elastic.state"), get_rank=hvd.rank, **counters
        )

    def _variables(self) -> list:
        return [*self.model.variables, *self.model.optimizer.variables]

    def _save_variables(self) -> None:
        self._saved = [v.numpy().copy() for v in self._variables()]

    def save(self):
        self._save_variables()
        super().save()

    def restore(self):
        for v, value in zip(self._variables(), self._saved):
            v.assign(value)
        super().restore()

    def sync(self):
        self.ctx.broadcast_variables(self._variables(), "elastic.sync")
        self._save_variables()
        super().sync()

    def reset(self):
        # Horovod was re-initialised: the world size and this worker's rank may have changed.
        old = self.ctx
        self.ctx = old.refreshed()
        log.warning("elastic reset: world size %d -> %d, this worker rank %d -> %d",
                    old.size, self.ctx.size, old.rank, self.ctx.rank)


class CommitState(keras.callbacks.Callback):
    """Commits the state at every epoch end and every `every_steps` steps, and checks for host changes.

    Must be the last callback: a host change raises out of `commit`, and the
    epoch's checkpoint and logs must be written before that.
    """

    def __init__(self, state: KerasState, steps_per_epoch: int, every_steps: int = 0):
        super().__init__()
        self.state = state
        self.steps_per_epoch = steps_per_epoch
        self.every_steps = every_steps

    def _commit(self) -> None:
        step = int(self.model.optimizer.iterations.numpy())
        self.state.epoch, self.state.batch = divmod(step, self.steps_per_epoch)
        self.state.commit()

    def on_train_batch_end(self, batch, logs=None):
        if not self.every_steps:
            return  # commits at epoch ends only: no device read per step
        step = int(self.model.optimizer.iterations.numpy())
        if step % self.every_steps == 0 and step % self.steps_per_epoch:
            self._commit()

    def on_epoch_end(self, epoch, logs=None):
        self._commit()


def _reset() -> None:
    hvd.shutdown()
    hvd.init()


def run(func):
    """`hvd.elastic.run` for functions whose collectives run inside Keras' traced train step.

    horovod.tensorflow.elastic.run turns only an UnknownError naming
    HorovodAllreduce/Allgather/Broadcast into a HorovodInternalError (roll back
    and reset); the gradient exchange here is a HorovodGroupedAllreduce, and a
    lost peer can surface as other error classes, so any TensorFlow op error
    raised by a Horovod op counts.
    """

    def wrapper(state, *args, **kwargs):
        try:
            return func(state, *args, **kwargs)
        except tf.errors.OpError as e:
            if not collective_failed(e):
                raise
            log.warning("collective failed (a worker left?): %s", e.message.strip().splitlines()[0])
            raise HorovodInternalError(e) from e

    return run_fn(wrapper, _reset)


def check_precision(synced: str, mine: str, configured: str) -> None:
    """Refuses a worker whose precision is not rank 0's (`synced`, from the state): ranks must compute alike.

    Elastic workers resolve train.precision `auto` each for its own device
    (no collective may run before the elastic function); a worker on other
    hardware ends here, with the reason, instead of training apart.
    """
    if synced != mine:
        raise ConfigError(f"train.precision={configured}: this worker's device gives {mine}, rank 0's {synced}; "
                          "elastic workers must agree: set train.precision explicitly")


def train(ctx, training, commit_steps: int = 0):
    """Runs `training`, a trainer.runner.TrainingRun, under Horovod elastic; returns (context, outputs, history).

    The context and outputs returned are those of the final worker set.

    Each attempt takes `training.make_outputs(ctx)`, the writer for this
    worker's rank, which may change on reset. `training.resume(ctx, outputs)`
    gives the global step to start at (collective, run once per job);
    `training.train(ctx, outputs, start_step, extra_callbacks)` trains to the
    end and returns the history since the last reset, or None when there was
    nothing to train. The state is committed every `commit_steps` steps
    (0: at epoch ends only).
    """
    spe = training.steps_per_epoch
    state = KerasState(training.model, ctx, epoch=0, batch=0, resumed=False, precision=training.precision)

    @run
    def attempt(state: KerasState):
        ctx = state.ctx
        check_precision(state.precision, training.precision, training.cfg.train.precision)
        outputs = training.make_outputs(ctx)
        if not state.resumed:
            state.epoch, state.batch = divmod(training.resume(ctx, outputs), spe)
            state.resumed = True
        start = state.epoch * spe + state.batch
        log.info("elastic: world size %d, rank %d, continuing at epoch %d step %d (global step %d)",
                 ctx.size, ctx.rank, state.epoch + 1, state.batch, start)
        return ctx, outputs, training.train(ctx, outputs, start, [CommitState(state, spe, commit_steps)])

    return attempt(state)

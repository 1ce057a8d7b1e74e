"""What ends a run on every rank at one step besides a signal: a failed write, or non-finite training.

Rank 0 alone writes the run's files (trainer.outputs), so only rank 0 learns
that a write failed (a full disk, a quota, permissions). WriteGuard records
the first failure and lets nothing more be written; the failure raises rank
0's stop flag (trainer.preemption), which rides the next step's allreduce, so
a failure within an epoch ends that epoch on every rank at the same step. At
every epoch end (AgreeOnFailures), and once at the end of the run, every rank
joins one small allreduce (`RunFailures.agree`) that tells the others: all
ranks then leave with WriteFailed (exit code 74), and rank 0 says in one line
which file, which errno, and which checkpoint is the newest good one.

Non-finite training needs no collective of its own: the train step
(trainer.step) returns whether the loss averaged over ranks, or any weight,
is not finite, values every rank has alike. With train.stop_on_nonfinite,
StopOnNonFinite ends the epoch at that step on every rank; no checkpoint is
written of it, and every rank leaves with Diverged (exit code 3). Under
mixed_float16 an overflowing gradient alone is a skipped step (see
trainer.step), not a divergence.
"""

import errno
import logging
import os
import re

import keras
import tensorflow as tf

from trainer.checkpoint_guard import nonfinite_variable

log = logging.getLogger(__name__)

# The batch-log key of the step's verdict (trainer.step), and what its codes say.
NONFINITE_LOG = "nonfinite"
_LOSS_NAN, _LOSS_INF, _WEIGHTS = 1.0, 2.0, 3.0
_VERDICTS = {_LOSS_NAN: "the loss is nan", _LOSS_INF: "the loss is inf", _WEIGHTS: "the weights are not finite"}
# What a failed write raises: OSError from Python's, NumPy's and h5py's writers, OpError from TensorFlow's.
WRITE_ERRORS = (OSError, tf.errors.OpError)


class WriteFailed(Exception):
    """A write of the run failed and every rank stopped. str(e): rank 0's one line, empty on the others."""


class Diverged(Exception):
    """The loss or the weights became non-finite and every rank stopped. str(e): rank 0's one line, else empty."""


def nonfinite_code(loss, values) -> tf.Tensor:
    """In the graph: 0.0 when `loss` and every tensor of `values` are finite, else a key of _VERDICTS (loss first)."""
    weights_finite = tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(v)) for v in values]))
    weights = tf.where(weights_finite, 0.0, _WEIGHTS)
    return tf.where(tf.math.is_nan(loss), _LOSS_NAN, tf.where(tf.math.is_inf(loss), _LOSS_INF, weights))


def describe_write_error(error: BaseException, path: str = "") -> str:
    """One line: `cannot write PATH: No space left on device (errno 28, ENOSPC)`.

    From an OSError, or from a TensorFlow error, whose first line reads
    `{{function_node ...}} PATH; No space left on device [Op:...]`: the errno
    is found again from its text. `path` names the file when the error does not.
    """
    if isinstance(error, OSError):
        number, where, reason = error.errno, error.filename or path, error.strerror or str(error)
    else:
        text = (str(getattr(error, "message", "") or error).strip().splitlines() or [""])[0]
        text = re.sub(r"^\{\{.*?\}\}\s*|\s*\[Op:\w+\]$", "", text)
        where, _, reason = text.rpartition("; ") if "; " in text else (path, "", text)
        number = next((n for n in sorted(errno.errorcode) if os.strerror(n) == reason), None)
    code = f" (errno {number}, {errno.errorcode.get(number, '?')})" if number else ""
    return f"cannot write {os.fsdecode(where)}: {reason}{code}" if where else f"a write failed: {reason}{code}"


class RunFailures:
    """This rank's first failed write and its non-finite verdict; `agree` makes them every rank's.

    Args:
      request: the run's trainer.preemption.StopRequest; a failed write raises
        its flag, so every rank stops at the next step.
      stop_on_nonfinite: train.stop_on_nonfinite.
    """

    def __init__(self, request, stop_on_nonfinite: bool = True):
        self.request = request
        self.stop_on_nonfinite = stop_on_nonfinite
        self.write: str | None = None  # the first failed write, described
        self.nonfinite: str | None = None  # e.g. "the loss is nan at step 37"

    def record_write(self, error: BaseException, path: str = "") -> None:
        """Keeps the first failure (later ones follow from it) and asks every rank to stop."""
        if self.write is None:
            self.write = describe_write_error(error, path)
            log.debug("write failed: %s", self.write)
            self.request.local.assign(1.0)

    def record_nonfinite(self, what: str, step: int) -> None:
        if self.nonfinite is None:
            self.nonfinite = f"{what} at step {step}"

    def agree(self, ctx, checkpoints, model, name: str) -> None:
        """Collective: raises Diverged (first) or WriteFailed on every rank when any rank recorded one.

        `checkpoints` (a trainer.checkpoint.CheckpointManager) names the newest good checkpoint on rank 0.
        """
        found = ctx.max_scalars({"nonfinite": float(self.nonfinite is not None),
                                 "write": float(self.write is not None)}, name)
        if not any(found.values()):
            return
        step = int(model.optimizer.iterations.numpy())
        log.debug("stopping at step %d: %s", step, self.nonfinite or self.write or "rank 0 could not write")
        newest = (checkpoints.latest() or "none") if ctx.is_chief else ""
        if found["nonfinite"]:
            # Rank 0 alone knows of a refused checkpoint; every rank knows of a step's verdict.
            raise Diverged(f"{self.nonfinite or 'not finite'}; every rank stopped there (train.stop_on_nonfinite); "
                           f"newest checkpoint: {newest}" if ctx.is_chief else "")
        signal = f" ({self.request.signal_name}: the checkpoint of that stop was not written)" \
            if self.request.signal_name else ""
        raise WriteFailed(f"{self.write}; every rank stopped at step {step}{signal}; "
                          f"newest good checkpoint: {newest}" if ctx.is_chief else "")


class WriteGuard(keras.callbacks.Callback):
    """Rank 0's writing callbacks, run in order until one write fails; that failure is recorded, not raised.

    After it nothing more is written: the disk that failed one write would
    most likely fail the next, and the run is stopping anyway.
    """

    def __init__(self, failures: RunFailures, callbacks):
        super().__init__()
        self.failures = failures
        self.callbacks = list(callbacks)

    def set_model(self, model):
        super().set_model(model)
        for callback in self.callbacks:
            callback.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        for callback in self.callbacks:
            callback.set_params(params)

    def _each(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            if self.failures.write is not None:
                return
            try:
                getattr(callback, hook)(*args)
            except WRITE_ERRORS as e:
                self.failures.record_write(e)

    def on_train_begin(self, logs=None):
        self._each("on_train_begin", logs)

    def on_train_end(self, logs=None):
        self._each("on_train_end", logs)

    def on_epoch_begin(self, epoch, logs=None):
        self._each("on_epoch_begin", epoch, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._each("on_epoch_end", epoch, logs)

    def on_train_batch_begin(self, batch, logs=None):
        self._each("on_train_batch_begin", batch, logs)

    def on_train_batch_end(self, batch, logs=None):
        self._each("on_train_batch_end", batch, logs)


class StopOnNonFinite(keras.callbacks.Callback):
    """Ends the epoch, on every rank, at the step whose loss or weights are not finite (train.stop_on_nonfinite).

    Reads the step's verdict from its batch logs (NONFINITE_LOG, the same on
    every rank) and takes it out of them, so that no other callback logs it.
    The step and, for weights, the first non-finite variable are read from
    the device only then.
    """

    def __init__(self, failures: RunFailures):
        super().__init__()
        self.failures = failures

    def on_train_batch_end(self, batch, logs=None):
        code = float((logs or {}).pop(NONFINITE_LOG, 0.0))
        if not code or self.failures.nonfinite is not None:
            return
        what = _VERDICTS.get(code, "not finite")
        if code == _WEIGHTS:
            what += f" ({nonfinite_variable(self.model.variables)})"
        self.failures.record_nonfinite(what, int(self.model.optimizer.iterations.numpy()))
        self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.pop(NONFINITE_LOG, None)  # Keras's epoch logs are the last step's


class AgreeOnFailures(keras.callbacks.Callback):
    """RunFailures.agree at every epoch end, on every rank: after every callback that writes, before commits."""

    def __init__(self, ctx, failures: RunFailures, checkpoints):
        super().__init__()
        self.ctx = ctx
        self.failures = failures
        self.checkpoints = checkpoints

    def on_epoch_end(self, epoch, logs=None):
        self.failures.agree(self.ctx, self.checkpoints, self.model, "failures.epoch")

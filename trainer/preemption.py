"""Stopping on SIGTERM/SIGINT at a step boundary that every rank agrees on.

Slurm sends SIGTERM before it kills a preempted or timed-out job, and
horovodrun passes SIGTERM to every worker when it is interrupted; under
mpirun the launcher sends SIGUSR2 instead, which mpirun passes straight on
(it would answer SIGTERM by killing the ranks 2 s later, see
launch.command.stop_plan). A rank that gets one only raises a flag; the flag travels with the next gradient allreduce
(trainer.step), so all ranks learn of it at the same step and stop there
together. Stopping at different steps would leave some ranks waiting forever in
a collective that the others never join.

The run then writes a checkpoint, waits for it on every rank, and exits with
EXIT_STOPPED (trainer.exit_codes); the next start resumes from that checkpoint.
"""

import logging
import signal

import keras
import tensorflow as tf

log = logging.getLogger(__name__)

# The batch-log key under which the train step returns the agreed flag: Keras
# fetches the step's logs anyway, so the host learns of a stop without a
# device read of its own every step.
STOP_LOG = "stop"

# The first stop signal this process received (its name), or None: the runner's
# SIGTERM can arrive while a failed collective is still being raised, and
# trainer.train must then exit at once, not wait for a second one.
_first_signal: str | None = None


def signal_received() -> str | None:
    """The name of the first stop signal this process received, or None."""
    return _first_signal


class StopRequest:
    """A per-process stop flag, and the flag agreed by all ranks at the last step."""

    def __init__(self):
        self.local = tf.Variable(0.0, trainable=False, dtype=tf.float32, name="stop_local")
        self.agreed = tf.Variable(0.0, trainable=False, dtype=tf.float32, name="stop_agreed")
        self.signal_name: str | None = None
        # Whether the stop ended its epoch before the epoch's last step (set by StopOnRequest).
        self.cut_short = True

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        global _first_signal
        name = signal.Signals(signum).name
        _first_signal = _first_signal or name
        self.ask(name)

    def ask(self, reason: str) -> None:
        """Raises this rank's flag; every rank stops after the step that carries it."""
        if self.signal_name is None:
            self.signal_name = reason
            log.warning("received %s: stopping at the next step boundary", reason)
        self.local.assign(1.0)

    @property
    def stopped(self) -> bool:
        """The agreed flag of the last step; a device read, for once per `fit`, not per step."""
        return float(self.agreed.numpy()) > 0


class StopOnRequest(keras.callbacks.Callback):
    """Ends `fit` after the step at which any rank asked to stop.

    Reads the agreed flag from the step's batch logs (STOP_LOG) and takes it
    out of them, so that no other callback logs it. `stop_after_step`
    (runtime.fault_stop_after_step, for tests) raises the flag just before
    that global step, which then carries it; the step is counted on the host
    from the epoch's first, read once per epoch.
    """

    def __init__(self, request: StopRequest, stop_after_step: int = 0):
        super().__init__()
        self.request = request
        self.stop_after_step = stop_after_step
        self._epoch_start = 0

    def on_epoch_begin(self, epoch, logs=None):
        if self.stop_after_step:
            self._epoch_start = int(self.model.optimizer.iterations.numpy())

    def on_train_batch_begin(self, batch, logs=None):
        if self.stop_after_step and self._epoch_start + batch + 1 == self.stop_after_step:
            self.request.ask("runtime.fault_stop_after_step")

    def on_train_batch_end(self, batch, logs=None):
        if float((logs or {}).pop(STOP_LOG, 0.0)) > 0:
            self.model.stop_training = True
            self.request.cut_short = batch + 1 < (self.params or {}).get("steps", 0)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.pop(STOP_LOG, None)  # Keras's epoch logs are the last step's


def epoch_cut_short(model) -> bool:
    """Whether the epoch that just ended was cut short by a stop, its weights mid-epoch.

    A stop on the epoch's last step completes the epoch: it is validated and
    logged as any other, since the resumed run starts at the next one. The
    flag is agreed, and the step counts are equal, so all ranks see the same.
    """
    request = getattr(model, "stop_request", None)
    return bool(model.stop_training and (request is None or request.cut_short))


class Stopped(Exception):
    """Training stopped on request at an agreed step, after the checkpoint was written."""

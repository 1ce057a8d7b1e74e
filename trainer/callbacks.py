"""Keras callbacks, one job each.

Those that run collectives (broadcast, state sync, metric averaging) are on
every rank and must stay in the same order on all of them. Those that write
files are given to rank 0 only, by trainer.outputs.
"""

import json
import logging
import os
import socket
import statistics
import sys
import time

import keras
import numpy as np

from trainer.checkpoint import NonFiniteState
from trainer.console import format_epoch_line, format_progress

log = logging.getLogger(__name__)


class BroadcastInitialState(keras.callbacks.Callback):
    """Starts every rank from rank 0's model and optimizer state.

    Ranks initialise (or restore) their variables independently; without this,
    identical gradient updates would be applied to different weights.
    """

    def __init__(self, ctx):
        super().__init__()
        self.ctx = ctx

    def on_train_begin(self, logs=None):
        optimizer = self.model.optimizer
        if not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        self.ctx.broadcast_variables(self.model.variables, "init.model")
        self.ctx.broadcast_variables(optimizer.variables, "init.optimizer")


class EpochTimer(keras.callbacks.Callback):
    """Adds epoch time, images/sec and the current learning rate to the epoch logs.

    Counts the optimizer steps actually taken, so an epoch cut short by a stop
    request is measured right too.
    """

    def __init__(self, global_batch_size: int):
        super().__init__()
        self.global_batch_size = global_batch_size
        self._start = 0.0
        self._start_step = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()
        self._start_step = int(self.model.optimizer.iterations.numpy())

    def on_epoch_end(self, epoch, logs=None):
        elapsed = time.perf_counter() - self._start
        steps = int(self.model.optimizer.iterations.numpy()) - self._start_step
        logs["epoch_time_sec"] = elapsed
        logs["images_per_sec"] = steps * self.global_batch_size / elapsed
        logs["learning_rate"] = float(np.asarray(self.model.optimizer.learning_rate))


class StepTimer(keras.callbacks.Callback):
    """Wall time of each step on this rank, and every rank's figures per epoch.

    A step lasts from the end of the previous one (or the start of the epoch)
    to the end of this one: compute, allreduce, input wait and callbacks, which
    is what a slow rank costs all the others. With steps_per_execution > 1,
    Keras reports once per execution, and the time is split evenly over its
    steps. Host clock only: no device reads.

    Adds `step_time_sec` and `images_per_sec` of the last step to the batch
    logs (for callbacks after it), and this rank's mean `step_time_sec` to the
    epoch logs (AverageMetrics must come after it). At each epoch's end every
    rank's figures, with the epoch means of batch-log keys starting with
    `input_wait`, are gathered into `per_rank` (a list ordered by rank).
    """

    def __init__(self, ctx, global_batch_size: int):
        super().__init__()
        self.ctx = ctx
        self.global_batch_size = global_batch_size
        self.per_rank: list[dict] = []
        self._times: list[float] = []
        self._waits: dict[str, list[float]] = {}
        self._last_end = 0.0
        self._last_batch = -1

    def on_epoch_begin(self, epoch, logs=None):
        self._times, self._waits = [], {}
        self._last_end, self._last_batch = time.perf_counter(), -1

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        steps = max(batch - self._last_batch, 1)
        per_step = (now - self._last_end) / steps
        self._last_end, self._last_batch = now, batch
        self._times.extend([per_step] * steps)
        if logs is None:
            return
        logs["step_time_sec"] = per_step
        logs["images_per_sec"] = self.global_batch_size / per_step
        for key, value in logs.items():
            if key.startswith("input_wait") and np.ndim(value) == 0:
                self._waits.setdefault(key, []).append(float(value))

    def on_epoch_end(self, epoch, logs=None):
        times = self._times or [0.0]
        mine = {
            "host": socket.gethostname(), "steps": len(self._times), "step_time_mean_sec": statistics.fmean(times),
            "step_time_median_sec": statistics.median(times), "step_time_max_sec": max(times),
            **{f"{k}_mean": statistics.fmean(v) for k, v in sorted(self._waits.items())},
        }
        # Every rank joins this gather at every epoch end, stopped early or not.
        self.per_rank = self.ctx.allgather_object(mine, "timing.epoch")
        if logs is not None:
            logs["step_time_sec"] = mine["step_time_mean_sec"]


class AverageMetrics(keras.callbacks.Callback):
    """Replaces each epoch metric with its mean over ranks, so all ranks log the same numbers.

    Must come before any callback that reads the epoch logs.
    """

    def __init__(self, ctx):
        super().__init__()
        self.ctx = ctx

    def on_epoch_end(self, epoch, logs=None):
        numeric = {k: float(v) for k, v in logs.items() if np.ndim(v) == 0}
        logs.update(self.ctx.average_scalars(numeric, "metrics.epoch"))


class EpochLog(keras.callbacks.Callback):
    """Every rank's epoch record as a DEBUG log line, `epoch_metrics {json}`.

    Shown only with runtime.log_all_ranks, where it lets ranks be compared
    (AverageMetrics makes them equal); rank 0's records also go to
    RUN_DIR/metrics.jsonl (MetricsFile), which is what programs should read.
    """

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def on_epoch_end(self, epoch, logs=None):
        record = {"epoch": epoch + 1, "rank": self.rank, **{k: float(v) for k, v in sorted(logs.items())}}
        log.debug("epoch_metrics %s", json.dumps(record))


class MetricsFile(keras.callbacks.Callback):
    """Appends one JSON object per epoch to a JSONL file: `{"epoch": N, <every epoch log>}`.

    Opened and closed at each epoch so that every record is on disk before the
    next epoch starts. An epoch cut short by a stop gets its record too; a
    resumed run appends after the records it keeps (ChiefOutputs.keep_records),
    so the file holds one record per epoch, as TensorBoard shows one value per step.
    A failed append (a full disk) is cut off again, so that no half line stays,
    and raises an OSError that names the file.
    """

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def on_epoch_end(self, epoch, logs=None):
        record = {"epoch": epoch + 1, **{k: float(v) for k, v in sorted((logs or {}).items()) if np.ndim(v) == 0}}
        # Unbuffered: a write that fails fails here, not again when the file is closed.
        with open(self.path, "ab", buffering=0) as f:
            end = f.seek(0, os.SEEK_END)
            line = memoryview((json.dumps(record) + "\n").encode())
            try:
                while line:  # a raw write may write a part, and fail only at the next
                    line = line[f.write(line):]
            except OSError as e:
                f.truncate(end)
                raise OSError(e.errno, e.strerror, self.path) from e


class EpochLine(keras.callbacks.Callback):
    """Prints the person's line per epoch on stdout (see trainer.console.format_epoch_line)."""

    def __init__(self, epochs: int, stream=None, evaluated: str = ""):
        super().__init__()
        self.epochs, self.stream, self.evaluated = epochs, stream, evaluated  # evaluated: "EMA weights" (train.ema)

    def on_epoch_end(self, epoch, logs=None):
        print(format_epoch_line(epoch + 1, self.epochs, logs or {}, self.evaluated), file=self.stream or sys.stdout,
              flush=True)


class ProgressBar(keras.callbacks.Callback):
    """A progress bar on stdout, redrawn at most every `interval` seconds.

    Each drawing ends in a carriage return, not a newline: horovodrun forwards
    a worker's output at either, so the launcher receives every redraw at once.
    """

    def __init__(self, epochs: int, interval: float = 0.1, stream=None):
        super().__init__()
        self.epochs = epochs
        self.interval = interval
        self.stream = stream
        self._epoch, self._last = 0, 0.0

    def _write(self, text: str) -> None:
        stream = self.stream or sys.stdout
        stream.write(text)
        stream.flush()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._last = epoch + 1, 0.0

    def on_train_batch_end(self, batch, logs=None):
        steps = (self.params or {}).get("steps") or 0
        now = time.monotonic()
        if now - self._last < self.interval and batch + 1 < steps:
            return
        self._last = now
        loss = (logs or {}).get("loss")
        text = format_progress(self._epoch, self.epochs, batch + 1, steps, None if loss is None else float(loss))
        self._write(text + "\x1b[K\r")  # clear what a longer drawing left, back to the line's start

    def on_epoch_end(self, epoch, logs=None):
        self._write("\x1b[K\r")  # the epoch line comes next, on a clean line


class EpochCheckpoint(keras.callbacks.Callback):
    """Writes a checkpoint at the end of every epoch, and of an epoch cut short by a stop.

    A failed write raises an OSError (trainer.failures.WriteGuard records it,
    and every rank stops). `failures` is the run's trainer.failures.RunFailures:
    after a non-finite step nothing is written, so that the newest checkpoint
    stays the last finite one; weights that are not finite are refused by the
    save itself, which stops the run too with train.stop_on_nonfinite, and is
    a warning (training goes on) without.
    """

    def __init__(self, manager, state_fn, failures):
        super().__init__()
        self.manager = manager
        self.state_fn = state_fn
        self.failures = failures

    def on_epoch_end(self, epoch, logs=None):
        if self.failures.nonfinite is not None:
            return
        step = int(self.model.optimizer.iterations.numpy())
        state = self.state_fn(step)
        validation = {k: float(v) for k, v in (logs or {}).items() if k.startswith("val_")}
        if validation:  # this epoch was validated: what picks the best checkpoint
            state["validation"] = validation
        try:
            path = self.manager.save(self.model, state)
        except NonFiniteState as e:
            if self.failures.stop_on_nonfinite:
                self.failures.record_nonfinite(f"{e} (checkpoint refused)", step)
            else:
                log.warning("checkpoint at step %d not written: %s; training goes on (train.stop_on_nonfinite: "
                            "false), the newest checkpoint is %s", step, e, self.manager.latest() or "none")
            return
        log.debug("checkpoint written: %s", path)

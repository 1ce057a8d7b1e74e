"""TensorBoard summaries, written by rank 0 only (trainer.outputs hands them out).

All of them share one writer for run_dir/tensorboard/train, so a start adds
one event file there. Scalars of epochs are against the epoch number; scalars
under `step/` are against the global optimizer step.
"""

import logging
import math

import keras
import numpy as np
import tensorflow as tf

from trainer.preemption import epoch_cut_short

log = logging.getLogger(__name__)


class EpochScalars(keras.callbacks.Callback):
    """Every numeric epoch log (loss, accuracy, learning rate, images/sec, step and epoch time).

    `val_x` goes to `val_log_dir` as `x`, so TensorBoard draws the training and
    validation curves of one metric in one chart (as keras.callbacks.TensorBoard does).
    """

    def __init__(self, writer, val_log_dir: str):
        super().__init__()
        self.writer = writer
        self.val_log_dir = val_log_dir
        self._val_writer = None

    def on_epoch_end(self, epoch, logs=None):
        if epoch_cut_short(self.model):
            return  # an epoch cut short by a stop: logged when the resumed run completes it
        scalars = {k: float(v) for k, v in logs.items() if np.ndim(v) == 0}
        val = {k[4:]: v for k, v in scalars.items() if k.startswith("val_") and k != "val_examples"}
        if val and self._val_writer is None:
            self._val_writer = tf.summary.create_file_writer(self.val_log_dir)
        train = {k: v for k, v in scalars.items() if not k.startswith("val_")}
        for writer, values in ((self.writer, train), (self._val_writer, val)):
            if values:
                with writer.as_default(step=epoch + 1):
                    for key, value in sorted(values.items()):
                        tf.summary.scalar(key, value)
                writer.flush()

    def on_train_end(self, logs=None):
        if self._val_writer is not None:
            self._val_writer.close()
            self._val_writer = None


class GlobalStep(keras.callbacks.Callback):
    """The global optimizer step, counted on the host.

    Read from the optimizer once per fit, after the initial broadcast (which is
    why it must come after BroadcastInitialState), then counted from Keras'
    batch indices, so per-step callbacks need no device read.
    """

    def __init__(self):
        super().__init__()
        self.value = 0
        self.upcoming = 1  # the step the batch being run will complete
        self._epoch_start = 0

    def on_train_begin(self, logs=None):
        self.value = int(self.model.optimizer.iterations.numpy())

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = self.value

    def on_train_batch_begin(self, batch, logs=None):
        self.upcoming = self._epoch_start + batch + 1

    def on_train_batch_end(self, batch, logs=None):
        # `batch` is the last step of the execution (Keras' end_step).
        self.value = self._epoch_start + batch + 1


class StepScalars(keras.callbacks.Callback):
    """Every `frequency` steps: each numeric batch log under `step/`, and the learning rate.

    Keras has already turned the batch logs into Python numbers by then, and
    the learning rate is computed and written inside one compiled function,
    so writing costs no device sync and few op dispatches (eager summary ops
    would cost milliseconds per written step). loss and accuracy are Keras'
    running means over the epoch so far, on rank 0's part of the batch.
    """

    def __init__(self, writer, global_step: GlobalStep, frequency: int):
        super().__init__()
        self.writer = writer
        self.global_step = global_step
        self.frequency = frequency
        self._last = 0
        self._write = tf.function(self._write_eager)

    def on_train_begin(self, logs=None):
        self._last = self.global_step.value

    def on_train_batch_end(self, batch, logs=None):
        step = self.global_step.value
        # `//` rather than `%`: with steps_per_execution > 1 the step count jumps.
        if step // self.frequency == self._last // self.frequency:
            return
        self._last = step
        items = sorted((k, float(v)) for k, v in (logs or {}).items() if np.ndim(v) == 0)
        # The keys are part of the function's signature: it is traced again only when they change.
        self._write(tf.constant(step, tf.int64), tf.constant([v for _, v in items], tf.float32),
                    tuple(k for k, _ in items))

    def _write_eager(self, step, values, keys):
        with self.writer.as_default(step=step):
            for i, key in enumerate(keys):
                tf.summary.scalar(f"step/{key}", values[i])
            tf.summary.scalar("step/learning_rate", self.model.optimizer.learning_rate)


class RankTiming(keras.callbacks.Callback):
    """Every rank's step times per epoch, from StepTimer.per_rank, so a straggler stands out.

    Writes `rank_timing/<figure>/rank_<r>` scalars, the slowest rank and its
    mean step time over the median of all ranks' means
    (`rank_timing/straggler_ratio`), and a table as text (`rank_timing/table`).
    """

    def __init__(self, writer, timer):
        super().__init__()
        self.writer = writer
        self.timer = timer

    def on_epoch_end(self, epoch, logs=None):
        rows = self.timer.per_rank
        if epoch_cut_short(self.model) or not rows:
            return
        width = len(str(len(rows) - 1))
        means = [r["step_time_mean_sec"] for r in rows]
        slowest = int(np.argmax(means))
        with self.writer.as_default(step=epoch + 1):
            for rank, row in enumerate(rows):
                for key, value in sorted(row.items()):
                    if key not in ("host", "steps"):
                        tf.summary.scalar(f"rank_timing/{key}/rank_{rank:0{width}d}", value)
            tf.summary.scalar("rank_timing/slowest_rank", slowest)
            tf.summary.scalar("rank_timing/straggler_ratio", means[slowest] / max(float(np.median(means)), 1e-12))
            tf.summary.text("rank_timing/table", timing_table(rows))
        self.writer.flush()


def timing_table(rows: list[dict]) -> str:
    """A Markdown table of per-rank figures (those in seconds shown in milliseconds)."""
    keys = [k for k in rows[0] if k not in ("host", "steps")]
    head = ["rank", "host", "steps", *(k.replace("_sec", "_ms") for k in keys)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rank, row in enumerate(rows):
        values = (row.get(k, float("nan")) * (1000 if "_sec" in k else 1) for k in keys)
        cells = [str(rank), row["host"], str(row["steps"]), *(f"{v:.4g}" if v < 1 else f"{v:.2f}" for v in values)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


class WeightHistograms(keras.callbacks.Callback):
    """A histogram of every weight, by its variable path, at the end of each epoch."""

    def __init__(self, writer):
        super().__init__()
        self.writer = writer

    def on_epoch_end(self, epoch, logs=None):
        if epoch_cut_short(self.model):
            return
        with self.writer.as_default(step=epoch + 1):
            for v in self.model.weights:
                tf.summary.histogram(v.path, v.value)
        self.writer.flush()


class ProfileSteps(keras.callbacks.Callback):
    """Traces global steps first..last (inclusive) with the TensorFlow profiler.

    The trace goes to log_dir/plugins/profile/<time>/, where TensorBoard's
    Profile tab looks for it. A profiler that cannot start (one is already
    running in this process) costs the trace, not the run.
    """

    def __init__(self, log_dir: str, global_step: GlobalStep, first: int, last: int):
        super().__init__()
        self.log_dir = log_dir
        self.global_step = global_step
        self.first, self.last = first, last
        self._active = False
        self._done = False  # one trace per start

    def on_train_batch_begin(self, batch, logs=None):
        if self._active or self._done or not self.first <= self.global_step.upcoming <= self.last:
            return
        self._done = True
        try:
            tf.profiler.experimental.start(self.log_dir)
        except tf.errors.OpError as e:
            log.warning("profiler: could not start, no trace: %s", e.message)
            return
        self._active = True
        log.info("profiler: tracing from step %d", self.global_step.upcoming)

    def on_train_batch_end(self, batch, logs=None):
        if self._active and self.global_step.value >= self.last:
            self._stop()

    def on_train_end(self, logs=None):
        if self._active:
            self._stop()

    def _stop(self) -> None:
        tf.profiler.experimental.stop()
        self._active = False
        log.info("profiler: trace up to step %d written under %s", self.global_step.value, self.log_dir)


def image_grid(images: np.ndarray, count: int, min_tile: int = 64) -> np.ndarray:
    """Up to `count` images [N, H, W, C] in [0, 1] tiled row by row into one [1, H', W', C] image.

    Tiles are enlarged (nearest neighbour) to at least `min_tile` pixels, so
    that small inputs (8x8 digits) stay visible, and separated by 2 pixels.
    """
    images = np.asarray(images, dtype=np.float32)[:count]
    n, h, w, c = images.shape
    scale = max(1, math.ceil(min_tile / max(h, w)))
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w, gap = h * scale, w * scale, 2
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.ones((rows * (h + gap) - gap, cols * (w + gap) - gap, c), dtype=np.float32)
    for i, image in enumerate(images):
        r, col = divmod(i, cols)
        grid[r * (h + gap):r * (h + gap) + h, col * (w + gap):col * (w + gap) + w] = image
    return grid[None]


def write_input_sample(writer, dataset, count: int, step: int) -> None:
    """A grid of the first `count` images of the dataset's first batch, with their labels.

    Soft labels (mixup, cutmix) are shown as the class of the most weight, with that weight.
    """
    images, labels = next(iter(dataset.take(1)))
    grid = image_grid(np.clip(images.numpy(), 0.0, 1.0), count)
    labels = labels.numpy()[:count]
    if labels.ndim == 2:
        shown, what = [f"{k}:{row[k]:.2f}" for row, k in zip(labels, labels.argmax(1))], "labels with the most weight"
    else:
        shown, what = labels.tolist(), "labels"
    with writer.as_default(step=step):
        tf.summary.image("input/first_batch", grid, max_outputs=1,
                         description=f"{what}, row by row: {' '.join(str(x) for x in shown)}")
    writer.flush()

"""How long each step waited for its batch, and the warning when a run is input-bound.

The train step times its wait for the batch in the graph (`input_wait` in
the per-step logs); these callbacks turn it into the epoch's figures.
"""

import logging
import statistics
import time

import keras

log = logging.getLogger(__name__)


class InputWait(keras.callbacks.Callback):
    """Replaces the per-step `input_wait` in the epoch logs with the epoch's figures.

    `input_wait` becomes the mean wait per step (seconds) and
    `input_wait_fraction` the share of the epoch's time spent waiting for
    input. The first step of every fit is left out: it builds the iterator and
    fills the buffers, once per start. Must come before AverageMetrics.
    """

    def on_train_begin(self, logs=None):
        self._first_of_fit = True

    def on_epoch_begin(self, epoch, logs=None):
        self._wait, self._steps = 0.0, 0
        self._start = None if self._first_of_fit else time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if self._first_of_fit:
            self._first_of_fit = False
            self._start = time.perf_counter()
            return
        if logs and "input_wait" in logs:
            self._wait += float(logs["input_wait"])
            self._steps += 1

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or "input_wait" not in logs:
            return
        elapsed = time.perf_counter() - self._start if self._start is not None else 0.0
        logs["input_wait"] = self._wait / self._steps if self._steps else 0.0
        logs["input_wait_fraction"] = min(1.0, self._wait / elapsed) if elapsed > 0 else 0.0


class InputBoundWarning(keras.callbacks.Callback):
    """Warns when an epoch spent more than `threshold` of its time waiting for input (ranks averaged).

    Once per fit, at the first such epoch; at the end of the fit one line
    counts them all. Every epoch's share is in the epoch metrics and in
    TensorBoard (input_wait_fraction).
    """

    def __init__(self, threshold: float = 0.1):
        super().__init__()
        self.threshold = threshold

    def on_train_begin(self, logs=None):
        self._epochs, self._bound = 0, []

    def on_epoch_end(self, epoch, logs=None):
        fraction = (logs or {}).get("input_wait_fraction")
        if fraction is None:
            return
        self._epochs += 1
        if fraction > self.threshold:
            self._bound.append(fraction)
            if len(self._bound) == 1:
                log.warning(
                    "epoch %d: input-bound, %.0f%% of the step time was spent waiting for input (averaged over "
                    "ranks); more cores per rank (fewer local ranks), lighter data.augment, or faster storage would "
                    "help; later such epochs are counted at the end of training", epoch + 1, 100 * fraction,
                )

    def on_train_end(self, logs=None):
        if len(self._bound) > 1:
            log.warning("input-bound in %d of %d epochs, waiting %.0f%% of the step time for input at the median "
                        "(input_wait_fraction in the epoch metrics and TensorBoard)",
                        len(self._bound), self._epochs, 100 * statistics.median(self._bound))

"""Precise BatchNorm statistics: each BatchNorm layer's population mean and variance, recomputed from the weights.

BatchNorm layers normalize with the batch's statistics in training, and with
moving averages of them at inference (validation, the export). With momentum
m, after U updates the moving average still gives the weight m**U to its
initial values (mean 0, variance 1), which know nothing of the data: 0.55 for
Keras's m = 0.99 after 60 updates, a small data set's whole run at one step
per epoch, whose export then classifies at chance. And the average trails
weights that are still changing. As pycls (`compute_precise_bn_stats`) and
Detectron2 (`PreciseBN`) do (Wu and Johnson, "Rethinking 'Batch' in
BatchNorm", 2021), `PreciseBatchNorm` recomputes the statistics from the
current weights over a number of training batches and writes them into the
layers, before validation, so the best checkpoint's choice, the checkpoint
and the export all see them.

- Population statistics: every rank runs its batches in training mode (each
  at the training's BatchNorm batch, the per-replica micro-batch); per layer,
  the batches' means and E[x^2] (= variance + mean^2) are summed, weighted by
  their examples, in float64 over batches and then over ranks (one allreduce),
  so the variance is that of all examples together. pycls averages the
  per-batch variances instead, which leaves out the variance of the batch
  means between batches: too small.
- A batch's statistics are read from the layers' own update: with the moving
  statistics set to zero, one training call leaves (1 - m) times them, for
  Keras's layer and trainer.batchnorm's fused one alike, nested or not.
  Layers that training does not update are left alone: frozen ones
  (`trainable` false, fine-tuning), renorm (it keeps statistics of its own),
  momentum 1.
- Nothing else changes: the other non-trainable variables (the dropout seed
  generators) are put back, so training continues as it would have, and the
  data, the training stream's first batches with their augmentation, is read
  by a pipeline of its own (trainer.data.precise_bn_dataset): the training
  stream is neither consumed nor moved. Same examples every time, same
  weights: same statistics, on every rank, and in a resumed run as in an
  uninterrupted one.
"""

import logging
import math
import time

import keras
import numpy as np
import tensorflow as tf

from trainer.evaluation import is_due
from trainer.preemption import epoch_cut_short

log = logging.getLogger(__name__)

# `auto` recomputes while the moving averages give their initial values more
# than this weight (momentum ** updates). The initial values (0 and 1) are not
# on the data's scale, and a variance of 0.01 read as 0.011 already moves the
# normalized output by 5%: one part in a thousand of the initial variance is
# about as much as can be ignored. For Keras's momentum 0.99: 688 updates, about
# 7 time constants 1 / (1 - momentum).
CONVERGED_WEIGHT = 1e-3


def batchnorm_layers(model) -> list:
    """The BatchNorm layers whose moving statistics a training call updates, nested ones too, in a fixed order."""
    # _flatten_layers is how Keras itself walks sublayers: it also finds those
    # inside custom layers, which `layers` does not list.
    found = [layer for layer in model._flatten_layers(include_self=False, recursive=True)  # noqa: SLF001
             if isinstance(layer, keras.layers.BatchNormalization)]
    return [layer for layer in found if layer.trainable and not layer.renorm and layer.momentum < 1.0]


def batches_for(examples: int, num_train: int, global_batch: int) -> int:
    """Batches of `global_batch` (all ranks) for `examples`, at most the training set (0: unknown), rounded up."""
    wanted = min(examples, num_train) if num_train else examples
    return max(1, math.ceil(wanted / global_batch))


def updates_needed(momentum: float) -> int:
    """BatchNorm updates after which the initial values weigh CONVERGED_WEIGHT or less in the moving average."""
    return math.ceil(math.log(CONVERGED_WEIGHT) / math.log(momentum)) if 0 < momentum < 1 else 0


class PreciseBatchNorm:
    """Decides when to recompute the BatchNorm statistics (train.precise_bn) and does it.

    Args:
      mode: `auto`, `true` or `false` (see CONVERGED_WEIGHT for auto).
      num_batches: batches each rank runs per recomputation (see batches_for).
      global_batch: examples of one such batch over all ranks (data.global_batch_size).
      micro_batches: BatchNorm updates per optimizer step (train.accumulation_steps).
      make_dataset: (ctx, num_batches) -> this rank's (images, labels)
        batches, the same ones on every pass over it.

    One object per run: it warns once, and keeps its traced function and,
    per distributed context, its dataset.
    """

    def __init__(self, mode: str, num_batches: int, global_batch: int, micro_batches: int, make_dataset):
        self.mode = str(mode).lower()
        self.num_batches = num_batches
        self.examples = num_batches * global_batch
        self.micro_batches = micro_batches
        self.make_dataset = make_dataset
        self._warned = False
        self._model = self._layers = self._fn = None
        self._datasets: dict = {}

    def _bind(self, model) -> list:
        # Bound anew when a fine-tuning phase froze or unfroze layers (trainer.freeze).
        key = (id(model), tuple(layer.trainable for layer in model.layers))
        if self._model != key:
            self._model, self._layers = key, batchnorm_layers(model)
            self._fn = _batch_moments_fn(model, self._layers) if self._layers else None
        return self._layers

    def wanted(self, model, ctx, step: int) -> bool:
        """Whether to recompute after `step` optimizer steps: the same answer on every rank."""
        layers = self._bind(model)
        if not layers or self.mode == "false":
            return False
        if self.mode == "true":
            return True
        momentum = max(layer.momentum for layer in layers)
        updates = step * self.micro_batches
        weight = momentum**updates
        if weight <= CONVERGED_WEIGHT:
            return False
        if not self._warned:
            self._warned = True
            # The same on every rank: one line on the console is enough.
            log.log(logging.WARNING if ctx.is_chief else logging.DEBUG,
                    "train.precise_bn=auto: after %d updates (%d steps x %d micro-batches) the BatchNorm moving "
                    "averages (momentum %g) still give their initial values a weight of %.3g: until they have had "
                    "%d (weight %g), the statistics are recomputed from %d training examples before each validation "
                    "and the export", updates, step, self.micro_batches, momentum, weight,
                    updates_needed(momentum), CONVERGED_WEIGHT, self.examples)
        return True

    def maybe_run(self, model, ctx, step: int) -> float | None:
        """Recomputes if wanted (collective); the time it took on the slowest rank, or None."""
        if not self.wanted(model, ctx, step):
            return None
        started = time.perf_counter()
        if ctx not in self._datasets:  # built once: an elastic reset brings another context
            self._datasets[ctx] = self.make_dataset(ctx, self.num_batches)
        dataset = self._datasets[ctx]
        examples = recompute(model, self._layers, self._fn, dataset, ctx)
        took = ctx.max_scalars({"sec": time.perf_counter() - started}, "precise_bn.time")["sec"]
        log.debug("precise BatchNorm statistics of %d layers from %d examples in %.2f s",
                  len(self._layers), examples, took)
        return took


def _batch_moments_fn(model, layers):
    """A traced function: one batch's mean and (biased) variance at every layer of `layers`, in training mode."""
    factors = [1.0 / (1.0 - layer.momentum) for layer in layers]

    @tf.function(reduce_retracing=True)
    def batch_moments(x):
        for layer in layers:
            layer.moving_mean.assign(tf.zeros_like(layer.moving_mean))
            layer.moving_variance.assign(tf.zeros_like(layer.moving_variance))
        model(x, training=True)  # each layer's update is now (1 - momentum) x its batch's statistics
        means = [tf.cast(layer.moving_mean.value, tf.float64) * f for layer, f in zip(layers, factors)]
        variances = [tf.cast(layer.moving_variance.value, tf.float64) * f for layer, f in zip(layers, factors)]
        return tf.cast(tf.shape(x)[0], tf.float64), tf.concat(means, 0), tf.concat(variances, 0)

    return batch_moments


def recompute(model, layers: list, batch_moments, dataset, ctx) -> int:
    """Sets every layer's moving statistics to the population ones over all ranks' `dataset`; returns the examples.

    Collective: one allreduce of sums. A layer whose statistics come out
    non-finite keeps its moving averages, with a warning.
    """
    others = [(v, v.numpy()) for v in model.non_trainable_variables]
    sizes = [int(layer.moving_mean.shape[0]) for layer in layers]
    total = sum(sizes)
    local = np.zeros(1 + 2 * total, np.float64)  # examples, sum of n * mean, sum of n * (variance + mean^2)
    try:
        for batch in dataset:
            n, mean, variance = (t.numpy() for t in batch_moments(batch[0]))
            local += np.concatenate([[n], n * mean, n * (variance + mean * mean)])
    finally:
        for v, value in others:  # also when a shard fails to read: nothing half-done stays
            v.assign(value)
    sums = ctx.sum_array(local, "precise_bn.sums")
    n = sums[0]
    means = sums[1:1 + total] / n
    variances = np.maximum(sums[1 + total:] / n - means * means, 0.0)
    bad = []
    for layer, lo, hi in zip(layers, np.cumsum([0, *sizes[:-1]]), np.cumsum(sizes)):
        mean, variance = means[lo:hi], variances[lo:hi]
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(variance))):
            bad.append(layer.name)
            continue
        layer.moving_mean.assign(mean.astype(np.float32))
        layer.moving_variance.assign(variance.astype(np.float32))
    if bad:
        log.warning("precise BatchNorm statistics are not finite in %d layers (%s): their moving averages are kept",
                    len(bad), ", ".join(bad[:5]))
    return int(n)


class PreciseStatistics(keras.callbacks.Callback):
    """Recomputes the BatchNorm statistics at the end of the epochs that are validated, before the validation.

    Runs on every rank (collective), before PeriodicValidation, and skips the
    epochs that it skips, with the same test: a stop that cuts an epoch short
    leaves it for the resumed run to complete. Adds `precise_bn_time_sec`
    (the slowest rank's) to the logs of the epochs where it ran.
    """

    def __init__(self, precise: PreciseBatchNorm, ctx, steps_per_epoch: int, every: int, epochs: int):
        super().__init__()
        self.precise = precise
        self.ctx = ctx
        self.steps_per_epoch = steps_per_epoch
        self.every = every
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch_cut_short(self.model) or not is_due(epoch + 1, self.every, self.epochs):
            return
        # The step from the epoch, not from the optimizer: the same on every rank by construction.
        took = self.precise.maybe_run(self.model, self.ctx, (epoch + 1) * self.steps_per_epoch)
        if took is not None and logs is not None:
            logs["precise_bn_time_sec"] = took

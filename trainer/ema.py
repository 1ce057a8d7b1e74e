"""The exponential moving average of the weights (train.ema), and which weights are evaluated.

Keras keeps the average (its optimizers' `use_ema=True, ema_momentum=m`):
`_model_variables_moving_average` holds one optimizer variable per trainable
weight, updated inside `optimizer.apply` right after the weights, as
average = m x average + (1 - m) x weights. Being optimizer variables, they are
in `optimizer.variables`, and so in every checkpoint (optimizer.npz), in the
broadcast at the start of training and in elastic commits, with no code of
ours. Under mixed_float16 a keras.optimizers.LossScaleOptimizer calls the inner
optimizer's `apply` only for finite gradients: a skipped step leaves the
average as it was. Every rank applies the same allreduced update to the same
weights, so the averages are identical on every rank (check_replicas_agree in
trainer.runner compares them).

What this module adds, because Keras's parts do not fit:
- `start_average`: Keras starts the average at zero and copies the weights
  into it on the step where `iterations` is 0. The trainer's `iterations`
  also counts the steps a LossScaleOptimizer skips (trainer.step), so a
  skipped first step, usual at the initial loss scale, would leave the zeros
  in the average with weight m. The average starts as the initial weights
  instead, as tf.train.ExponentialMovingAverage does.
- Keras's fit ends with `optimizer.finalize_variable_values`, which
  overwrites the weights with the average: the training weights would be lost
  to the next fit call (a resumed epoch, an elastic reset) and to the
  checkpoint. trainer.assembly's optimizers make it a no-op.
- keras.callbacks.SwapEMAWeights swaps the weights and the average in place
  by addition and subtraction, a + b - b, which is not exact in floating
  point: the training weights would come back changed in their last bits.
  `EvaluatedWeights` copies them aside and assigns them back, bit for bit.

BatchNorm's moving statistics are not trainable and not averaged: they are
themselves a moving average, of the batch statistics. The averaged weights
are evaluated with the model's statistics, the moving averages of training,
or with train.precise_bn the statistics recomputed for the averaged weights;
those then stay in the model, as without EMA (they play no part in training,
which normalises by the batch's own), so the checkpoint holds the training
weights, the average and the statistics they were evaluated with.
"""

import contextlib

import keras

from trainer.evaluation import is_due
from trainer.preemption import epoch_cut_short

EMA = "ema"
TRAINING = "training"


def _inner(optimizer):
    """The optimizer that keeps the average: the one a LossScaleOptimizer wraps."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def averages(optimizer) -> list:
    """The average of each trainable weight, in the model's order; [] without train.ema."""
    inner = _inner(optimizer)
    if not getattr(inner, "use_ema", False) or not inner.built:
        return []
    return list(inner._model_variables_moving_average)  # noqa: SLF001  (Keras keeps them there, and nowhere public)


def _pairs(model) -> list:
    """(weight, its average) for every trainable weight: Keras's own pairing, in `optimizer.build`'s order."""
    inner = _inner(model.optimizer)
    return list(zip(inner._trainable_variables, averages(model.optimizer)))  # noqa: SLF001


def start_average(model) -> None:
    """Sets the average to the current weights (see the module docstring): once, after the optimizer's build."""
    for weight, average in _pairs(model):
        average.assign(weight)


class EvaluatedWeights:
    """Puts the averaged weights in the model for an evaluation, and the training weights back after it, exactly.

    `use_average`: train.ema_evaluate; without an average (train.ema 0) the
    training weights are evaluated and nothing is swapped.
    """

    def __init__(self, model, use_average: bool):
        self.model = model
        self.use_average = bool(use_average) and bool(averages(model.optimizer))
        self._kept: list | None = None

    @property
    def name(self) -> str:
        """What summary.json and trainer.evaluate report as `evaluated_weights`."""
        return EMA if self.use_average else TRAINING

    def swap_in(self) -> None:
        if not self.use_average or self._kept is not None:
            return
        pairs = _pairs(self.model)
        # Host copies: a copy, whatever the device and the variable's buffer sharing.
        self._kept = [weight.numpy() for weight, _ in pairs]
        for weight, average in pairs:
            weight.assign(average)

    def swap_out(self) -> None:
        if self._kept is None:
            return
        for (weight, _), value in zip(_pairs(self.model), self._kept):
            weight.assign(value)
        self._kept = None

    @contextlib.contextmanager
    def swapped(self):
        self.swap_in()
        try:
            yield self
        finally:
            self.swap_out()


class UseEvaluatedWeights(keras.callbacks.Callback):
    """At the end of the epochs that are validated, puts the evaluated weights in the model.

    Comes before PreciseStatistics and PeriodicValidation, and skips the
    epochs they skip, with the same test; UseTrainingWeights after them puts
    the training weights back, before the checkpoint.
    """

    def __init__(self, weights: EvaluatedWeights, every: int, epochs: int):
        super().__init__()
        self.weights = weights
        self.every = every
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        if not epoch_cut_short(self.model) and is_due(epoch + 1, self.every, self.epochs):
            self.weights.swap_in()


class UseTrainingWeights(keras.callbacks.Callback):
    """Puts the training weights back after the validation (see UseEvaluatedWeights)."""

    def __init__(self, weights: EvaluatedWeights):
        super().__init__()
        self.weights = weights

    def on_epoch_end(self, epoch, logs=None):
        self.weights.swap_out()

    def on_train_end(self, logs=None):
        self.weights.swap_out()

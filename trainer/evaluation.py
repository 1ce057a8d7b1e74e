"""Exact distributed evaluation, and the callback that runs it at the end of epochs.

Each rank evaluates its own disjoint part of the validation split (whole files,
or every N-th record when there are fewer files than ranks; see
data_pipeline.reader.shard_records), keeping its last, partial batch, so every
example counts exactly once. The parts may differ in size, and so may the
number of batches per rank: the ranks therefore meet only after their local
loops, in one allreduce of sums (loss, correct predictions, examples) and one
of the time taken (max). Ratios of the global sums equal a single-process
evaluation up to float rounding; a mean of per-rank means would not, when the
parts differ.
"""

import logging
import time

import keras
import numpy as np
import tensorflow as tf

from data_pipeline.metadata import DataError
from trainer.preemption import epoch_cut_short

log = logging.getLogger(__name__)

TOP_K = 5


class Evaluator:
    """Evaluates a model on this rank's part of a split and combines the sums over all ranks.

    Args:
      ctx: the DistContext; every rank must call evaluate() at the same time.
      make_dataset: returns this rank's (image, label) batches, one pass.
      num_classes: top-5 accuracy is reported when there are more than 5.
      expected_examples: the split's record count (metadata.json); a different
        global count raises DataError naming `source`. 0: not checked.
      source: what holds the data, for that message (e.g. "data.dir='...'").
      skip_corrupt: the dataset leaves out the records it cannot read
        (data.skip_corrupt_records): fewer than expected_examples are the
        records skipped, reported as `skipped_records`, not an error.
    """

    def __init__(self, ctx, make_dataset, num_classes: int, expected_examples: int = 0, source: str = "",
                 skip_corrupt: bool = False):
        self.ctx = ctx
        self.make_dataset = make_dataset
        self.top_k = TOP_K if num_classes > TOP_K else 0
        self.expected = expected_examples
        self.source = source
        self.skip_corrupt = skip_corrupt
        self._dataset = None
        self._model = None
        self._step = None

    def _sums_fn(self, model):
        # The plain cross-entropy on integer labels whatever the training loss (train.label_smoothing
        # and data.augment's mixup and cutmix change only that one): val_loss, and a best checkpoint
        # chosen by it, mean the same in every run.
        loss = keras.losses.SparseCategoricalCrossentropy()
        top_k = self.top_k

        @tf.function(reduce_retracing=True)
        def batch_sums(x, y):
            y = tf.cast(y, tf.int32)
            y_pred = tf.cast(model(x, training=False), tf.float32)
            # Per-example values, summed in float64: the sum must not depend on how
            # the examples were split into batches and ranks.
            per_example = tf.cast(loss.call(y, y_pred), tf.float64)
            correct = tf.equal(tf.argmax(y_pred, axis=-1, output_type=tf.int32), y)
            sums = [tf.reduce_sum(per_example), tf.reduce_sum(tf.cast(correct, tf.float64)),
                    tf.cast(tf.shape(y)[0], tf.float64)]
            if top_k:
                sums.append(tf.reduce_sum(tf.cast(tf.math.in_top_k(y, y_pred, top_k), tf.float64)))
            return tf.stack(sums)

        return batch_sums

    def evaluate(self, model) -> dict:
        """{loss, accuracy[, top5_accuracy], examples, time_sec}, identical on every rank.

        `loss` is the mean per-example loss plus the weight regularization
        terms, as keras.Model.evaluate reports it.
        """
        started = time.perf_counter()
        if self._model is not model:
            self._model, self._step = model, self._sums_fn(model)
        if self._dataset is None:
            self._dataset = self.make_dataset()  # built once: one pass per call
        names = ["loss_sum", "correct", "examples"] + (["top_k_correct"] if self.top_k else [])
        local = np.zeros(len(names), np.float64)
        for x, y in self._dataset:
            local += self._step(x, y).numpy()
        # The collectives come after the loop, whatever the number of local batches.
        total = self.ctx.sum_scalars(dict(zip(names, local)), "eval.sums")
        # The slowest rank's time, so that every rank logs the same number.
        elapsed = self.ctx.max_scalars({"sec": time.perf_counter() - started}, "eval.time")["sec"]
        n = int(total["examples"])
        skipped = self.expected - n if self.skip_corrupt and 0 < n < self.expected else 0
        if (self.expected and n + skipped != self.expected) or n == 0:
            raise DataError(f"{self.source}: the evaluation read {n} records, metadata.json lists {self.expected}")
        if skipped:
            log.warning("evaluation: %d of the %d records skipped (undecodable, or in a corrupt shard's tail)",
                        skipped, self.expected)
        regularization = float(sum(float(x) for x in model.losses))
        result = {"loss": total["loss_sum"] / n + regularization, "accuracy": total["correct"] / n}
        if self.top_k:
            result[f"top{self.top_k}_accuracy"] = total["top_k_correct"] / n
        if self.skip_corrupt:
            result["skipped_records"] = skipped
        result["examples"] = n
        result["time_sec"] = elapsed
        log.debug("evaluated %d examples (%d on this rank) in %.2f s: loss %.6f, accuracy %.6f",
                  n, int(local[2]), result["time_sec"], result["loss"], result["accuracy"])
        return result


def validation_metrics(result: dict) -> dict[str, float]:
    """An evaluation's figures prefixed `val_`, `val_examples` among them: what a checkpoint records."""
    return {f"val_{k}": float(v) for k, v in result.items() if k != "time_sec"}


def validation_logs(result: dict) -> dict[str, float]:
    """An evaluation as epoch-log entries: its `validation_metrics`, and its duration."""
    return {**validation_metrics(result), "eval_time_sec": float(result["time_sec"])}


def recorded_validation(metrics: dict) -> dict | None:
    """The evaluation (without its time) behind `validation_metrics`, as a checkpoint's state.json holds them.

    None for the records of earlier versions, which lack `val_examples`.
    """
    if not isinstance(metrics.get("val_examples"), (int, float)):
        return None
    result = {k[4:]: v for k, v in metrics.items() if k.startswith("val_") and k != "val_examples"}
    return {**result, "examples": int(metrics["val_examples"])}


def is_due(epoch: int, every: int, epochs: int) -> bool:
    """Whether 1-based `epoch` ends with a validation: every `every`-th, and always the last."""
    return epoch == epochs or (every > 0 and epoch % every == 0)


class PeriodicValidation(keras.callbacks.Callback):
    """Evaluates at the end of due epochs and adds the `val_` metrics to the epoch logs.

    Runs on every rank (the evaluation is collective), after AverageMetrics
    (its values are global already) and before the callbacks that read the
    logs: the log line, the checkpoint (which records them) and TensorBoard.
    """

    def __init__(self, evaluator: Evaluator, every: int, epochs: int):
        super().__init__()
        self.evaluator = evaluator
        self.every = every
        self.epochs = epochs
        self.results: dict[int, dict] = {}

    def on_epoch_end(self, epoch, logs=None):
        # An epoch cut short by a stop request holds mid-epoch weights, and the
        # stop must reach its checkpoint within the scheduler's grace period:
        # the resumed run validates the epoch when it completes it. A stop on
        # the epoch's last step leaves no part to resume, so the epoch is
        # validated now, before its checkpoint, at the cost of one evaluation
        # within the grace period. All ranks decide alike (see epoch_cut_short).
        if epoch_cut_short(self.model) or not is_due(epoch + 1, self.every, self.epochs):
            return
        result = self.evaluator.evaluate(self.model)
        self.results[epoch + 1] = result
        logs.update(validation_logs(result))

"""The per-step logic: a Keras model whose gradients are averaged over Horovod ranks.

Keras 3 cannot use horovod.tensorflow.keras (its DistributedOptimizer needs
Keras 2 variables), so the allreduce sits in a `train_step` override instead,
between computing the gradients and applying them. One step is, in order:

1. the local gradients: of the loss times the loss scale (mixed_float16; 1
   otherwise), summed over `accumulation_steps` micro-batches of the batch;
2. one grouped allreduce of those still-scaled gradients, the float state,
   the loss and the stop flag;
3. the optimizer update. A keras.optimizers.LossScaleOptimizer unscales the
   allreduced gradients and skips the update if any is not finite: every rank
   sees the same sums, so every rank skips alike. A skipped step leaves no
   trace: the float state (BatchNorm statistics, moved by the forward pass)
   is put back as it was before the step, on every rank;
4. with `watch_nonfinite`, the step's verdict for trainer.failures: whether
   the loss (averaged over ranks) or any weight is not finite. Both are the
   same on every rank, so the ranks agree without a collective of their own.

With `compile_parts`, steps 1 and 3 are XLA-compiled functions; step 2 cannot
be (Horovod's ops have no XLA kernels on CPU builds) and stays between them.
"""

import horovod.tensorflow as hvd
import keras
import tensorflow as tf

from trainer.failures import NONFINITE_LOG, nonfinite_code
from trainer.preemption import STOP_LOG

_FLOATS = ("float16", "bfloat16", "float32", "float64")


def float_state(variables, frozen_ids=frozenset()) -> list:
    """The non-trainable float variables each step averages over ranks (BatchNorm statistics), in their order.

    launch plan counts the same list (trainer.model_check.size).
    """
    return [v for v in variables if v.dtype in _FLOATS and id(v) not in frozen_ids]


@keras.saving.register_keras_serializable(package="hvd_keras_cnn")
class DataParallelModel(keras.Model):
    """A functional model whose training step averages gradients across all ranks."""

    def __init__(self, *args, fp16_allreduce: bool = False, stop_request=None, time_input: bool = True,
                 accumulation_steps: int = 1, compile_parts: bool = False, watch_nonfinite: bool = False, **kwargs):
        """`stop_request`: a trainer.preemption.StopRequest whose flag rides on the allreduce, or None.

        `time_input`: time each step's wait for its batch; off under op
        determinism, where TensorFlow refuses tf.timestamp.
        `accumulation_steps`: micro-batches each batch is split into, whose
        gradients are summed locally before the one allreduce of the step.
        `compile_parts`: XLA-compile the gradient computation and the
        optimizer update (not the allreduce between them).
        `watch_nonfinite`: return the step's non-finite verdict in the logs
        (NONFINITE_LOG, see trainer.failures), for train.stop_on_nonfinite.
        """
        super().__init__(*args, **kwargs)
        self.fp16_allreduce = fp16_allreduce
        self.stop_request = stop_request
        self.time_input = time_input
        self.accumulation_steps = int(accumulation_steps)
        self.compile_parts = bool(compile_parts)
        self.watch_nonfinite = bool(watch_nonfinite)
        self._gradients_fn = self._apply_fn = None
        # Variables of layers model.freeze_until froze (trainer.freeze): unchanged, so not allreduced as state.
        self.frozen_variables: set[int] = set()

    @classmethod
    def wrap(cls, net: keras.Model, fp16_allreduce: bool = False, stop_request=None, time_input: bool = True,
             accumulation_steps: int = 1, compile_parts: bool = False,
             watch_nonfinite: bool = False) -> "DataParallelModel":
        """The same layers and weights as `net`, with the distributed train_step."""
        return cls(inputs=net.input, outputs=net.output, name=net.name, fp16_allreduce=fp16_allreduce,
                   stop_request=stop_request, time_input=time_input, accumulation_steps=accumulation_steps,
                   compile_parts=compile_parts, watch_nonfinite=watch_nonfinite)

    def get_config(self):
        return {**super().get_config(), "fp16_allreduce": self.fp16_allreduce,
                "accumulation_steps": self.accumulation_steps}

    def make_train_function(self, force=False):
        """Keras's train function, plus the time each step waited for its batch (`input_wait`, seconds).

        The wait is timed in the graph, around the iterator's get_next, so it
        is what the step really spent blocked on the input pipeline. Only the
        plain one-step-per-call loop is timed, and not under op determinism
        (runtime.deterministic), where TensorFlow refuses tf.timestamp.
        """
        if self.train_function is not None and not force:
            return self.train_function
        super().make_train_function(force)
        if self.steps_per_execution != 1 or self.run_eagerly or not self.time_input:
            return self.train_function
        keras_function = self.train_function

        @tf.function(reduce_retracing=True)
        @tf.autograph.experimental.do_not_convert  # as Keras's own step: train_step is plain graph code
        def timed_step(iterator):
            start = tf.timestamp()
            with tf.control_dependencies([start]):
                data = iterator.get_next()
            with tf.control_dependencies(tf.nest.flatten(data)):
                end = tf.timestamp()
            # The step's ops wait for `end`: otherwise the executor may run the
            # cheap timestamp after the whole step and count it as waiting.
            with tf.control_dependencies([end]):
                data = tf.nest.map_structure(tf.identity, data)
            return {**self.train_step(data), "input_wait": end - start}

        def function(iterator):
            if isinstance(iterator, (tf.data.Iterator, tf.distribute.DistributedIterator)):
                return timed_step(iterator)
            return keras_function(iterator)

        self.train_function = function
        return function

    def local_gradients(self, x, y, sample_weight):
        """(mean loss, predictions, gradients of the scaled loss) over this rank's batch.

        With accumulation, the batch is cut into `accumulation_steps` equal
        micro-batches run one after another (memory holds one micro-batch's
        activations); the mean of their gradients is the gradient of the
        whole batch's mean loss, as their losses are means over equal counts.
        The loop is unrolled in the graph: N is small.
        """
        n = self.accumulation_steps
        parts = [tf.split(t, n) if t is not None else [None] * n for t in (x, y, sample_weight)]
        variables = self.trainable_variables
        losses, preds, total = [], [], None
        for xi, yi, wi in zip(*parts):
            with tf.GradientTape() as tape:
                y_pred = self(xi, training=True)
                loss = self.compute_loss(x=xi, y=yi, y_pred=y_pred, sample_weight=wi, training=True)
                # The identity for optimizers without loss scaling.
                scaled = self.optimizer.scale_loss(loss)
            grads = tape.gradient(scaled, variables)
            total = grads if total is None else [a + b for a, b in zip(total, grads)]
            losses.append(loss)
            preds.append(y_pred)
        if n > 1:
            total = [g / n for g in total]
        return tf.add_n(losses) / n, tf.concat(preds, 0) if n > 1 else preds[0], total

    def apply_gradients(self, grads, applied):
        """The optimizer update from allreduced (still loss-scaled) gradients.

        A LossScaleOptimizer checks them, unscales and applies, or skips the
        update and halves its scale; `applied` is that same check, made by
        train_step. A skipped step does not advance the optimizer's
        `iterations`. The trainer counts steps with `iterations` (checkpoints,
        the data position on resume, the schedule), so it is advanced here for
        a skipped step: it counts batches consumed, skipped or not.
        """
        self.optimizer.apply(grads, self.trainable_variables)
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            self.optimizer.iterations.assign_add(tf.cast(tf.logical_not(applied), self.optimizer.iterations.dtype))

    def reset_parts(self) -> None:
        """Forgets the traced gradient and update functions (the trainable variables changed)."""
        self._gradients_fn = self._apply_fn = None

    def _parts(self):
        """local_gradients and apply_gradients, each XLA-compiled with `compile_parts`."""
        if self._gradients_fn is None:
            if self.compile_parts:
                self._gradients_fn = tf.function(self.local_gradients, jit_compile=True, reduce_retracing=True)
                self._apply_fn = tf.function(self.apply_gradients, jit_compile=True, reduce_retracing=True)
            else:
                self._gradients_fn, self._apply_fn = self.local_gradients, self.apply_gradients
        return self._gradients_fn, self._apply_fn

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        gradients_fn, apply_fn = self._parts()
        # Float state outside the gradients (BatchNorm moving statistics) moves
        # in the forward pass, before anyone knows whether the step will be
        # skipped: its values from before are kept to put back.
        state = float_state(self.non_trainable_variables, self.frozen_variables)
        skips = isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
        before = [tf.identity(v.value) for v in state] if skips else []
        loss, y_pred, grads = gradients_fn(x, y, sample_weight)
        grads, means, mean_loss, stop = self._allreduce(grads, state, loss)
        applied = tf.constant(True)
        if skips:
            # The optimizer's own test, on the same allreduced sums: it skips
            # exactly when this is false, on every rank alike.
            applied = self.optimizer.check_finite(grads)
            means = [tf.where(applied, mean, old) for mean, old in zip(means, before)]
        for v, mean in zip(state, means):
            v.assign(mean)
        apply_fn(grads, applied)
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss, sample_weight=tf.shape(x)[0])
        logs = self.compute_metrics(x, y, y_pred, sample_weight)
        if stop is not None:
            self.stop_request.agreed.assign(stop)
            logs[STOP_LOG] = stop  # the host reads the agreed flag here, in logs Keras fetches anyway
        if self.watch_nonfinite:
            # Read after the update: the weights every rank now holds alike.
            logs[NONFINITE_LOG] = nonfinite_code(mean_loss, [v.value for v in (*self.trainable_variables, *state)])
        return logs

    def _allreduce(self, grads, state, loss):
        """(gradients, float state, loss, stop flag or None), each averaged over ranks in one grouped allreduce.

        Average, not sum: each rank's loss is a mean over its own per-replica
        batch, so the mean over ranks is the gradient of the global-batch loss.
        Loss-scaled gradients are averaged as they are: the scale is the same
        on every rank (it changes only on the allreduced sums), and an
        overflow on any rank makes the average non-finite on all of them.

        The float state is averaged too, every step: each rank moved it
        towards its own batch, and the mean is the moving average of
        global-batch statistics. The replicas thus stay identical in every
        variable at every step, so a checkpoint taken at any step is the whole
        model. The loss (non-finite on all ranks if it is on one) and the stop
        flag of trainer.preemption ride along, so all ranks stop after the
        same step.
        """
        extra = [*(v.value for v in state), tf.cast(loss, tf.float32)]
        if self.stop_request is not None:
            extra.append(tf.convert_to_tensor(self.stop_request.local))
        if self.fp16_allreduce:
            # Only the gradients are compressed: fp16 would round the statistics.
            grads = hvd.grouped_allreduce(grads, op=hvd.Average, compression=hvd.Compression.fp16)
            extra = hvd.grouped_allreduce(extra, op=hvd.Average)
        else:
            # One grouped call lets Horovod fuse everything into one allreduce.
            reduced = hvd.grouped_allreduce([*grads, *extra], op=hvd.Average)
            grads, extra = reduced[: len(grads)], reduced[len(grads):]
        extra = list(extra)
        stop = extra.pop() if self.stop_request is not None else None
        return grads, extra[:-1], extra[-1], stop

"""The per-step logic: a Keras model whose gradients are averaged over Horovod ranks.

Keras 3 cannot use horovod.tensorflow.keras (its DistributedOptimizer needs
Keras 2 variables), so the allreduce sits in a `train_step` override instead,
between computing the gradients and applying them.
"""

import horovod.tensorflow as hvd
import keras
import tensorflow as tf

from trainer.preemption import STOP_LOG

_FLOATS = ("float16", "bfloat16", "float32", "float64")


@keras.saving.register_keras_serializable(package="hvd_keras_cnn")
class DataParallelModel(keras.Model):
    """A functional model whose training step averages gradients across all ranks."""

    def __init__(self, *args, fp16_allreduce: bool = False, stop_request=None, time_input: bool = True, **kwargs):
        """`stop_request`: a trainer.preemption.StopRequest whose flag rides on the allreduce, or None.

        `time_input`: time each step's wait for its batch; off under op
        determinism, where TensorFlow refuses tf.timestamp.
        """
        super().__init__(*args, **kwargs)
        self.fp16_allreduce = fp16_allreduce
        self.stop_request = stop_request
        self.time_input = time_input

    @classmethod
    def wrap(cls, net: keras.Model, fp16_allreduce: bool = False, stop_request=None,
             time_input: bool = True) -> "DataParallelModel":
        """The same layers and weights as `net`, with the distributed train_step."""
        return cls(inputs=net.input, outputs=net.output, name=net.name, fp16_allreduce=fp16_allreduce,
                   stop_request=stop_request, time_input=time_input)

    def get_config(self):
        return {**super().get_config(), "fp16_allreduce": self.fp16_allreduce}

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

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
        variables = self.trainable_variables
        grads = tape.gradient(loss, variables)
        # Average, not sum: each rank's loss is a mean over its own per-replica
        # batch, so the mean over ranks is the gradient of the global-batch loss.
        #
        # Float state outside the gradients (BatchNorm moving statistics) is
        # averaged too, every step: each rank moved it towards its own batch,
        # and the mean is the moving average of global-batch statistics. The
        # replicas thus stay identical in every variable at every step, so a
        # checkpoint taken at any step is the whole model. The stop flag of
        # trainer.preemption rides along, so all ranks stop after the same step.
        state = [v for v in self.non_trainable_variables if v.dtype in _FLOATS]
        extra = [v.value for v in state]
        if self.stop_request is not None:
            extra.append(tf.convert_to_tensor(self.stop_request.local))
        if self.fp16_allreduce:
            # Only the gradients are compressed: fp16 would round the statistics.
            grads = hvd.grouped_allreduce(grads, op=hvd.Average, compression=hvd.Compression.fp16)
            extra = hvd.grouped_allreduce(extra, op=hvd.Average) if extra else []
        else:
            # One grouped call lets Horovod fuse everything into one allreduce.
            reduced = hvd.grouped_allreduce([*grads, *extra], op=hvd.Average)
            grads, extra = reduced[: len(grads)], reduced[len(grads):]
        for v, mean in zip(state, extra):
            v.assign(mean)
        if self.stop_request is not None:
            self.stop_request.agreed.assign(extra[-1])
        self.optimizer.apply(grads, variables)
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss, sample_weight=tf.shape(x)[0])
        logs = self.compute_metrics(x, y, y_pred, sample_weight)
        if self.stop_request is not None:
            logs[STOP_LOG] = extra[-1]  # the host reads the agreed flag here, in logs Keras fetches anyway
        return logs

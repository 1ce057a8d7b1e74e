"""The per-step logic: a Keras model whose gradients are averaged over Horovod ranks.

Keras 3 cannot use horovod.tensorflow.keras (its DistributedOptimizer needs
Keras 2 variables), so the allreduce sits in a `train_step` override instead,
between computing the gradients and applying them.
"""

import horovod.tensorflow as hvd
import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="hvd_keras_cnn")
class DataParallelModel(keras.Model):
    """A functional model whose training step averages gradients across all ranks."""

    def __init__(self, *args, fp16_allreduce: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.fp16_allreduce = fp16_allreduce

    @classmethod
    def wrap(cls, net: keras.Model, fp16_allreduce: bool = False) -> "DataParallelModel":
        """The same layers and weights as `net`, with the distributed train_step."""
        return cls(inputs=net.input, outputs=net.output, name=net.name, fp16_allreduce=fp16_allreduce)

    def get_config(self):
        return {**super().get_config(), "fp16_allreduce": self.fp16_allreduce}

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
        variables = self.trainable_variables
        grads = tape.gradient(loss, variables)
        # Average, not sum: each rank's loss is a mean over its own per-replica
        # batch, so the mean over ranks is the gradient of the global-batch loss.
        # One grouped call lets Horovod fuse all tensors into few allreduces.
        compression = hvd.Compression.fp16 if self.fp16_allreduce else hvd.Compression.none
        grads = hvd.grouped_allreduce(grads, op=hvd.Average, compression=compression)
        self.optimizer.apply(grads, variables)
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss, sample_weight=tf.shape(x)[0])
        return self.compute_metrics(x, y, y_pred, sample_weight)

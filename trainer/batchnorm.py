"""BatchNormalization that runs as TensorFlow's one fused kernel, for the models of trainer.models.

Keras 3's BatchNormalization computes the batch moments and the normalization
as a dozen separate element-wise and reduction ops (`tf.nn.moments`, then
`tf.nn.batch_normalization`), forward and backward; tf-keras called the fused
kernel (FusedBatchNormV3 and its gradient). On one CPU thread Keras 3's
BatchNorm took 20% of ResNet-50's op time, the fused one 8%, as in tf-keras
(docs/benchmarks.md).

This layer is keras.layers.BatchNormalization with the same variables, names,
config and semantics; only its TensorFlow graph differs:
  - it upcasts float16/bfloat16 inputs to float32 and casts the output back to
    the compute dtype, as Keras does;
  - it normalizes with the biased batch variance and updates the moving
    statistics with it, as Keras does (the fused kernel returns the unbiased,
    Bessel-corrected variance: it is rescaled by (n - 1) / n);
  - it calls the fused kernel only where that kernel computes the same thing:
    4-D NHWC inputs, no mask, no renorm, not synchronized, epsilon no smaller
    than the kernel's floor of 1.001e-5, the TensorFlow backend. Anything else
    runs Keras's own code.
Keras's auto-naming keys on the class name, so the class keeps Keras's name and
its layers are called `batch_normalization_N`, as before: checkpoints load.
"""

import keras
import tensorflow as tf

FUSED_EPSILON_FLOOR = 1.001e-5  # tf.nn.fused_batch_norm raises any smaller epsilon to this


@keras.saving.register_keras_serializable(package="hvd_keras_cnn")
class BatchNormalization(keras.layers.BatchNormalization):
    """keras.layers.BatchNormalization computed by FusedBatchNormV3 where it can be (see the module docstring)."""

    def _fusable(self, inputs, mask) -> bool:
        return (
            keras.backend.backend() == "tensorflow"
            and mask is None
            and not self.renorm
            and not self.synchronized
            and len(inputs.shape) == 4
            and self.axis in (3, -1)
            and self.epsilon >= FUSED_EPSILON_FLOOR
        )

    def call(self, inputs, training=None, mask=None):
        if not self._fusable(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        x = tf.cast(inputs, tf.float32)  # as Keras: BN statistics overflow in float16
        channels = x.shape[-1]
        gamma = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones([channels], tf.float32)
        beta = tf.cast(self.beta, tf.float32) if self.center else tf.zeros([channels], tf.float32)
        if training and self.trainable:
            y, mean, unbiased = tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta, epsilon=self.epsilon, data_format="NHWC", is_training=True
            )
            n = tf.cast(tf.size(x) // channels, tf.float32)
            variance = unbiased * ((n - 1.0) / tf.maximum(n, 1.0))
            momentum = self.momentum
            self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
            self.moving_variance.assign(self.moving_variance * momentum + variance * (1.0 - momentum))
        else:
            y, _, _ = tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta, mean=tf.cast(self.moving_mean, tf.float32),
                variance=tf.cast(self.moving_variance, tf.float32),
                epsilon=self.epsilon, data_format="NHWC", is_training=False,
            )
        return tf.cast(y, self.compute_dtype)


def fuse_batchnorm(model: keras.Model) -> keras.Model:
    """A copy of a functional model with every keras.layers.BatchNormalization replaced by this module's.

    For models built elsewhere (keras.applications); the copy has the same
    layer names and configs, freshly initialized weights.
    """

    def clone(layer):
        if type(layer) is keras.layers.BatchNormalization:
            return BatchNormalization.from_config(layer.get_config())
        return layer.__class__.from_config(layer.get_config())

    return keras.models.clone_model(model, clone_function=clone)

"""trainer.batchnorm: the fused BatchNormalization computes what Keras's own layer computes."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.batchnorm import BatchNormalization
from trainer.models import build_model


def _pair(epsilon: float, **kwargs):
    """Keras's layer and ours, built alike, with the same non-trivial gamma and beta."""
    pair = (keras.layers.BatchNormalization(epsilon=epsilon, momentum=0.9, **kwargs),
            BatchNormalization(epsilon=epsilon, momentum=0.9, **kwargs))
    for layer in pair:
        layer.build((4, 5, 5, 6))
        layer.gamma.assign(np.linspace(0.5, 2.0, 6))
        layer.beta.assign(np.linspace(-1.0, 1.0, 6))
    return pair


def _step(layer, x: np.ndarray, dtype: str = "float32") -> list[np.ndarray]:
    """Training output, its gradients (inputs, gamma, beta), moving statistics, inference output."""
    with tf.GradientTape() as tape:
        xt = tf.constant(x, dtype=dtype)
        tape.watch(xt)
        y = layer(xt, training=True)
        # Random weights: a per-channel constant would give gamma a zero gradient.
        weights = np.random.default_rng(7).normal(size=x.shape).astype(np.float32)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * weights)
    grads = tape.gradient(loss, [xt, layer.gamma, layer.beta])
    inference = layer(tf.constant(x, dtype=dtype), training=False)
    return [np.asarray(t, dtype=np.float32) for t in
            (y, *grads, layer.moving_mean, layer.moving_variance, inference)]


@pytest.mark.parametrize("epsilon", [1e-3, 1.001e-5])
def test_matches_keras_layer(epsilon):
    x = np.random.default_rng(0).normal(2.0, 3.0, (4, 5, 5, 6)).astype(np.float32)
    ours_layer = _pair(epsilon)[1]
    keras_layer = _pair(epsilon)[0]
    for step in range(3):  # the moving statistics accumulate over several steps
        expected, got = _step(keras_layer, x + step), _step(ours_layer, x + step)
        names = ("output", "grad x", "grad gamma", "grad beta", "moving mean", "moving variance", "inference")
        for name, e, g in zip(names, expected, got):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-4 * max(1.0, np.abs(e).max()), err_msg=name)


def test_mixed_precision_policy_matches_keras():
    x = np.random.default_rng(1).normal(0.0, 1.0, (4, 5, 5, 6)).astype(np.float32)
    for policy in ("mixed_bfloat16", "mixed_float16"):
        ref, ours = (cls(dtype=policy) for cls in (keras.layers.BatchNormalization, BatchNormalization))
        compute = ref.compute_dtype
        expected, got = _step(ref, x, compute), _step(ours, x, compute)
        assert ours(tf.constant(x, compute), training=True).dtype == compute
        tol = 1e-2 if policy == "mixed_bfloat16" else 2e-3
        for e, g in zip(expected, got):
            np.testing.assert_allclose(g, e, rtol=tol, atol=tol * max(1.0, np.abs(e).max()))


def test_same_names_and_variables_as_keras():
    keras_layer, ours = _pair(1e-3)
    assert ours.name.startswith("batch_normalization")  # Keras's auto-name: checkpoints keep their paths
    assert [v.path.split("/")[-1] for v in ours.weights] == [v.path.split("/")[-1] for v in keras_layer.weights]
    assert keras.layers.deserialize(keras.layers.serialize(ours)).__class__ is BatchNormalization


def _graph_ops(model, shape) -> set[str]:
    """The op types of one training step of `model` (forward and backward)."""
    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x, training=True))
        return tape.gradient(loss, model.trainable_variables)

    graph = step.get_concrete_function(tf.TensorSpec(shape, tf.float32)).graph
    ops = {op.type for op in graph.get_operations()}
    for fn in graph._functions.values():  # noqa: SLF001 - the bodies of nested functions
        ops |= {node.op for node in fn.definition.node_def}
    return ops


@pytest.mark.parametrize("name, shape", [("resnet20", (2, 32, 32, 3)), ("resnet50", (1, 64, 64, 3))])
def test_models_run_batchnorm_fused(name, shape):
    model = build_model(name, shape[1:], 10)
    ops = _graph_ops(model, shape)
    assert {"FusedBatchNormV3", "FusedBatchNormGradV3"} <= ops
    assert "SquaredDifference" not in ops  # tf.nn.moments' op: no BatchNorm left unfused

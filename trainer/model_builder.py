"""Your own model: `model.builder: "package.module:function"` (docs/models.md).

The function takes (input_shape, num_classes) and returns a keras.Model. It is
imported and called on every rank, under the run's dtype policy (so its
layers compute in bfloat16 or float16 under mixed precision), and by the
launcher first, which builds it once and checks it (trainer.model_check), so a
builder that fails to import, raises or returns the wrong shapes stops the job
with one line before any worker starts.

The trainer wants class probabilities in float32 out of the model (its loss,
metrics and export take probabilities). A model that ends in logits gets a
float32 softmax added; one that ends in probabilities of another dtype a
float32 cast. `model.builder_output` says which, or `auto` finds out.
"""

import importlib

import keras
import numpy as np

from trainer.config import ConfigError

PROBABILITY_TOLERANCE = 1e-2  # how far from 1 a row of probabilities may sum (a bfloat16 softmax: ~4e-3)


def _fail(spec: str, why: str) -> ConfigError:
    return ConfigError(f"model.builder={spec!r}: {why}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def import_builder(spec: str):
    """The function `spec` names, or a one-line ConfigError."""
    module_name, _, function_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001  (any error of the user's module is reported, in one line)
        raise _fail(spec, f"cannot import {module_name} ({_first_line(e)})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise _fail(spec, f"{module_name} has no function {function_name}")
    return function


def _call(spec: str, input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    try:
        model = import_builder(spec)(tuple(input_shape), num_classes)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _fail(spec, f"raised {_first_line(e)} for input_shape {tuple(input_shape)}, "
                          f"{num_classes} classes") from None
    if not isinstance(model, keras.Model):
        raise _fail(spec, f"returned a {type(model).__name__}, not a keras.Model")
    if not model.built:
        model.build((None, *input_shape))
    return model


def _check_shapes(spec: str, model: keras.Model, input_shape, num_classes: int) -> None:
    inputs = getattr(model, "inputs", None) or []
    if len(inputs) == 1 and tuple(inputs[0].shape[1:]) != tuple(input_shape):
        raise _fail(spec, f"its model takes input {tuple(inputs[0].shape[1:])}, the data is {tuple(input_shape)}")
    outputs = getattr(model, "outputs", None) or []
    shape = tuple(outputs[0].shape[1:]) if len(outputs) == 1 else \
        tuple(model.compute_output_shape((None, *input_shape))[1:])
    if shape != (num_classes,):
        raise _fail(spec, f"its model outputs shape {shape}, expected ({num_classes},): one value per class")


def outputs_probabilities(model: keras.Model, input_shape) -> bool:
    """Whether `model` ends in probabilities: on random images every row is >= 0 and sums to 1.

    Logits of an untrained model summing to 1 in every row by chance are out of the question.
    """
    images = np.random.default_rng(0).uniform(size=(4, *input_shape)).astype("float32")
    out = np.asarray(keras.ops.convert_to_numpy(model(images, training=False)), dtype=np.float64)
    return bool(np.all(out >= 0) and np.all(np.abs(out.sum(axis=-1) - 1) < PROBABILITY_TOLERANCE))


def build_user_model(spec: str, input_shape: tuple[int, int, int], num_classes: int,
                     output: str = "auto") -> keras.Model:
    """The builder's model, checked, ending in float32 probabilities (functional, as trainer.step wraps it)."""
    model = _call(spec, input_shape, num_classes)
    _check_shapes(spec, model, input_shape, num_classes)
    probabilities = output == "probabilities" or (output == "auto" and outputs_probabilities(model, input_shape))
    if getattr(model, "outputs", None) and len(model.inputs) == 1:
        inputs, x = model.inputs[0], model.outputs[0]  # functional: its layers stay at the top level
    else:
        inputs = keras.Input(input_shape, name="image")  # subclassed: called as one layer
        x = model(inputs)
    if probabilities:
        outputs = keras.layers.Activation("linear", dtype="float32", name="probs")(x)
    else:
        outputs = keras.layers.Activation("softmax", dtype="float32", name="probs")(x)
    return keras.Model(inputs, outputs, name=getattr(model, "name", "model"))

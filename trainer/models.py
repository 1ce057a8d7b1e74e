"""The shared CNN definitions, chosen by `model.name` (or `model.builder`, trainer.model_builder).

Each builder returns a functional Keras model from images in [0, 1] of shape
(image_size, image_size, channels) to class probabilities, whose last layer
computes in float32. The models know nothing of Horovod: trainer.step wraps
them. The names come from trainer.model_names; each built-in name has a
builder function of the same name here, and every keras.applications name
is built by `application`.
"""

import keras
from keras import layers

from trainer.batchnorm import BatchNormalization, fuse_batchnorm
from trainer.model_names import APPLICATIONS, BUILT_IN

L2 = 1e-4  # weight decay of the ResNets, as in He et al. 2016


def simple_cnn(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """Two conv layers, max pooling and a dense head: small, for digits-sized inputs.

    BatchNorm after each conv lifts digits validation accuracy from about 0.983
    to about 0.99 at 60 epochs (three seeds each, measured here).
    """
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    for filters in (32, 64):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.ReLU()(BatchNormalization()(x))
    x = layers.MaxPooling2D(2)(x)
    x = layers.Dropout(0.25)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probs", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="simple_cnn")


def _conv_bn(x, filters: int, strides: int = 1, kernel_size: int = 3):
    x = layers.Conv2D(
        filters, kernel_size, strides=strides, padding="same", use_bias=False,
        kernel_initializer="he_normal", kernel_regularizer=keras.regularizers.L2(L2),
    )(x)
    return BatchNormalization()(x)


def resnet20(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """CIFAR-style ResNet-20: 3 stages of 3 basic blocks, 16/32/64 filters (He et al. 2016)."""
    inputs = keras.Input(input_shape, name="image")
    x = layers.ReLU()(_conv_bn(inputs, 16))
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(3):
            strides = 2 if stage > 0 and block == 0 else 1
            y = layers.ReLU()(_conv_bn(x, filters, strides))
            y = _conv_bn(y, filters)
            if strides != 1 or x.shape[-1] != filters:
                x = _conv_bn(x, filters, strides, kernel_size=1)  # projection shortcut
            x = layers.ReLU()(layers.Add()([x, y]))
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(
        num_classes, activation="softmax", kernel_regularizer=keras.regularizers.L2(L2), name="probs",
        dtype="float32",
    )(x)
    return keras.Model(inputs, outputs, name="resnet20")


def resnet50(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """keras.applications ResNet-50, randomly initialised, for 224-pixel inputs.

    keras.applications.ResNet50 expects caffe-style inputs (0-255, BGR, mean
    subtracted); our inputs are in [0, 1], so they are rescaled to 0-255 and
    centred per channel first. Its BatchNorm layers are trainer.batchnorm's
    (fused kernel; same names and weights).
    """
    inputs = keras.Input(input_shape, name="image")
    x = layers.Rescaling(255.0, offset=-127.5)(inputs)
    base = fuse_batchnorm(keras.applications.ResNet50(
        weights=None, include_top=True, input_shape=input_shape, classes=num_classes, classifier_activation=None,
    ))
    outputs = layers.Activation("softmax", dtype="float32", name="probs")(base(x))
    return keras.Model(inputs, outputs, name="resnet50")


def application(name: str, input_shape: tuple[int, int, int], num_classes: int, fused_bn: bool = True) -> keras.Model:
    """keras.applications' model `name`, randomly initialised (weights=None: nothing is downloaded).

    Its own classification head (include_top) for num_classes, as logits, then
    a float32 softmax. The images, in [0, 1], are scaled to 0-255 and passed
    through the module's own `preprocess_input` (caffe, tf or torch style, or
    nothing where the model rescales its input itself: trainer.model_names
    INPUT_SCALING), so weights trained by Keras's recipe see what they were
    trained on. One-channel images are repeated to three. The model is built
    on that tensor (input_tensor), so its layers sit at the top level, named
    as keras.applications names them: `model.freeze_until` and
    `model.initial_weights` find them. `fused_bn`: its BatchNormalization
    layers are trainer.batchnorm's (model.fused_batchnorm).
    """
    module = getattr(keras.applications, APPLICATIONS[name][0])
    inputs = keras.Input(input_shape, name="image")
    x = inputs if input_shape[-1] == 3 else layers.Concatenate(name="gray_to_rgb")([inputs] * 3)
    x = module.preprocess_input(layers.Rescaling(255.0, name="to_0_255")(x))
    base = getattr(keras.applications, name)(
        weights=None, include_top=True, input_tensor=x, classes=num_classes, classifier_activation=None)
    outputs = layers.Activation("softmax", dtype="float32", name="probs")(base.output)
    model = keras.Model(inputs, outputs, name=name)
    return fuse_batchnorm(model) if fused_bn else model


def _builders() -> dict:
    """The builder of every built-in name, looked up by function name."""
    missing = [name for name in BUILT_IN if not callable(globals().get(name))]
    if missing:
        # Fails at import, not at the first run that asks for the model.
        raise ImportError(f"trainer.model_names lists {', '.join(missing)} but trainer.models has no such builder")
    return {name: globals()[name] for name in BUILT_IN}


BUILDERS = _builders()


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int, fused_bn: bool = True) -> keras.Model:
    """Model `name`: a built-in one or a keras.applications one (fused_bn applies to these)."""
    if name in APPLICATIONS:
        return application(name, tuple(input_shape), num_classes, fused_bn)
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(BUILDERS)} or a keras.applications name")
    return BUILDERS[name](tuple(input_shape), num_classes)


def build_net(model_cfg, input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """The config's model (its `model` section): model.builder's when set, else model.name's."""
    if model_cfg.builder:
        from trainer.model_builder import build_user_model  # imports the config: not for every user of this module

        return build_user_model(model_cfg.builder, input_shape, num_classes, model_cfg.builder_output)
    return build_model(model_cfg.name, input_shape, num_classes, model_cfg.fused_batchnorm)

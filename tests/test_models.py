import keras
import numpy as np
import pytest

from trainer.model_names import APPLICATIONS, BUILT_IN
from trainer.models import BUILDERS, build_model


def test_every_config_choice_has_its_builder():
    # One list of names (trainer.model_names): the config accepts exactly the models that can be built.
    assert tuple(BUILDERS) == BUILT_IN
    assert all(BUILDERS[name].__name__ == name for name in BUILT_IN)


def test_the_applications_table_is_the_installed_keras_applications():
    # The launcher checks names and sizes without TensorFlow, from this table: it must list every
    # constructor of the installed Keras, each with the module whose preprocess_input it takes.
    constructors = {n: getattr(keras.applications, n) for n in dir(keras.applications) if n[0].isupper()}
    assert set(APPLICATIONS) == set(constructors)
    for name, (module, _) in APPLICATIONS.items():
        assert constructors[name].__module__ == f"keras.src.applications.{module}", name


# One model of each input scaling (trainer.model_names.INPUT_SCALING), and the two odd smallest sizes.
@pytest.mark.parametrize("name", ["ResNet50", "MobileNetV2", "DenseNet121", "MobileNetV3Small", "Xception"])
def test_an_application_sees_its_own_preprocessing_and_builds_down_to_its_smallest_size(name):
    module_name, smallest = APPLICATIONS[name]
    shape = (smallest, smallest, 3)
    ours = build_model(name, shape, 7)
    plain = getattr(keras.applications, name)(weights=None, input_shape=shape, classes=7, classifier_activation=None)
    plain.set_weights(ours.get_weights())  # the same layers in the same order: ours adds none with weights
    images = np.random.default_rng(0).random((2, *shape), dtype=np.float32)
    module = getattr(keras.applications, module_name)
    # The first layer with weights sees what Keras's recipe feeds it (the output saturates too much to tell).
    first = next(layer.name for layer in plain.layers if layer.weights)
    seen = keras.Model(ours.input, ours.get_layer(first).output)(images, training=False)
    expect = keras.Model(plain.input, plain.get_layer(first).output)(module.preprocess_input(images * 255.0))
    np.testing.assert_allclose(seen.numpy(), expect.numpy(), rtol=1e-4, atol=1e-4)
    expect = keras.ops.softmax(plain(module.preprocess_input(images * 255.0), training=False)).numpy()
    np.testing.assert_allclose(ours(images, training=False).numpy(), expect, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError):  # the launcher's limit is Keras's: one pixel less does not build
        getattr(keras.applications, name)(weights=None, input_shape=(smallest - 1, smallest - 1, 3), classes=7)


def test_one_channel_images_are_repeated_to_the_three_an_application_takes():
    gray = np.random.default_rng(1).random((2, 32, 32, 1), dtype=np.float32)
    model = build_model("MobileNetV3Small", (32, 32, 1), 4)
    rgb = build_model("MobileNetV3Small", (32, 32, 3), 4)
    rgb.set_weights(model.get_weights())
    np.testing.assert_allclose(model(gray).numpy(), rgb(np.repeat(gray, 3, axis=-1)).numpy(), rtol=1e-5, atol=1e-7)


def test_simple_cnn_on_digits_shape():
    model = build_model("simple_cnn", (8, 8, 1), 10)
    assert model.output_shape == (None, 10)
    # conv 3x3x1x32 and 3x3x32x64 without bias, each with BatchNorm (4 per channel),
    # then dense 1024x128 and 128x10 with biases
    conv1, conv2 = 9 * 32 + 4 * 32, 9 * 32 * 64 + 4 * 64
    assert model.count_params() == conv1 + conv2 + (4 * 4 * 64 * 128 + 128) + (128 * 10 + 10)
    probs = model(np.random.default_rng(0).random((3, 8, 8, 1), dtype=np.float32)).numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_resnet20_is_the_cifar_resnet():
    model = build_model("resnet20", (32, 32, 3), 10)
    assert model.output_shape == (None, 10)
    convs = [layer for layer in model.layers if layer.__class__.__name__ == "Conv2D" and layer.kernel_size == (3, 3)]
    assert len(convs) == 19  # 1 stem + 3 stages x 3 blocks x 2; + dense = 20 weighted layers
    # He et al. report 0.27M parameters for ResNet-20 on CIFAR-10.
    assert 0.26e6 < model.count_params() < 0.28e6


def test_resnet50_from_keras_applications():
    model = build_model("resnet50", (224, 224, 3), 1000)
    assert model.output_shape == (None, 1000)
    # keras.applications.ResNet50 with its 1000-class head: 25,636,712 parameters.
    assert model.count_params() == 25_636_712


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model("vgg", (8, 8, 1), 10)

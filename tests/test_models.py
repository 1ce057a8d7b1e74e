import numpy as np
import pytest

from trainer.config import MODEL_NAMES
from trainer.models import BUILDERS, build_model


def test_every_config_choice_has_its_builder():
    # One list of names (trainer.model_names): the config accepts exactly the models that can be built.
    assert tuple(BUILDERS) == MODEL_NAMES
    assert all(BUILDERS[name].__name__ == name for name in MODEL_NAMES)


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

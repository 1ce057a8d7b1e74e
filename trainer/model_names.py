"""The names `model.name` accepts: the one list that the config checks and the model builders share.

Kept apart from trainer.models so that trainer.config, which the launcher
imports to check a config before any worker starts, needs no TensorFlow.
trainer.models defines one builder function per built-in name, named as the
model; adding a model is a name here and its builder there.

The keras.applications constructors are listed here by hand, with what the
launcher checks before TensorFlow loads: the keras.applications module whose
`preprocess_input` maps the images to what the model expects, and the smallest
image size the model can be built at. tests/test_models.py holds this table to
the installed Keras: every constructor listed, each at its smallest size.
"""

import difflib

BUILT_IN = ("simple_cnn", "resnet20", "resnet50")

# name: (module of keras.applications, smallest model.image_size it builds at). The sizes are
# those of keras.applications' own input check (imagenet_utils.obtain_input_shape, 32 for most),
# which are also where the strided layers would leave no pixel; MobileNetV3 has no check of its own.
APPLICATIONS = {
    **{f"ConvNeXt{size}": ("convnext", 32) for size in ("Tiny", "Small", "Base", "Large", "XLarge")},
    **{f"DenseNet{depth}": ("densenet", 32) for depth in (121, 169, 201)},
    **{f"EfficientNetB{i}": ("efficientnet", 32) for i in range(8)},
    **{f"EfficientNetV2{v}": ("efficientnet_v2", 32) for v in ("B0", "B1", "B2", "B3", "S", "M", "L")},
    "InceptionResNetV2": ("inception_resnet_v2", 75),
    "InceptionV3": ("inception_v3", 75),
    "MobileNet": ("mobilenet", 32),
    "MobileNetV2": ("mobilenet_v2", 32),
    "MobileNetV3Small": ("mobilenet_v3", 32),
    "MobileNetV3Large": ("mobilenet_v3", 32),
    "NASNetMobile": ("nasnet", 32),
    "NASNetLarge": ("nasnet", 32),
    **{f"ResNet{depth}": ("resnet", 32) for depth in (50, 101, 152)},
    **{f"ResNet{depth}V2": ("resnet_v2", 32) for depth in (50, 101, 152)},
    "VGG16": ("vgg16", 32),
    "VGG19": ("vgg19", 32),
    "Xception": ("xception", 71),
}

MODEL_NAMES = BUILT_IN + tuple(APPLICATIONS)

# How each keras.applications module wants its input, for docs/models.md and the builder's comment:
# the images arrive in [0, 1] and are multiplied by 255 first; then the module's preprocess_input.
INPUT_SCALING = {
    "caffe": ("resnet", "vgg16", "vgg19"),  # RGB to BGR, minus the ImageNet mean per channel (0-255)
    "tf": ("inception_v3", "inception_resnet_v2", "xception", "mobilenet", "mobilenet_v2", "nasnet", "resnet_v2"),
    "torch": ("densenet",),  # back to [0, 1], minus the ImageNet mean, over its standard deviation
    "in the model": ("convnext", "efficientnet", "efficientnet_v2", "mobilenet_v3"),  # the model rescales 0-255
}


def close_names(name: str, n: int = 3) -> list[str]:
    """The model names nearest to `name`, ignoring case: for the error that refuses it."""
    lower = {known.lower(): known for known in MODEL_NAMES}
    return [lower[m] for m in difflib.get_close_matches(name.lower(), list(lower), n=n, cutoff=0.6)]


def smallest_image_size(name: str) -> int:
    """The smallest model.image_size model `name` can be built at."""
    if name in APPLICATIONS:
        return APPLICATIONS[name][1]
    return 2 if name == "simple_cnn" else 1  # its 2x2 max pooling needs two pixels; resnet20 pads

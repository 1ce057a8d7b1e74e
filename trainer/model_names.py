"""The names `model.name` accepts: the one list that the config checks and the model builders share.

Kept apart from trainer.models so that trainer.config, which the launcher
imports to check a config before any worker starts, needs no TensorFlow.
trainer.models defines one builder function per name, named as the model;
adding a model is a name here and its builder there.
"""

MODEL_NAMES = ("simple_cnn", "resnet20", "resnet50")

"""The model a run builds, as its checkpoints record it: name, input shape and classes. TensorFlow-free.

The input shape and the class count come from the config, or, where it leaves
them 0, from the data's metadata.json. The workers (trainer.data) and the
checks that run before TensorFlow loads (the launcher, trainer.train,
trainer.evaluate) take them from here, so a checkpoint refused before any
worker starts is exactly one a worker's restore would refuse, with the same
message (trainer.checkpoint.check_model).
"""

import os

from data_pipeline import metadata as md
from trainer.checkpoint import CHECKPOINT_DIR, CheckpointManager, check_model
from trainer.config import ConfigError, ExperimentConfig


def model_input(cfg: ExperimentConfig, meta: dict | None) -> tuple[tuple[int, int, int], int]:
    """(input shape, class count) of the config's model; `meta` is the data's metadata.json (None: synthetic)."""
    m = cfg.model
    if meta is None:
        return (m.image_size, m.image_size, m.channels), m.num_classes
    shape = meta.get("image_shape")
    image_size = m.image_size or (shape[0] if shape and shape[0] == shape[1] else 0)
    if not image_size:
        raise ConfigError(
            f"model.image_size=0: the images in {cfg.data.dir!r} differ in size or are not square; set it")
    channels = m.channels or int(meta["channels"])
    classes = len(meta["class_names"])
    num_classes = m.num_classes or classes
    if num_classes < classes:
        raise ConfigError(f"model.num_classes={num_classes}: the data has {classes} classes")
    return (image_size, image_size, channels), num_classes


def model_signature(name: str, input_shape, num_classes: int) -> dict:
    """What a checkpoint must match to be restored into a model (stored in its state.json)."""
    return {"name": name, "input_shape": list(input_shape), "num_classes": num_classes}


def config_signature(cfg: ExperimentConfig) -> dict:
    """The signature of the model `cfg` builds; reads metadata.json (a DataError names what is wrong with it)."""
    meta = None if cfg.data.synthetic else md.load_metadata(cfg.data.dir)
    return model_signature(cfg.model.name, *model_input(cfg, meta))


def checkpoints(cfg: ExperimentConfig) -> CheckpointManager:
    """The run's checkpoints, for looking only (the trainer's own manager is made by trainer.outputs)."""
    return CheckpointManager(os.path.join(cfg.run_dir, CHECKPOINT_DIR))


def check_resume(cfg: ExperimentConfig) -> None:
    """Raises CheckpointError when the checkpoint a resume would restore was written for another model."""
    if not cfg.train.resume:
        return
    manager = checkpoints(cfg)
    path = manager.latest()
    if path is not None:
        check_model(path, manager.read_state(path), config_signature(cfg))


def check_checkpoint(cfg: ExperimentConfig, which: str) -> None:
    """The same for the checkpoint `which` (latest, best or a folder) of trainer.evaluate; also when there is none."""
    manager = checkpoints(cfg)
    path = manager.resolve(which)
    check_model(path, manager.read_state(path), config_signature(cfg))

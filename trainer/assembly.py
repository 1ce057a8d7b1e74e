"""The model, its optimizer and what identifies them: built the same way for training and evaluation."""

import hashlib

import keras

from trainer.config import ExperimentConfig, dump_yaml
from trainer.data import DataSpec
from trainer.models import build_model
from trainer.step import DataParallelModel


def build_optimizer(cfg: ExperimentConfig, schedule) -> keras.optimizers.Optimizer:
    if cfg.train.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=schedule)
    return keras.optimizers.SGD(learning_rate=schedule, momentum=cfg.train.momentum, nesterov=True)


def build_compiled_model(cfg: ExperimentConfig, spec: DataSpec, schedule, stop_request=None) -> DataParallelModel:
    """The config's model, compiled, with its optimizer's variables created.

    `stop_request` (a trainer.preemption.StopRequest) lets a signal stop
    training at a step all ranks agree on; evaluation passes none.
    """
    model = DataParallelModel.wrap(
        build_model(cfg.model.name, spec.input_shape, spec.num_classes), cfg.allreduce.fp16_compression,
        stop_request=stop_request, time_input=not cfg.runtime.deterministic,
    )
    model.compile(
        optimizer=build_optimizer(cfg, schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        # Horovod's ops have no XLA kernels on CPU builds.
        jit_compile=False,
    )
    model.optimizer.build(model.trainable_variables)
    return model


def model_signature(cfg: ExperimentConfig, spec: DataSpec) -> dict:
    """What a checkpoint must match to be restored into this run's model."""
    return {"name": cfg.model.name, "input_shape": list(spec.input_shape), "num_classes": spec.num_classes}


def config_hash(cfg: ExperimentConfig) -> str:
    return hashlib.sha256(dump_yaml(cfg).encode()).hexdigest()

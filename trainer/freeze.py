"""Fine-tuning phases: `model.freeze_until` a layer, until `model.unfreeze_epoch` (docs/models.md).

As Keras's transfer-learning guide does it: a frozen layer has trainable
False, so it gets no gradient and no update, and a frozen BatchNormalization
runs in inference mode (Keras 3 does so for a non-trainable BatchNorm), its
statistics kept. The optimizer is built over every weight before any is
frozen (trainer.assembly), so its state has one layout in both phases and a
checkpoint of either restores into the other. The phase follows from the epoch
alone: a resume at any step is in the phase the uninterrupted run was in.
"""

import logging

import keras

from trainer.config import ConfigError

log = logging.getLogger(__name__)


def freeze_layers(model: keras.Model, until: str) -> list:
    """Makes the layers from the first up to and including `until` non-trainable; returns them."""
    names = [layer.name for layer in model.layers]
    if until not in names:
        raise ConfigError(f"model.freeze_until={until!r}: model {model.name} has no such layer (its first layers: "
                          f"{', '.join(names[:4])}, ...; its last: {', '.join(names[-3:])})")
    frozen = model.layers[: names.index(until) + 1]
    for layer in frozen:
        layer.trainable = False
    return frozen


def frozen_in(model_cfg, epoch: int) -> bool:
    """Whether epoch `epoch` (0-based) trains with model.freeze_until's layers frozen."""
    return bool(model_cfg.freeze_until) and (not model_cfg.unfreeze_epoch or epoch < model_cfg.unfreeze_epoch - 1)


def split_phases(phases: list[tuple[int, int, int]], model_cfg, steps_per_epoch: int) -> list[tuple[int, int, int]]:
    """trainer.resume.fit_phases with a fit call ending where the layers are unfrozen."""
    boundary = model_cfg.unfreeze_epoch - 1 if model_cfg.freeze_until and model_cfg.unfreeze_epoch else 0
    out = []
    for initial, end, steps in phases:
        if initial < boundary < end:
            out += [(initial, boundary, steps), (boundary, end, steps_per_epoch)]
        else:
            out.append((initial, end, steps))
    return out


def set_phase(model, model_cfg, epoch: int) -> None:
    """Freezes or unfreezes for epoch `epoch`; the train step is traced anew when the trainable set changed."""
    if not model_cfg.freeze_until:
        return
    before = [v.path for v in model.trainable_variables]
    if frozen_in(model_cfg, epoch):
        frozen = freeze_layers(model, model_cfg.freeze_until)
        model.frozen_variables = {id(v) for layer in frozen for v in layer.variables}
    else:
        for layer in model.layers:
            layer.trainable = True
        model.frozen_variables = set()
    after = [v.path for v in model.trainable_variables]
    if after != before:
        # Keras and trainer.step keep the traced step; it holds the old trainable set.
        model.train_function = None
        model.reset_parts()
        log.info("epoch %d: %d of %d weights train (model.freeze_until=%s, model.unfreeze_epoch=%d)",
                 epoch + 1, len(after), len(model.weights), model_cfg.freeze_until, model_cfg.unfreeze_epoch)

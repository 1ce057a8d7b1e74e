"""Learning rate: the linear scaling rule with gradual warmup (Goyal et al. 2017)."""

import math

import keras
from keras import ops


def peak_learning_rate(base_lr: float, global_batch_size: int, reference_batch_size: int) -> float:
    """Linear scaling: k times the batch, k times the learning rate."""
    return base_lr * global_batch_size / reference_batch_size


@keras.saving.register_keras_serializable(package="hvd_keras_cnn")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from `initial` to `peak`, then cosine decay to 0 or constant.

    Goyal et al. start from the learning rate of a single worker and ramp to the
    scaled one over a few epochs: large-batch training diverges early otherwise.
    """

    def __init__(self, initial: float, peak: float, warmup_steps: int, total_steps: int, decay: str = "cosine"):
        self.initial = float(initial)
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.decay = decay

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warmup = max(self.warmup_steps, 1)
        warm_lr = self.initial + (self.peak - self.initial) * ops.minimum(step / warmup, 1.0)
        if self.decay == "constant":
            return warm_lr
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = ops.clip((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        cosine_lr = 0.5 * self.peak * (1.0 + ops.cos(math.pi * progress))
        return ops.where(step < self.warmup_steps, warm_lr, cosine_lr)

    def get_config(self):
        return {
            "initial": self.initial,
            "peak": self.peak,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "decay": self.decay,
        }


def make_schedule(train_cfg, global_batch_size: int, world_size: int, steps_per_epoch: int) -> WarmupSchedule:
    peak = peak_learning_rate(train_cfg.base_learning_rate, global_batch_size, train_cfg.reference_batch_size)
    warmup_steps = int(round(train_cfg.warmup_epochs * steps_per_epoch))
    # Warm up from the learning rate one rank would use alone (peak / world
    # size), as Horovod's LearningRateWarmupCallback does.
    initial = peak / world_size if warmup_steps else peak
    return WarmupSchedule(initial, peak, warmup_steps, train_cfg.epochs * steps_per_epoch, train_cfg.lr_decay)

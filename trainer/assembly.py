"""The model, its optimizer and what identifies them: built the same way for training and evaluation."""

import hashlib
import logging

import keras
import tensorflow as tf

from trainer.config import ExperimentConfig, dump_yaml, weight_decay_exclusions
from trainer.data_spec import DataSpec
from trainer.ema import start_average
from trainer.models import build_net
from trainer.step import DataParallelModel

log = logging.getLogger(__name__)


def gpu_compute_capability() -> tuple[int, int] | None:
    """The compute capability of this process's first visible GPU, or None on CPU."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    return tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (0, 0))


# The x86 instruction sets of bfloat16 arithmetic, as Linux names them in /proc/cpuinfo's flags.
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_bfloat16(flags: str) -> bool:
    """Whether a CPU's flags (as /proc/cpuinfo lists them, space-separated) include a bfloat16 instruction set."""
    return not set(flags.split()).isdisjoint(BFLOAT16_CPU_FLAGS)


def cpuinfo() -> dict[str, str]:
    """The fields of /proc/cpuinfo's first processor (`flags`, `model name`, ...); empty where there is none."""
    fields = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break  # the end of the first processor's block
                name, _, value = line.partition(":")
                fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_flags() -> str:
    """The `flags` of /proc/cpuinfo's first processor; empty where there is none (not Linux, not x86)."""
    return cpuinfo().get("flags", "")


def resolve_precision(precision: str, capability: tuple[int, int] | None, cpu_bfloat16: bool = False) -> str:
    """`train.precision` with `auto` resolved for the device (`capability` None: CPU).

    GPUs follow NVIDIA's recipes (not measured here): bfloat16 from compute
    capability 8.0 (Ampere), whose range needs no loss scaling, float16
    before. On a CPU (`cpu_bfloat16`: cpu_has_bfloat16 of its flags)
    mixed_bfloat16 where it has bfloat16 instructions, float32 otherwise:
    see docs/benchmarks.md for the measurement.
    """
    if precision != "auto":
        return precision
    if capability is None:
        return "mixed_bfloat16" if cpu_bfloat16 else "float32"
    return "mixed_bfloat16" if tuple(capability) >= (8, 0) else "mixed_float16"


def this_device() -> tuple[tuple[int, int] | None, bool]:
    """(compute capability or None on CPU, whether the CPU has bfloat16 instructions): what `auto` depends on."""
    capability = gpu_compute_capability()
    return capability, capability is None and cpu_has_bfloat16(cpu_flags())


def agreed_precision(precision: str, devices: list) -> str:
    """`train.precision` resolved alike for ranks on the `devices` (this_device() of each).

    Ranks that resolved `auto` each for itself on different hardware would
    compute apart, and mixed_float16 beside another policy would average
    loss-scaled gradients with unscaled ones. Where their resolutions
    differ, the one every device runs: mixed_float16 on GPUs, else float32.
    """
    resolved = {resolve_precision(precision, capability, bf16) for capability, bf16 in devices}
    if len(resolved) == 1:
        return resolved.pop()
    return "mixed_float16" if all(capability is not None for capability, _ in devices) else "float32"


def run_precision(cfg: ExperimentConfig, ctx) -> str:
    """The precision every rank of this run uses (collective when `auto` with several ranks, not elastic).

    Under elastic training no collective may run before the elastic
    function: each rank resolves for itself, and trainer.elastic refuses a
    worker whose result differs from rank 0's.
    """
    mine = this_device()
    local = resolve_precision(cfg.train.precision, *mine)
    if cfg.train.precision != "auto" or ctx.size == 1 or ctx.elastic:
        return local
    devices = ctx.allgather_object(mine, "precision.devices")
    agreed = agreed_precision(cfg.train.precision, devices)
    if agreed != local:
        log.warning("train.precision auto: %s on every rank, where this rank's device alone would take %s "
                    "(the ranks' devices differ: %s)", agreed, local, devices)
    return agreed


def resolve_jit(jit_compile: str, capability: tuple[int, int] | None) -> bool:
    """`train.jit_compile` as a bool: `auto` compiles on GPU only (slower on this CPU, docs/benchmarks.md)."""
    value = jit_compile.lower()
    if value == "auto":
        return capability is not None
    return value == "true"


class _KeepsTrainingWeights:
    """Keras's fit ends by overwriting the weights with their average (train.ema): not here (see trainer.ema)."""

    def finalize_variable_values(self, var_list):
        pass


class SGD(_KeepsTrainingWeights, keras.optimizers.SGD):
    pass


class Adam(_KeepsTrainingWeights, keras.optimizers.Adam):
    pass


class AdamW(_KeepsTrainingWeights, keras.optimizers.AdamW):
    pass


def decay_excluded(model, exclude: list[str]) -> list:
    """The trainable weights train.weight_decay_exclude names: BatchNorm's gamma and beta, layers' biases."""
    found = []
    for layer in model._flatten_layers(include_self=False, recursive=True):  # noqa: SLF001  (as trainer.precise_bn)
        if "batchnorm" in exclude and isinstance(layer, keras.layers.BatchNormalization):
            found.extend(layer.trainable_weights)
        bias = getattr(layer, "bias", None)
        if "bias" in exclude and isinstance(bias, keras.Variable) and bias.trainable:
            found.append(bias)
    return found


def build_optimizer(cfg: ExperimentConfig, schedule, precision: str = "float32", model=None):
    """The optimizer of train.optimizer, with train.weight_decay and train.ema; call before it is built.

    Weight decay is Keras's decoupled one: each step multiplies the decayed
    weights by 1 - learning_rate x weight_decay before the gradient update
    (AdamW for adam). `model` gives the weights it leaves alone
    (train.weight_decay_exclude).
    """
    t = cfg.train
    extra = {"use_ema": True, "ema_momentum": t.ema} if t.ema else {}
    if t.weight_decay:
        extra["weight_decay"] = t.weight_decay
    if t.optimizer == "adam":
        optimizer = (AdamW if t.weight_decay else Adam)(learning_rate=schedule, **extra)
    else:
        optimizer = SGD(learning_rate=schedule, momentum=t.momentum, nesterov=True, **extra)
    if t.weight_decay and model is not None:
        optimizer.exclude_from_weight_decay(var_list=decay_excluded(model, weight_decay_exclusions(
            t.weight_decay_exclude)))
    if precision == "mixed_float16":
        # float16 gradients underflow without it. Its scale is optimizer state:
        # checkpoints save and restore it with the other optimizer variables.
        # It calls the inner optimizer's apply (weight decay, average) only on finite steps.
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=t.initial_loss_scale)
    return optimizer


@keras.saving.register_keras_serializable(package="hvd_keras_cnn")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy of integer labels against the labels smoothed by `smoothing` (train.label_smoothing).

    Written here because Keras's SparseCategoricalCrossentropy has no
    label_smoothing (its CategoricalCrossentropy has, on one-hot labels, which
    the input pipeline does not produce): the labels are made one-hot here and
    handed to Keras's categorical_crossentropy with its label_smoothing.
    """

    def __init__(self, smoothing: float, name: str = "smoothed_sparse_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.smoothing = float(smoothing)

    def call(self, y_true, y_pred):
        labels = tf.reshape(tf.cast(y_true, tf.int32), [-1])
        one_hot = tf.one_hot(labels, tf.shape(y_pred)[-1], dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(one_hot, y_pred, label_smoothing=self.smoothing)

    def get_config(self):
        return {**super().get_config(), "smoothing": self.smoothing}


def training_loss(label_smoothing: float = 0.0, soft_labels: bool = False) -> keras.losses.Loss:
    """The loss of the train step; validation always uses the plain cross-entropy (trainer.evaluation).

    `soft_labels`: the training labels are float [batch, classes] (mixup,
    cutmix: data.augment.mixes); Keras's categorical cross-entropy takes
    them, smoothing them by label_smoothing (y * (1 - s) + s / classes).
    """
    if soft_labels:
        return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
    if label_smoothing:
        return SmoothedSparseCrossentropy(label_smoothing)
    return keras.losses.SparseCategoricalCrossentropy()


def build_compiled_model(cfg: ExperimentConfig, spec: DataSpec, schedule, stop_request=None,
                         precision: str | None = None) -> DataParallelModel:
    """The config's model, compiled, with its optimizer's variables created.

    `stop_request` (a trainer.preemption.StopRequest) lets a signal stop
    training at a step all ranks agree on; evaluation passes none.
    `precision`: the dtype policy (run_precision); None resolves
    train.precision for this process's device alone.
    """
    capability = gpu_compute_capability()
    precision = precision or resolve_precision(cfg.train.precision, *this_device())
    compile_parts = resolve_jit(cfg.train.jit_compile, capability)
    log.info("precision %s, XLA for the gradients and the update: %s", precision, compile_parts)
    previous = keras.config.dtype_policy()
    # The policy is global in Keras: set only while the layers are made, which keep their own.
    keras.config.set_dtype_policy(precision)
    try:
        model = DataParallelModel.wrap(
            build_net(cfg.model, spec.input_shape, spec.num_classes), cfg.allreduce.fp16_compression,
            stop_request=stop_request, time_input=not cfg.runtime.deterministic,
            accumulation_steps=cfg.train.accumulation_steps, compile_parts=compile_parts,
            watch_nonfinite=cfg.train.stop_on_nonfinite,
        )
    finally:
        keras.config.set_dtype_policy(previous)
    soft = cfg.data.augment.mixes
    model.compile(
        optimizer=build_optimizer(cfg, schedule, precision, model),
        loss=training_loss(cfg.train.label_smoothing, soft),
        # On soft labels: whether the prediction is the label with the most weight (the dominant image's).
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy") if soft
                 else keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        # Horovod's ops have no XLA kernels on CPU builds: at most the parts
        # around the allreduce are compiled (compile_parts above).
        jit_compile=False,
    )
    model.optimizer.build(model.trainable_variables)
    start_average(model)
    warn_l2_besides_decay(cfg, model)
    return model


def warn_l2_besides_decay(cfg: ExperimentConfig, model) -> None:
    """One warning when train.weight_decay decays weights that an L2 regularizer also pulls to 0 (resnet20)."""
    if not cfg.train.weight_decay or not model.losses:
        return
    log.warning("train.weight_decay=%g with model %s, whose kernel_regularizer adds an L2 penalty to the loss: "
                "both shrink those weights (docs/training.md#weight-decay)", cfg.train.weight_decay, cfg.model.name)


def config_hash(cfg: ExperimentConfig) -> str:
    return hashlib.sha256(dump_yaml(cfg).encode()).hexdigest()

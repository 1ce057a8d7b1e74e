"""keras.applications models in this trainer (`make bench ARGS="--only models"`), not a test.

EfficientNetV2B0 and MobileNetV3Small on synthetic 128x128x3 inputs, 1000
classes, 32 images per replica, one thread per rank, float32, at np=1 and
np=2, each with the project's fused BatchNormalization (model.fused_batchnorm
true, the default) and with Keras's own (false). The variants alternate
within each repetition; images/s (the epochs after the first, summary.json)
and the per-repetition ratio fused / Keras, medians with min and max.
The 128-pixel input keeps a repetition to minutes on a CPU; the ImageNet
recipes train these models at 224 or more.
"""

import time

from bench_common import machine, stats, timestamp, trainer_summary

MODELS = ("EfficientNetV2B0", "MobileNetV3Small")
BATCH = 32
SIZE = 128
EPOCHS = 3
CONFIG = "configs/bench_resnet20.yaml"  # synthetic input; the model and its shape are set below
STEPS = {"EfficientNetV2B0": 12, "MobileNetV3Small": 40}  # about 10 s an epoch at np=1 here


def _rate(model: str, np_: int, fused: bool, scale: float) -> float:
    steps = max(3, round(STEPS[model] * scale))
    return trainer_summary(np_, CONFIG, (
        f"model.name={model}", f"model.image_size={SIZE}", "model.num_classes=1000", "model.channels=3",
        f"model.fused_batchnorm={str(fused).lower()}", f"data.global_batch_size={BATCH * np_}",
        f"train.steps_per_epoch={steps}", f"train.epochs={EPOCHS}", "train.precision=float32",
        "train.optimizer=sgd"))["images_per_sec"]


def run(repeats: int, scale: float = 1.0) -> dict:
    """The section's results, for bench_common.merge_results; `scale` multiplies the steps per epoch."""
    started = time.time()
    variants = {f"{m}_np{n}_{'fused' if f else 'keras'}_bn": (m, n, f)
                for m in MODELS for n in (1, 2) for f in (True, False)}
    runs: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(repeats):
        for name, (m, n, f) in variants.items():
            runs[name].append(_rate(m, n, f, scale))
        print(f"models repeat {rep + 1}/{repeats}: " + ", ".join(f"{k}={v[-1]:.1f}" for k, v in runs.items()),
              flush=True)
    ratios = {f"{m}_np{n}_fused_vs_keras_bn": stats([a / b for a, b in zip(runs[f"{m}_np{n}_fused_bn"],
                                                                            runs[f"{m}_np{n}_keras_bn"])])
              for m in MODELS for n in (1, 2)}
    for key, value in ratios.items():
        print(f"models: {key} median {value['median']:.3f} (min {value['min']:.3f}, max {value['max']:.3f})")
    return {"images_per_sec": {k: stats(v) for k, v in runs.items()}, **ratios,
            "input": f"synthetic {SIZE}x{SIZE}x3, 1000 classes", "per_replica_batch_size": BATCH,
            "precision": "float32", "timed_epochs": EPOCHS - 1, "repeats": repeats, "machine": machine(),
            "date": timestamp(), "bench_seconds": round(time.time() - started, 1)}

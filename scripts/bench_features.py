"""The training step's options side by side (`make bench ARGS="--only precision,jit,accumulation"`).

All on ResNet-20 with synthetic 32x32 inputs, 64 images per replica per
micro-batch, one thread per rank, the variants alternated within each
repetition; medians, minima and maxima over the repetitions:

  precision     float32, mixed_bfloat16 and mixed_float16 at np=1; float32,
                mixed_bfloat16 and float32 with fp16 allreduce compression at
                np=2: images/s, and ratios to float32 per repetition. Then the
                digits validation accuracy of each precision at np=1 and np=2
                (one run each, `--digits-epochs` epochs).
  jit           train.jit_compile false / true for ResNet-20 and the simple CNN
                at np=1: images/s and the ratio on/off.
  accumulation  train.accumulation_steps 1 / 4 at np=2: images/s, and
                allreduces/s (one per optimizer step).
  nonfinite     train.stop_on_nonfinite true / false (the per-step check of
                the loss and every weight) at np=2 and np=1, float32: images/s
                and the ratio on/off. (mixed_float16, 77 images/s on a CPU,
                would take 7 minutes a repetition.)

bench.py calls `run` with the steps per epoch it calibrated; the timed epochs
are those after the first (summary.json's images_per_sec).
"""

import os
import sys
import tempfile
import time

from bench_common import ROOT, machine, stats, timestamp, trainer_summary

BATCH = 64
EPOCHS = 3
CONFIG = "configs/bench_resnet20.yaml"
SECTIONS = ("precision", "jit", "accumulation", "nonfinite")


def _rate(np_: int, steps: int, *sets: str, accumulation: int = 1) -> float:
    # The same time per epoch whatever the accumulation: an optimizer step is `accumulation` micro-batches.
    steps = max(2, steps // accumulation)
    return trainer_summary(np_, CONFIG, (f"data.global_batch_size={BATCH * np_}", f"train.steps_per_epoch={steps}",
                                         f"train.epochs={EPOCHS}", f"train.accumulation_steps={accumulation}",
                                         *sets))["images_per_sec"]


def _alternate(variants: dict, repeats: int, label: str) -> dict:
    """{name: [rate per repetition]}, every variant once per repetition, in turn."""
    runs = {name: [] for name in variants}
    for rep in range(repeats):
        for name, measure in variants.items():
            runs[name].append(measure())
        print(f"{label} repeat {rep + 1}/{repeats}: " + ", ".join(f"{k}={v[-1]:.1f}" for k, v in runs.items()),
              flush=True)
    return runs


def _ratios(runs: dict, pairs: dict) -> dict:
    """Per-repetition ratios of the variants named in `pairs` ({ratio: (numerator, denominator)})."""
    return {k: stats([a / b for a, b in zip(runs[n], runs[d])]) for k, (n, d) in pairs.items()}


def _digits_shards(work: str) -> str:
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import export_digits
    from data_pipeline.build_shards import build
    from data_pipeline.images import ImageOptions

    images, shards = os.path.join(work, "digits"), os.path.join(work, "digits-shards")
    export_digits.export(images)
    build(images, shards, num_shards=4, val_fraction=0.2, seed=0, image_options=ImageOptions(channels=1))
    return shards


def precision(steps: int, repeats: int, digits_epochs: int) -> dict:
    p = "train.precision="
    variants = {
        "np1_float32": lambda: _rate(1, steps, p + "float32"),
        "np1_mixed_bfloat16": lambda: _rate(1, steps, p + "mixed_bfloat16"),
        "np1_mixed_float16": lambda: _rate(1, steps, p + "mixed_float16"),
        "np2_float32": lambda: _rate(2, steps, p + "float32"),
        "np2_mixed_bfloat16": lambda: _rate(2, steps, p + "mixed_bfloat16"),
        "np2_float32_fp16_allreduce": lambda: _rate(2, steps, p + "float32", "allreduce.fp16_compression=true"),
    }
    runs = _alternate(variants, repeats, "precision")
    ratios = _ratios(runs, {
        "np1_mixed_bfloat16_vs_float32": ("np1_mixed_bfloat16", "np1_float32"),
        "np1_mixed_float16_vs_float32": ("np1_mixed_float16", "np1_float32"),
        "np2_mixed_bfloat16_vs_float32": ("np2_mixed_bfloat16", "np2_float32"),
        "np2_fp16_allreduce_vs_float32": ("np2_float32_fp16_allreduce", "np2_float32"),
    })
    accuracy = {}
    with tempfile.TemporaryDirectory(prefix="bench-digits-") as work:
        shards = _digits_shards(work)
        for np_ in (1, 2):
            for name in ("float32", "mixed_bfloat16", "mixed_float16"):
                summary = trainer_summary(np_, "configs/digits.yaml", (
                    f"data.dir={shards}", f"train.epochs={digits_epochs}", "train.export=false", p + name))
                accuracy[f"np{np_}_{name}"] = round(summary["val_accuracy"], 4)
                print(f"digits np={np_} {name}: val_accuracy {summary['val_accuracy']:.4f}", flush=True)
    return {"images_per_sec": {k: stats(v) for k, v in runs.items()}, **ratios,
            "digits_val_accuracy": accuracy, "digits_epochs": digits_epochs}


def jit(steps: int, repeats: int) -> dict:
    variants = {}
    for model in ("resnet20", "simple_cnn"):
        for on in ("false", "true"):
            variants[f"{model}_jit_{on}"] = (
                lambda m=model, o=on: _rate(1, steps, f"model.name={m}", f"train.jit_compile={o}"))
    runs = _alternate(variants, repeats, "jit")
    ratios = _ratios(runs, {f"{m}_jit_on_vs_off": (f"{m}_jit_true", f"{m}_jit_false")
                            for m in ("resnet20", "simple_cnn")})
    return {"images_per_sec": {k: stats(v) for k, v in runs.items()}, **ratios, "np": 1}


def accumulation(steps: int, repeats: int) -> dict:
    variants = {f"np2_accumulation_{n}": (lambda n=n: _rate(2, steps, accumulation=n)) for n in (1, 4)}
    runs = _alternate(variants, repeats, "accumulation")
    # One allreduce per optimizer step, which takes `n` micro-batches of BATCH per rank.
    allreduces = {k: stats([r / (BATCH * 2 * n) for r in v]) for (k, v), n in zip(runs.items(), (1, 4))}
    return {"images_per_sec": {k: stats(v) for k, v in runs.items()}, "allreduces_per_sec": allreduces,
            **_ratios(runs, {"images_per_sec_4_vs_1": ("np2_accumulation_4", "np2_accumulation_1")})}


def nonfinite(steps: int, repeats: int) -> dict:
    cases = {"np2_float32": (2, "float32"), "np1_float32": (1, "float32")}
    variants = {f"{case}_check_{on}": (lambda n=n, p=p, o=on: _rate(n, steps, f"train.precision={p}",
                                                                     f"train.stop_on_nonfinite={o}"))
                for case, (n, p) in cases.items() for on in ("true", "false")}
    runs = _alternate(variants, repeats, "nonfinite")
    ratios = _ratios(runs, {f"{case}_check_on_vs_off": (f"{case}_check_true", f"{case}_check_false")
                            for case in cases})
    return {"images_per_sec": {k: stats(v) for k, v in runs.items()}, **ratios}


def run(section: str, steps: int, repeats: int, digits_epochs: int = 20) -> dict:
    """One section's results, ready for bench_common.merge_results."""
    started = time.time()
    if section == "precision":
        result = precision(steps, repeats, digits_epochs)
    elif section == "jit":
        result = jit(steps, repeats)
    elif section == "nonfinite":
        result = nonfinite(steps, repeats)
    else:
        result = accumulation(steps, repeats)
    for key, value in result.items():
        if isinstance(value, dict) and "median" in value:
            print(f"{section}: {key} median {value['median']:.3f} (min {value['min']:.3f}, max {value['max']:.3f})")
    return {**result, "model": "resnet20", "input": "synthetic 32x32x3", "per_replica_batch_size": BATCH,
            "steps_per_epoch": steps, "timed_epochs": EPOCHS - 1, "repeats": repeats, "machine": machine(),
            "date": timestamp(), "bench_seconds": round(time.time() - started, 1)}

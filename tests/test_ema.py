"""train.weight_decay and train.ema: one optimizer step in one process, and a real 2-rank run with a stop and resume."""

import json

import numpy as np
import pytest

from helpers import checkpoint_dir, evaluation_predictions, run
from test_horovod import epoch_records, launch_argv, messages

LR = 0.1  # a constant learning rate: build_compiled_model takes a float for the schedule


def _model(*overrides):
    """simple_cnn (two bias-free convs with BatchNorm, two Dense layers with biases), compiled, seed 3."""
    import keras

    from trainer.assembly import build_compiled_model
    from trainer.config import load_config
    from trainer.data_spec import DataSpec

    cfg = load_config(None, ["run_dir=unused", "data.synthetic=true", "model.image_size=8", "model.channels=1",
                             "model.num_classes=4", "train.steps_per_epoch=2", *overrides])
    keras.utils.set_random_seed(3)
    return build_compiled_model(cfg, DataSpec((8, 8, 1), 4, 2, [], []), LR)


def _step(model, grads, scale: float = 1.0) -> None:
    """One optimizer update from `grads` (loss-scaled by `scale`, as the train step hands them over)."""
    import tensorflow as tf

    applied = tf.constant(bool(np.all([np.isfinite(g).all() for g in grads])))
    model.apply_gradients([tf.constant(g * np.float32(scale)) for g in grads], applied)


def _kinds(model) -> list[str]:
    """What each trainable weight is: `kernel`, `bn` (gamma, beta) or `bias`."""
    import keras

    kinds = {}
    for layer in model._flatten_layers(include_self=False):  # noqa: SLF001
        for w in layer.trainable_weights:
            kinds[id(w)] = "bn" if isinstance(layer, keras.layers.BatchNormalization) else (
                "bias" if w is getattr(layer, "bias", None) else "kernel")
    return [kinds[id(w)] for w in model.trainable_variables]


@pytest.mark.parametrize("optimizer,precision", [("sgd", "float32"), ("adam", "float32"), ("sgd", "mixed_float16")])
def test_one_step_decays_the_kernels_by_lr_times_wd_and_leaves_batchnorm_and_biases(optimizer, precision):
    wd = 0.05
    common = (f"train.optimizer={optimizer}", f"train.precision={precision}", "train.momentum=0.5")
    decayed, plain = _model(*common, f"train.weight_decay={wd}"), _model(*common)
    assert _kinds(decayed) == ["kernel", "bn", "bn", "kernel", "bn", "bn", "kernel", "bias", "kernel",
                                            "bias"]
    before = [w.numpy() for w in decayed.trainable_variables]
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(before, plain.trainable_variables))
    rng = np.random.default_rng(0)
    grads = [rng.normal(0, 0.1, w.shape).astype(np.float32) for w in before]
    scale = 1024.0 if precision == "mixed_float16" else 1.0
    for model in (decayed, plain):
        if scale != 1.0:
            model.optimizer.dynamic_scale.assign(scale)
        _step(model, grads, scale)
    for kind, w0, a, b in zip(_kinds(decayed), before, decayed.trainable_variables, plain.trainable_variables):
        a, b = a.numpy(), b.numpy()
        assert not np.array_equal(b, w0)  # the gradient part moved every weight
        if kind == "kernel":
            # The same gradient update, and the decay on top: w <- w - lr * wd * w first (Keras's order).
            np.testing.assert_allclose(b - a, LR * wd * w0, rtol=1e-4, atol=1e-8, err_msg=kind)
        else:
            np.testing.assert_array_equal(a, b, err_msg=kind)  # not decayed at all
    if precision == "mixed_float16":
        # A step whose gradients overflow is skipped: no decay either.
        kept = [w.numpy() for w in decayed.trainable_variables]
        _step(decayed, [np.full_like(g, np.inf) for g in grads], scale)
        assert all(np.array_equal(k, w.numpy()) for k, w in zip(kept, decayed.trainable_variables))


def test_an_empty_exclusion_decays_every_weight():
    decayed = _model("train.weight_decay=0.05", "train.weight_decay_exclude=")
    plain = _model()
    before = [w.numpy() for w in decayed.trainable_variables]
    zeros = [np.zeros_like(w) for w in before]
    for model in (decayed, plain):
        _step(model, zeros)
    for w0, a in zip(before, decayed.trainable_variables):
        np.testing.assert_allclose(a.numpy(), w0 - w0 * np.float32(0.05) * np.float32(LR), rtol=1e-6)


def test_the_average_starts_at_the_weights_and_a_skipped_step_leaves_it():
    from trainer.ema import EvaluatedWeights, averages

    model = _model("train.ema=0.75", "train.precision=mixed_float16", "train.optimizer=sgd", "train.momentum=0")
    w0 = [w.numpy() for w in model.trainable_variables]
    assert all(np.array_equal(a.numpy(), w) for a, w in zip(averages(model.optimizer), w0))
    grads = [np.full_like(w, 0.5) for w in w0]
    _step(model, [np.full_like(g, np.nan) for g in grads], 32768.0)  # skipped; `iterations` still counts it
    assert int(model.optimizer.iterations.numpy()) == 1
    assert all(np.array_equal(a.numpy(), w) for a, w in zip(averages(model.optimizer), w0))
    _step(model, grads, float(model.optimizer.dynamic_scale.numpy()))
    w1 = [w.numpy() for w in model.trainable_variables]
    for a, before, after in zip(averages(model.optimizer), w0, w1):
        # From the initial weights, not from Keras's zeros (which the skipped first step would have kept).
        np.testing.assert_allclose(a.numpy(), 0.75 * before + 0.25 * after, rtol=1e-6, atol=1e-7)
    # Swapped in for an evaluation and back: the training weights come back bit for bit.
    weights = EvaluatedWeights(model, True)
    with weights.swapped():
        assert weights.name == "ema"
        assert all(np.array_equal(w.numpy(), a.numpy()) for w, a in zip(model.trainable_variables,
                                                                        averages(model.optimizer)))
    assert all(np.array_equal(w.numpy(), k) for w, k in zip(model.trainable_variables, w1))
    assert EvaluatedWeights(model, False).name == "training" and EvaluatedWeights(_model(), True).name == "training"


def _checkpoint_arrays(folder) -> dict:
    """Every array of a checkpoint: the model's weights (h5) and the optimizer's variables, the average among them."""
    import h5py

    out = {}
    with h5py.File(folder / "model.weights.h5") as f:
        f.visititems(lambda name, item: out.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
    with np.load(folder / "optimizer.npz") as npz:
        out.update({f"optimizer.npz/{k}": npz[k] for k in npz.files})
    return out


@pytest.mark.horovod
def test_two_ranks_validate_and_export_the_average_and_a_resume_continues_it_exactly(digits_shards, tmp_path):
    import tensorflow as tf

    # 3 epochs of 4 steps of 2 micro-batches; the stop at step 6 is mid-epoch 2, so the resumed start runs two fits.
    base = ("--set", "train.epochs=3", "--set", "train.steps_per_epoch=4", "--set", "train.ema=0.9",
            "--set", "train.weight_decay=0.05", "--set", "train.accumulation_steps=2",
            "--set", "runtime.deterministic=true")
    straight = tmp_path / "straight"
    res = run(launch_argv(straight, digits_shards, *base), timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    ema = messages(out, "EMA weights after training:")
    assert sorted(ema) == [0, 1] and ema[0] == ema[1], ema
    lines = [x for x in res.stdout.splitlines() if x.startswith("epoch ")]
    assert len(lines) == 3 and all("val_accuracy" in x and x.count("(EMA weights)") == 1 for x in lines), lines
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["evaluated_weights"] == "ema"
    assert [r["val_loss"] for r in epoch_records(straight)][-1] == summary["val_loss"]

    # The final checkpoint's average, evaluated in this process, gives what the run reported, example by example
    # in the loss; the export serves the same probabilities.
    probabilities, labels, encoded = evaluation_predictions(straight, "latest")
    assert len(labels) == summary["val_examples"]
    assert np.mean(probabilities.argmax(axis=1) == labels) == pytest.approx(summary["val_accuracy"], abs=1e-9)
    loss = -np.log(probabilities[np.arange(len(labels)), labels].astype(np.float64))
    assert loss.mean() == pytest.approx(summary["val_loss"], rel=1e-5)
    served = tf.saved_model.load(str(straight / "export")).signatures["serving_default"]
    answers = np.concatenate([served(image_bytes=tf.constant(encoded[i:i + 120]))["probabilities"].numpy()
                              for i in range(0, len(encoded), 120)])
    np.testing.assert_allclose(answers, probabilities, rtol=0, atol=1e-5)

    # Stopped at step 6 and resumed: the training weights and the average of the last checkpoint are those
    # of the uninterrupted run, bit for bit.
    stopped = tmp_path / "stopped"
    argv = launch_argv(stopped, digits_shards, *base, "--set", "train.export=false")
    first = run([*argv, "--set", "runtime.fault_stop_after_step=6"], timeout=600)
    assert first.returncode != 0 and checkpoint_dir(stopped, 6), (first.stdout + first.stderr)[-3000:]
    resumed = run(argv, timeout=600)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-3000:]
    a, b = _checkpoint_arrays(checkpoint_dir(straight, 12)), _checkpoint_arrays(checkpoint_dir(stopped, 12))
    # The step counter, Adam's two moments and the average of each of the 10 weights.
    assert sorted(a) == sorted(b) and sum(k.startswith("optimizer.npz/") for k in a) == 1 + 3 * 10, sorted(a)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert json.loads((stopped / "summary.json").read_text())["val_loss"] == summary["val_loss"]

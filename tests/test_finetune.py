"""Your model, from your weights, frozen then unfrozen: model.builder, model.initial_weights, model.freeze_until."""

import json
import textwrap

import h5py
import numpy as np
import pytest

from helpers import checkpoint_dir, checkpoint_steps, run
from test_horovod import epoch_records, launch_argv, messages

# A user's own model, ending in logits: conv-BN stem, conv-BN body, a dense head.
USER_MODULE = textwrap.dedent('''
    import keras
    from keras import layers


    def small(input_shape, num_classes):
        inputs = keras.Input(input_shape)
        x = layers.Conv2D(16, 3, padding="same", use_bias=False, name="stem_conv")(inputs)
        x = layers.ReLU()(layers.BatchNormalization(name="stem_bn")(x))
        x = layers.Conv2D(32, 3, padding="same", use_bias=False, name="body_conv")(x)
        x = layers.ReLU()(layers.BatchNormalization(name="body_bn")(x))
        x = layers.Flatten()(x)
        return keras.Model(inputs, layers.Dense(num_classes, name="head")(x), name="small")


    def wrong_output(input_shape, num_classes):
        return small(input_shape, num_classes + 1)
''')

STEM = ("layers/conv2d", "layers/batch_normalization")  # stem_conv, stem_bn: where Keras's file keeps them
BODY = "layers/conv2d_1"


@pytest.fixture
def user_module(tmp_path):
    (tmp_path / "usermodels.py").write_text(USER_MODULE)
    return tmp_path


def layer_values(path) -> dict[str, list[np.ndarray]]:
    """{layer path: its variables} of a Keras .weights.h5 file."""
    with h5py.File(path, "r") as f:
        return {p: [f[f"{p}/vars/{i}"][...] for i in range(len(f[f"{p}/vars"]))]
                for p in (*STEM, BODY, "layers/dense")}


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_a_builder_with_logits_gets_a_float32_softmax_and_a_wrong_one_is_one_line(user_module, monkeypatch):
    import keras

    from trainer.config import ConfigError
    from trainer.model_builder import build_user_model

    monkeypatch.syspath_prepend(str(user_module))
    import usermodels

    model = build_user_model("usermodels:small", (8, 8, 1), 10)
    assert [layer.name for layer in model.layers][1] == "stem_conv"  # its layers stay at the top level
    images = np.random.default_rng(0).random((3, 8, 8, 1), dtype=np.float32)
    logits = keras.Model(model.input, model.get_layer("head").output)(images)
    np.testing.assert_allclose(model(images).numpy(), keras.ops.softmax(logits).numpy(), rtol=1e-6)
    assert model.output.dtype == "float32"
    # A model that ends in probabilities is left as it is.
    probs = keras.Model(model.input, keras.layers.Softmax()(model.get_layer("head").output))
    monkeypatch.setattr(usermodels, "probs", lambda shape, n: probs, raising=False)
    same_model = build_user_model("usermodels:probs", (8, 8, 1), 10)
    np.testing.assert_allclose(same_model(images).numpy(), probs(images).numpy(), rtol=1e-6)
    for spec, line in [
        ("usermodels:wrong_output", "model.builder='usermodels:wrong_output': its model outputs shape (11,), "
                                    "expected (10,): one value per class"),
        ("usermodels:nothing", "model.builder='usermodels:nothing': usermodels has no function nothing"),
        ("nomodule:f", "model.builder='nomodule:f': cannot import nomodule (ModuleNotFoundError: No module "
                       "named 'nomodule')"),
    ]:
        with pytest.raises(ConfigError) as e:
            build_user_model(spec, (8, 8, 1), 10)
        assert str(e.value) == line


@pytest.mark.horovod
def test_two_ranks_fine_tune_a_user_model_from_its_weights_frozen_then_unfrozen_across_a_resume(
        digits_shards, user_module, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(user_module))
    import usermodels

    # "Pretrained" weights for 4 classes, BatchNorm statistics far from their initial 0 and 1.
    pre = usermodels.small((8, 8, 1), 4)
    rng = np.random.default_rng(0)
    pre.set_weights([rng.normal(0.5, 0.3, w.shape).astype("float32") ** 2 for w in pre.get_weights()])
    pre.save_weights(tmp_path / "pre.weights.h5")
    given = layer_values(tmp_path / "pre.weights.h5")
    run_dir = tmp_path / "run"
    # Epochs 1-2 frozen up to stem_bn, 3 unfrozen; a stop at step 5 of epoch 1 (12 steps an epoch).
    argv = launch_argv(run_dir, digits_shards, "--set", "model.builder=usermodels:small",
                       "--set", f"model.initial_weights={tmp_path / 'pre.weights.h5'}",
                       "--set", "model.freeze_until=stem_bn", "--set", "model.unfreeze_epoch=3",
                       "--set", "train.epochs=3", "--set", "train.keep_checkpoints=9", "--set", "train.export=false",
                       "--set", "train.ema=0.9", "--set", "runtime.fault_stop_after_step=5")
    env = {"PYTHONPATH": str(user_module)}
    first = run(argv, timeout=600, env=env)
    out = first.stdout + first.stderr
    assert first.returncode != 0 and checkpoint_steps(run_dir) == [5], out[-3000:]
    loaded = messages(out, "model.initial_weights:")
    assert list(loaded) == [0], loaded  # rank 0 alone reads the file
    assert loaded[0][0].startswith("4 of 5 layers with weights loaded from "), loaded
    assert loaded[0][0].endswith("; kept as initialised: head"), loaded
    second = run(argv, timeout=600, env=env)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert "model.initial_weights:" not in out  # a resume restores the checkpoint, not the file
    spe = json.loads((checkpoint_dir(run_dir, 5) / "state.json").read_text())["steps_per_epoch"]
    by_epoch = {e: layer_values(checkpoint_dir(run_dir, e * spe) / "model.weights.h5") for e in (1, 2, 3)}
    for epoch in (1, 2):  # epoch 2 trained wholly after the resume: the phase came back with it
        for path in STEM:  # BatchNorm's statistics too: inference mode, and precise-BN leaves it alone
            assert same(by_epoch[epoch][path], given[path]), (epoch, path)
        assert not same(by_epoch[epoch][BODY], given[BODY]), epoch
    for path in STEM:
        assert not same(by_epoch[3][path], by_epoch[2][path]), path
    # train.ema: the average started at the loaded weights, so the frozen stem's average is still them.
    with np.load(checkpoint_dir(run_dir, 2 * spe) / "optimizer.npz") as npz:
        stem_kernel = given[STEM[0]][0]
        assert any(npz[k].shape == stem_kernel.shape and np.allclose(npz[k], stem_kernel, rtol=1e-5, atol=1e-7)
                   for k in npz.files)
    assert epoch_records(run_dir)[-1]["val_accuracy"] > 0.5
    after = messages(out, "weights after training:")
    assert sorted(after) == [0, 1] and after[0] == after[1]


@pytest.mark.parametrize("sets, line", [
    (("model.builder=usermodels:wrong_output",),
     "model.builder='usermodels:wrong_output': its model outputs shape (11,), expected (10,): one value per class"),
    (("model.initial_weights={other}",),
     "model.initial_weights='{other}': matches no layer of model simple_cnn (1 layers with weights in the file, "
     "6 in the model)"),
    (("model.freeze_until=stem", "model.builder=usermodels:small"),
     "model.freeze_until='stem': model small has no such layer (its first layers: input_layer, stem_conv, "
     "stem_bn, re_lu, ...; its last: flatten, head, probs)"),
    (("model.name=EfficientNetV2B0",),
     "model.image_size=8: model EfficientNetV2B0 needs images of at least 32 pixels (set model.image_size; the "
     "images are resized to it)"),
])
def test_the_launcher_refuses_what_only_building_the_model_shows_before_any_worker_starts(
        digits_shards, user_module, tmp_path, sets, line):
    import keras

    other = tmp_path / "other.weights.h5"
    keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]).save_weights(other)
    sets = [s.format(other=other) for s in sets]
    res = run(launch_argv(tmp_path / "run", digits_shards, *(x for s in sets for x in ("--set", s))),
              env={"PYTHONPATH": str(user_module)}, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == "launch: error: " + line.format(other=other)
    assert not (tmp_path / "run").exists()  # no worker started, nothing written


def test_a_start_from_initial_weights_starts_the_weight_average_there(tmp_path):
    from trainer.assembly import build_compiled_model
    from trainer.config import load_config
    from trainer.data_spec import DataSpec
    from trainer.ema import averages
    from trainer.initial_weights import start_from

    cfg = load_config("configs/digits.yaml", ["train.ema=0.9", "run_dir=x"])
    spec = DataSpec((8, 8, 1), 10, 2, [], [])
    source = build_compiled_model(cfg, spec, 0.01)
    source.set_weights([w + 1.0 for w in source.get_weights()])
    source.save_weights(tmp_path / "start.weights.h5")
    model = build_compiled_model(cfg, spec, 0.01)
    start_from(model, str(tmp_path / "start.weights.h5"))
    pairs = list(zip(model.trainable_variables, averages(model.optimizer)))
    assert len(pairs) == len(model.trainable_variables) > 0
    for weight, average in pairs:
        np.testing.assert_array_equal(average.numpy(), weight.numpy())

"""The training step's options: gradient accumulation, loss scaling under mixed_float16, XLA-compiled parts.

In one process (Horovod at size 1, where the allreduce is the identity) for
the arithmetic; through the real horovodrun with 2 ranks for the skip decision.
"""

import os
import sys

import numpy as np
import pytest

from helpers import ROOT, checkpoint_dir, run
from launch.command import LaunchOptions, build_command


def _net(seed: int = 3, policy: str = "float32"):
    """A model without BatchNorm or dropout: its step is a pure function of weights and batch."""
    import keras

    keras.utils.set_random_seed(seed)
    keras.config.set_dtype_policy(policy)
    try:
        inputs = keras.Input((6, 6, 1))
        x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
        x = keras.layers.Flatten()(x)
        x = keras.layers.Dense(16, activation="relu", kernel_regularizer=keras.regularizers.L2(1e-3))(x)
        return keras.Model(inputs, keras.layers.Dense(5, activation="softmax", dtype="float32")(x))
    finally:
        keras.config.set_dtype_policy("float32")


def _trained(batches, accumulation_steps: int, compile_parts: bool = False, optimizer=None, policy="float32"):
    import horovod.tensorflow as hvd
    import keras
    import tensorflow as tf

    from trainer.step import DataParallelModel

    hvd.init()
    model = DataParallelModel.wrap(_net(policy=policy), accumulation_steps=accumulation_steps,
                                   compile_parts=compile_parts)
    model.compile(optimizer=optimizer or keras.optimizers.SGD(0.05, momentum=0.9),
                  loss="sparse_categorical_crossentropy", jit_compile=False)
    ds = tf.data.Dataset.from_tensor_slices(batches)
    history = model.fit(ds, epochs=1, steps_per_epoch=len(batches[0]), verbose=0, shuffle=False).history
    return model, history


def _batches(steps: int, batch: int):
    rng = np.random.default_rng(0)
    return (rng.random((steps, batch, 6, 6, 1), dtype=np.float32), rng.integers(0, 5, (steps, batch)).astype(np.int32))


@pytest.mark.parametrize("compile_parts", [False, True])
def test_two_micro_batches_of_b_step_as_one_batch_of_2b(compile_parts):
    # Each fed batch of 16 is one optimizer step: whole, or as 2 micro-batches of 8.
    batches = _batches(steps=6, batch=16)
    whole, h1 = _trained(batches, 1)
    halves, h2 = _trained(batches, 2, compile_parts=compile_parts)
    assert int(whole.optimizer.iterations.numpy()) == int(halves.optimizer.iterations.numpy()) == 6
    first = _net().get_weights()
    for a, b, start in zip(whole.get_weights(), halves.get_weights(), first):
        assert not np.allclose(a, start)  # it trained
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert h1["loss"][-1] == pytest.approx(h2["loss"][-1], rel=1e-4)


def test_an_overflowing_step_is_skipped_and_still_counted():
    import keras

    batches = _batches(steps=2, batch=8)
    # Scaled by 2^24 (then 2^23), the gradients overflow float16: both steps are skipped.
    lso = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05), initial_scale=2.0**24)
    model, _ = _trained(batches, 1, optimizer=lso, policy="mixed_float16")
    for a, start in zip(model.get_weights(), _net().get_weights()):
        np.testing.assert_array_equal(a, start)
    assert float(model.optimizer.dynamic_scale.numpy()) == 2.0**22
    # Skipped steps still consumed their batches: the trainer's step count goes on.
    assert int(model.optimizer.iterations.numpy()) == 2


@pytest.mark.horovod
def test_an_overflow_on_one_rank_leaves_no_trace_on_any_rank():
    import json

    # tests/overflow_worker.py: a BatchNorm model; half of rank 1's batch overflows float16 (see there).
    modes = ["plain", "accumulate", "xla"]
    opts = LaunchOptions(np=2, config="unused.yaml", python=sys.executable,
                         horovodrun=os.path.join(os.path.dirname(sys.executable), "horovodrun"))
    argv, env = build_command(opts, dict(os.environ))
    argv = argv[: argv.index(sys.executable)] + [sys.executable, str(ROOT / "tests" / "overflow_worker.py"), *modes]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    res = run(argv, env=env, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    reports = [json.loads(line.split("REPORT ", 1)[1]) for line in res.stdout.splitlines() if "REPORT " in line]
    assert len(reports) == 2 * len(modes), res.stdout[-3000:]
    for mode in modes:
        r0, r1 = [r for r in reports if r["mode"] == mode]
        # Skipped on both ranks: no weight, BatchNorm statistic or momentum slot moved on either;
        # only the loss scale halved and the step was counted.
        assert r0["moved"] == r1["moved"] == [], mode
        assert r0["digest"] == r1["digest"], mode
        assert r0["scale"] == r1["scale"] == 2.0**7 and r0["iterations"] == r1["iterations"] == 2, mode
        assert r0["inference_finite"] and r1["inference_finite"], mode
        # Then finite steps apply, identically on both ranks.
        assert r0["end"] == r1["end"] and r0["end_changed"] and r1["end_changed"], mode


def test_accumulation_multiplies_the_batch_of_the_schedule_and_the_step_count(digits_shards, tmp_path):
    import json

    res = run([sys.executable, "-m", "trainer.train", "--config", "configs/digits.yaml",
               "--set", f"run_dir={tmp_path}/run", "--set", f"data.dir={digits_shards}",
               "--set", "train.epochs=1", "--set", "train.export=false", "--set", "data.global_batch_size=16",
               "--set", "train.accumulation_steps=4"])
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # 1437 training examples, 64 per optimizer step (16 x 4).
    assert summary["global_batch_size"] == 64 and summary["steps_per_epoch"] == 1437 // 64
    assert "global batch 64 = 64 per replica (4 micro-batches of 16)" in res.stderr
    # Linear scaling from the effective batch: 0.008 x 64 / 256.
    assert "learning rate: peak 0.002 " in res.stderr
    state = json.loads((checkpoint_dir(tmp_path / "run", 22) / "state.json").read_text())
    assert state["global_batch_size"] == 64 and state["global_step"] == 22


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_digits_learns_under_mixed_precision(digits_shards, tmp_path, precision):
    import json

    res = run([sys.executable, "-m", "trainer.train", "--config", "configs/digits.yaml",
               "--set", f"run_dir={tmp_path}/run", "--set", f"data.dir={digits_shards}",
               "--set", "train.epochs=10", "--set", f"train.precision={precision}", "--set", "train.export_top_k=3"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"precision {precision}," in res.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # 10 epochs gave 0.986 (mixed_float16) and 0.983 (mixed_bfloat16) here; a broken loss scale stays near 0.1.
    assert summary["val_accuracy"] >= 0.97, summary
    # The export serves float32 whatever the training precision.
    import tensorflow as tf

    served = tf.saved_model.load(str(tmp_path / "run" / "export"))
    out = served.signatures["serving_images"](images=tf.zeros([2, 8, 8, 1]))
    assert out["probabilities"].dtype == tf.float32
    np.testing.assert_allclose(out["probabilities"].numpy().sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.horovod
def test_accumulating_ranks_stop_together_and_end_identical(digits_shards, tmp_path):
    from test_horovod import launch_argv, messages

    # 1437 examples, 32 x 2 per step: 22 steps an epoch; the stop comes mid-epoch.
    run_dir = tmp_path / "run"
    argv = launch_argv(run_dir, digits_shards, "--set", "train.epochs=1", "--set", "train.export=false",
                       "--set", "data.global_batch_size=32", "--set", "train.accumulation_steps=2")
    first = run([*argv, "--set", "runtime.fault_stop_after_step=7"], timeout=600)
    out = first.stdout + first.stderr
    assert first.returncode != 0, out[-3000:]
    stopped = messages(out, "stopped at step")
    assert sorted(stopped) == [0, 1] and all(m[0].startswith("7 ") for m in stopped.values()), out[-3000:]
    stopped_at = checkpoint_dir(run_dir, 7)
    res = run(argv, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert f"resumed from {stopped_at} " in out
    # Every variable, BatchNorm moving statistics included, equal on both ranks.
    after = messages(out, "weights after training:")
    assert sorted(after) == [0, 1] and after[0] == after[1]


def test_the_loss_scale_is_saved_and_restored_with_the_optimizer(tmp_path):
    import keras

    from trainer.assembly import build_compiled_model
    from trainer.checkpoint import CheckpointManager
    from trainer.config import load_config
    from trainer.data_spec import DataSpec

    cfg = load_config("configs/bench_resnet20.yaml", ["train.precision=mixed_float16", "model.name=simple_cnn"])
    spec = DataSpec((8, 8, 1), 4, 2, [], [])
    a = build_compiled_model(cfg, spec, 0.01)
    assert isinstance(a.optimizer, keras.optimizers.LossScaleOptimizer)
    assert a.layers[1].compute_dtype == "float16" and a.output.dtype == "float32"
    assert keras.config.dtype_policy().name == "float32"  # the global policy is left as it was
    a.optimizer.dynamic_scale.assign(1024.0)
    a.optimizer.iterations.assign(7)
    path = CheckpointManager(str(tmp_path)).save(a, {"epoch": 3})
    b = build_compiled_model(cfg, spec, 0.01)
    assert float(b.optimizer.dynamic_scale.numpy()) == 32768.0
    CheckpointManager(str(tmp_path)).restore(b, path)
    assert float(b.optimizer.dynamic_scale.numpy()) == 1024.0 and int(b.optimizer.iterations.numpy()) == 7

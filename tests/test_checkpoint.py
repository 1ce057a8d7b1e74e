import json
import os

import keras
import numpy as np
import pytest

from trainer.checkpoint import CheckpointError, CheckpointManager


def small_model(seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(keras.layers.Dense(5)(inputs)))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy", jit_compile=False)
    return model


def train_a_little(model, steps):
    rng = np.random.default_rng(0)
    x, y = rng.random((8 * steps, 4), dtype=np.float32), rng.integers(0, 3, 8 * steps)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)


def test_round_trip_restores_weights_and_optimizer_state(tmp_path):
    a = small_model(1)
    train_a_little(a, 5)
    mgr = CheckpointManager(str(tmp_path / "ckpt"), keep=2)
    path = mgr.save(a, {"epoch": 1, "world_size": 2})
    b = small_model(2)
    b.optimizer.build(b.trainable_variables)
    state = mgr.restore(b, path)
    assert path.endswith("step-000000005")
    assert state == {"epoch": 1, "global_step": 5, "world_size": 2}
    for va, vb in zip(a.variables, b.variables):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())
    for va, vb in zip(a.optimizer.variables, b.optimizer.variables):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())
    # Restored optimizer state means the next step is the same on both.
    train_a_little(a, 1)
    train_a_little(b, 1)
    for va, vb in zip(a.variables, b.variables):
        np.testing.assert_allclose(va.numpy(), vb.numpy(), rtol=1e-6)


def test_keeps_the_last_k_and_ignores_incomplete_folders(tmp_path):
    model = small_model(0)
    train_a_little(model, 1)
    mgr = CheckpointManager(str(tmp_path), keep=2)
    for step in (1, 2, 3):
        model.optimizer.iterations.assign(step)
        mgr.save(model, {"epoch": step})
    assert sorted(os.listdir(tmp_path)) == ["step-000000002", "step-000000003"]
    # A writer killed mid-save leaves a temporary folder, or one without state.json.
    (tmp_path / "step-000000004.tmp-123").mkdir()
    (tmp_path / "step-000000005").mkdir()
    assert mgr.latest() == str(tmp_path / "step-000000003")


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    model = small_model(0)
    train_a_little(model, 1)
    mgr = CheckpointManager(str(tmp_path), keep=2)
    path = mgr.save(model, {"epoch": 1})
    with open(os.path.join(path, "model.weights.h5"), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(CheckpointError, match=r"cannot restore checkpoint .*step-000000001"):
        mgr.restore(small_model(0), path)


@pytest.mark.parametrize("state", [{"global_step": 1}, {"epoch": "1", "global_step": 1}, ["epoch", 1]])
def test_state_json_without_its_counts_is_a_clear_error(tmp_path, state):
    model = small_model(0)
    train_a_little(model, 1)
    mgr = CheckpointManager(str(tmp_path), keep=2)
    path = mgr.save(model, {"epoch": 1})
    with open(os.path.join(path, "state.json"), "w") as f:
        json.dump(state, f)
    with pytest.raises(CheckpointError) as e:
        mgr.restore(small_model(0), path)
    assert str(e.value) == f"cannot read checkpoint {path!r}: state.json has no 'epoch' count"


def save_validated(mgr, model, step, validation):
    model.optimizer.iterations.assign(step)
    return mgr.save(model, {"epoch": step, **({"validation": validation} if validation else {})})


def test_the_best_checkpoint_survives_the_rotation_and_is_named_in_best_json(tmp_path):
    model = small_model(0)
    train_a_little(model, 1)
    mgr = CheckpointManager(str(tmp_path), keep=2, best_metric="val_accuracy", best_mode="max")
    accuracies = {1: 0.5, 2: 0.9, 3: None, 4: 0.8, 5: 0.9, 6: 0.85}  # 3: not validated; 5 only equals 2
    for step, acc in accuracies.items():
        save_validated(mgr, model, step, {"val_accuracy": acc, "val_loss": 1 - acc} if acc else None)
    assert sorted(os.listdir(tmp_path)) == ["best.json", "step-000000002", "step-000000005", "step-000000006"]
    best = json.loads((tmp_path / "best.json").read_text())
    assert best == {"checkpoint": "step-000000002", "global_step": 2, "epoch": 2, "metric": "val_accuracy",
                    "mode": "max", "value": 0.9, "validation": {"val_accuracy": 0.9, "val_loss": pytest.approx(0.1)}}
    assert mgr.best() == mgr.resolve("best") == str(tmp_path / "step-000000002")
    assert mgr.latest() == mgr.resolve("latest") == mgr.resolve("step-000000006") == str(tmp_path / "step-000000006")
    # A better one takes over, and the old best goes once it is outside the last two.
    save_validated(mgr, model, 7, {"val_accuracy": 0.95, "val_loss": 0.05})
    assert sorted(os.listdir(tmp_path)) == ["best.json", "step-000000006", "step-000000007"]
    assert json.loads((tmp_path / "best.json").read_text())["checkpoint"] == "step-000000007"
    # A manager that ranks by the lowest loss (a resumed run with another metric) re-reads the states.
    by_loss = CheckpointManager(str(tmp_path), keep=1, best_metric="val_loss", best_mode="min")
    save_validated(by_loss, model, 8, {"val_accuracy": 0.9, "val_loss": 0.03})
    assert sorted(os.listdir(tmp_path)) == ["best.json", "step-000000008"]
    assert json.loads((tmp_path / "best.json").read_text())["metric"] == "val_loss"
    # `best` for a reader is what best.json records, whatever metric the reader was built with.
    assert CheckpointManager(str(tmp_path)).resolve("best") == str(tmp_path / "step-000000008")


def test_without_a_best_metric_only_the_latest_are_kept(tmp_path):
    model = small_model(0)
    train_a_little(model, 1)
    mgr = CheckpointManager(str(tmp_path), keep=1, best_metric="val_accuracy")
    save_validated(mgr, model, 1, {"val_accuracy": 0.9})
    save_validated(mgr, model, 2, {"val_accuracy": 0.1})
    assert sorted(os.listdir(tmp_path)) == ["best.json", "step-000000001", "step-000000002"]
    plain = CheckpointManager(str(tmp_path), keep=1)
    save_validated(plain, model, 3, {"val_accuracy": 0.5})
    assert sorted(os.listdir(tmp_path)) == ["step-000000003"]  # the stale pointer goes too
    assert plain.best() is None
    with pytest.raises(CheckpointError, match=r"^no best checkpoint in '.*'$"):
        plain.resolve("best")
    with pytest.raises(CheckpointError, match=r"^'step-000000001' is not a checkpoint$"):
        plain.resolve("step-000000001")

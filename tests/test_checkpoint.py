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

import json
import logging
import os

import keras
import numpy as np
import pytest

from data_pipeline import atomic
from trainer import outputs
from trainer.checkpoint import CheckpointError, CheckpointManager
from trainer.config import ExperimentConfig


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
    assert os.path.basename(path) == "ckpt-000001-step-000000005"
    assert state == {"epoch": 1, "global_step": 5, "world_size": 2, "checkpoint_number": 1}
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
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000002-step-000000002", "ckpt-000003-step-000000003"]
    # A writer killed mid-save leaves a temporary folder, or one without state.json.
    (tmp_path / "ckpt-000004-step-000000004.tmp-123").mkdir()
    (tmp_path / "ckpt-000005-step-000000005").mkdir()
    assert mgr.latest() == str(tmp_path / "ckpt-000003-step-000000003")


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    model = small_model(0)
    train_a_little(model, 1)
    mgr = CheckpointManager(str(tmp_path), keep=2)
    path = mgr.save(model, {"epoch": 1})
    with open(os.path.join(path, "model.weights.h5"), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(CheckpointError, match=r"cannot restore checkpoint .*/ckpt-000001-step-000000001'"):
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


def name(number: int, step: int | None = None) -> str:
    """The folder of the `number`-th save into a folder, at global step `step` (default: `number`)."""
    return f"ckpt-{number:06d}-step-{number if step is None else step:09d}"


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
    assert sorted(os.listdir(tmp_path)) == ["best.json", name(2), name(5), name(6)]
    best = json.loads((tmp_path / "best.json").read_text())
    assert best == {"checkpoint": name(2), "global_step": 2, "epoch": 2, "metric": "val_accuracy",
                    "mode": "max", "value": 0.9, "validation": {"val_accuracy": 0.9, "val_loss": pytest.approx(0.1)}}
    assert mgr.best() == mgr.resolve("best") == str(tmp_path / name(2))
    assert mgr.latest() == mgr.resolve("latest") == mgr.resolve(name(6)) == str(tmp_path / name(6))
    # A better one takes over, and the old best goes once it is outside the last two.
    save_validated(mgr, model, 7, {"val_accuracy": 0.95, "val_loss": 0.05})
    assert sorted(os.listdir(tmp_path)) == ["best.json", name(6), name(7)]
    assert json.loads((tmp_path / "best.json").read_text())["checkpoint"] == name(7)
    # A manager that ranks by the lowest loss (a resumed run with another metric) re-reads the states.
    by_loss = CheckpointManager(str(tmp_path), keep=1, best_metric="val_loss", best_mode="min")
    save_validated(by_loss, model, 8, {"val_accuracy": 0.9, "val_loss": 0.03})
    assert sorted(os.listdir(tmp_path)) == ["best.json", name(8)]
    assert json.loads((tmp_path / "best.json").read_text())["metric"] == "val_loss"
    # `best` for a reader is what best.json records, whatever metric the reader was built with.
    assert CheckpointManager(str(tmp_path)).resolve("best") == str(tmp_path / name(8))


def test_without_a_best_metric_only_the_latest_are_kept(tmp_path):
    model = small_model(0)
    train_a_little(model, 1)
    mgr = CheckpointManager(str(tmp_path), keep=1, best_metric="val_accuracy")
    save_validated(mgr, model, 1, {"val_accuracy": 0.9})
    save_validated(mgr, model, 2, {"val_accuracy": 0.1})
    assert sorted(os.listdir(tmp_path)) == ["best.json", name(1), name(2)]
    plain = CheckpointManager(str(tmp_path), keep=1)
    save_validated(plain, model, 3, {"val_accuracy": 0.5})
    assert sorted(os.listdir(tmp_path)) == [name(3)]  # the stale pointer goes too
    assert plain.best() is None
    with pytest.raises(CheckpointError, match=r"^no best checkpoint in '.*'$"):
        plain.resolve("best")
    with pytest.raises(CheckpointError, match=rf"^'{name(1)}' is not a checkpoint$"):
        plain.resolve(name(1))


def fake_checkpoint(directory, name, epoch, global_step, spe, **extra):
    """A folder with only state.json: enough for ordering, pruning and the best."""
    path = directory / name
    path.mkdir(parents=True)
    state = {"epoch": epoch, "global_step": global_step, "steps_per_epoch": spe, **extra}
    (path / "state.json").write_text(json.dumps(state))
    return str(path)


def test_order_and_pruning_follow_progress_not_the_step_in_the_name(tmp_path):
    # 4 epochs of 22 steps at global batch 32, then a resume at 128: 5 steps an epoch, re-based to step 20.
    for epoch in (3, 4):
        fake_checkpoint(tmp_path, f"step-{epoch * 22:09d}", epoch, epoch * 22, 22)
    fake_checkpoint(tmp_path, "step-000000025", 5, 25, 5)
    mgr = CheckpointManager(str(tmp_path), keep=2)
    assert mgr.latest() == str(tmp_path / "step-000000025")
    model = small_model(0)
    train_a_little(model, 1)
    model.optimizer.iterations.assign(30)
    assert mgr.save(model, {"epoch": 6, "steps_per_epoch": 5}) == str(tmp_path / name(1, 30))
    assert sorted(os.listdir(tmp_path)) == [name(1, 30), "step-000000025"]
    assert mgr.latest() == mgr.resolve("latest") == str(tmp_path / name(1, 30))
    # Mid-epoch progress counts as a fraction of the epoch, whatever its steps per epoch.
    fake_checkpoint(tmp_path, "step-000000140", 6, 140, 22)  # 8 of 22 steps into the 7th epoch
    fake_checkpoint(tmp_path, "step-000000033", 6, 33, 5)  # 3 of 5
    assert mgr.latest() == str(tmp_path / "step-000000033")


def test_names_sort_in_training_order_when_a_larger_batch_re_bases_the_step_lower(tmp_path):
    model = small_model(0)
    train_a_little(model, 1)
    mgr = CheckpointManager(str(tmp_path), keep=3)
    # 4 epochs of 44 steps at global batch 32, then 11 steps an epoch at 128: epoch 5 ends at step 55.
    progress = [(epoch, epoch * 44, 44) for epoch in (1, 2, 3, 4)] + [(5, 55, 11), (6, 66, 11)]
    written = []
    for epoch, step, spe in progress:
        model.optimizer.iterations.assign(step)
        written.append(os.path.basename(mgr.save(model, {"epoch": epoch, "steps_per_epoch": spe})))
    assert written == [name(n, step) for n, (_, step, _) in enumerate(progress, 1)]
    # What `ls` shows is the training order, the newest last, and the latest by progress is the last name.
    assert sorted(os.listdir(tmp_path)) == written[-3:]
    assert mgr.latest() == str(tmp_path / written[-1])
    assert [json.loads((tmp_path / n / "state.json").read_text())["checkpoint_number"] for n in written[-3:]] == \
        [4, 5, 6]


def test_checkpoints_of_the_older_naming_are_read_resolved_and_ordered_by_progress(tmp_path):
    old = fake_checkpoint(tmp_path, "step-000000044", 2, 44, 22, validation={"val_accuracy": 0.9})
    other = fake_checkpoint(tmp_path, "step-000000044-2", 11, 44, 4)  # the older naming's second of one step
    (tmp_path / "best.json").write_text(json.dumps({"checkpoint": "step-000000044"}))
    mgr = CheckpointManager(str(tmp_path), keep=5, best_metric="val_accuracy")
    assert mgr.resolve("step-000000044") == mgr.resolve("best") == old
    assert mgr.latest() == mgr.resolve("step-000000044-2") == other
    model = small_model(0)
    train_a_little(model, 1)
    model.optimizer.iterations.assign(44)
    # A save at the same step as both, and at the same progress as the second, gets a name of its own.
    path = mgr.save(model, {"epoch": 11, "steps_per_epoch": 4})
    assert path == str(tmp_path / name(1, 44))
    assert json.loads((tmp_path / "step-000000044" / "state.json").read_text())["epoch"] == 2
    # Of equal progress the one written last counts as the newest.
    assert mgr.latest() == path and mgr.best() == old
    assert sorted(os.listdir(tmp_path)) == ["best.json", name(1, 44), "step-000000044", "step-000000044-2"]
    assert json.loads((tmp_path / "best.json").read_text())["checkpoint"] == "step-000000044"


def saved(mgr, model, epoch):
    model.optimizer.iterations.assign(epoch)
    return mgr.save(model, {"epoch": epoch, "steps_per_epoch": 1})


@pytest.mark.parametrize("tear", ["truncated weights", "unreadable state", "state without counts"])
def test_a_torn_newest_checkpoint_is_moved_aside_once_after_the_fallback_to_the_one_before(tmp_path, caplog, tear):
    model = small_model(0)
    train_a_little(model, 1)
    mgr = CheckpointManager(str(tmp_path), keep=2)
    before = saved(mgr, model, 1)
    expected = [v.numpy() for v in model.weights]
    train_a_little(model, 1)
    newest = saved(mgr, model, 2)
    if tear == "truncated weights":
        with open(os.path.join(newest, "model.weights.h5"), "r+b") as f:
            f.truncate(100)
    else:
        with open(os.path.join(newest, "state.json"), "w") as f:
            f.write('{"epoch": ' if tear == "unreadable state" else '{"global_step": 2}')
    other = small_model(3)
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        state = mgr.restore_latest(other, None)
    assert state["path"] == before and state["epoch"] == 1
    for want, got in zip(expected, other.weights):
        np.testing.assert_array_equal(want, got.numpy())
    aside = tmp_path / "damaged" / os.path.basename(newest)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("cannot re"), warnings
    assert f"restoring {before} instead; moved {newest} to {aside} for a person to look at" in warnings[0]
    assert sorted(os.listdir(aside)) == ["model.weights.h5", "optimizer.npz", "rng.npz", "state.json"]
    # The next start restores the same checkpoint without a word, and the next save takes a new name
    # (not `-2`, nor the damaged one's); the damaged folder is never pruned.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        assert mgr.restore_latest(small_model(4), None)["path"] == before
        for epoch in (2, 3):
            saved(mgr, model, epoch)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert sorted(os.listdir(tmp_path)) == [name(3, 2), name(4, 3), "damaged"]
    assert os.listdir(tmp_path / "damaged") == [os.path.basename(newest)]
    # Nothing readable at all is an error, not a fresh start, and nothing is moved.
    for kept in (name(3, 2), name(4, 3)):
        with open(os.path.join(tmp_path, kept, "state.json"), "w") as f:
            f.write("")
    with pytest.raises(CheckpointError, match="no readable checkpoint in"):
        mgr.restore_latest(other, None)
    assert sorted(os.listdir(tmp_path)) == [name(3, 2), name(4, 3), "damaged"]


def test_nan_or_inf_never_becomes_the_best(tmp_path):
    for step, acc in ((1, 0.5), (2, float("nan")), (3, float("inf")), (4, 0.4)):
        fake_checkpoint(tmp_path, f"step-{step:09d}", step, step, 1, validation={"val_accuracy": acc})
    assert CheckpointManager(str(tmp_path), best_metric="val_accuracy").best() == str(tmp_path / "step-000000001")
    assert CheckpointManager(str(tmp_path), best_metric="val_accuracy", best_mode="min").best() == \
        str(tmp_path / "step-000000004")


def test_leftovers_of_killed_saves_are_removed_at_start(tmp_path):
    fake_checkpoint(tmp_path, "step-000000001", 1, 1, 1)
    fake_checkpoint(tmp_path, "step-000000002.tmp-77", 2, 2, 1)
    (tmp_path / "best.json.tmp-77").write_text("{")
    fake_checkpoint(tmp_path, "step-000000001.old-78", 1, 1, 1)  # its replacement is in place
    fake_checkpoint(tmp_path, "step-000000003.old-79", 3, 3, 1)  # killed between the two renames
    CheckpointManager(str(tmp_path)).remove_leftovers()
    assert sorted(os.listdir(tmp_path)) == ["step-000000001", "step-000000003"]
    cfg = ExperimentConfig()
    cfg.run_dir = str(tmp_path / "run")
    fake_checkpoint(tmp_path / "run" / "checkpoints", "step-000000004.tmp-80", 4, 4, 1)
    outputs.ChiefOutputs(cfg).start()
    assert os.listdir(tmp_path / "run" / "checkpoints") == []


def test_a_checkpoint_is_fsynced_file_by_file_and_folder_before_its_rename(tmp_path, monkeypatch):
    events = []
    fsync, rename = os.fsync, os.rename
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                        fsync(fd))[1])
    monkeypatch.setattr(atomic.os, "rename", lambda a, b: (events.append(("rename", a)), rename(a, b))[1])
    model = small_model(0)
    train_a_little(model, 1)
    final = CheckpointManager(str(tmp_path)).save(model, {"epoch": 1})
    (moved,) = [i for i, (kind, _) in enumerate(events) if kind == "rename"]
    tmp = events[moved][1]
    synced = {os.path.relpath(p, tmp) for kind, p in events[:moved] if kind == "fsync"}
    assert synced == {".", *os.listdir(final)}
    assert ("fsync", str(tmp_path)) in events[moved:]


def test_a_resumed_run_keeps_the_metrics_records_of_the_epochs_before_its_resume_point(tmp_path):
    cfg = ExperimentConfig()
    cfg.run_dir = str(tmp_path)
    chief = outputs.ChiefOutputs(cfg)
    path = tmp_path / "metrics.jsonl"
    records = [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5}, {"epoch": 3, "loss": 1.2, "val_accuracy": 0.9},
               {"epoch": 4, "loss": 1.1}]  # epoch 4 cut short by a stop, or trained past a torn checkpoint
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text)
    inode = path.stat().st_ino
    chief.keep_records(4)  # nothing to drop: the file is left alone
    assert path.read_text() == text and path.stat().st_ino == inode
    chief.keep_records(3)
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in records[:3])
    # An earlier version appended a cut-short epoch's record and then the completed one's; a kill tore a line.
    path.write_text(text + json.dumps({"epoch": 4, "loss": 1.0}) + "\n" + '{"epoch": 5, "lo')
    chief.keep_records(5)
    assert [json.loads(x) for x in path.read_text().splitlines()] == [*records[:3], {"epoch": 4, "loss": 1.0}]
    chief.keep_records(0)  # a start from scratch writes every epoch anew
    assert path.read_text() == ""
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    outputs.RunOutputs(cfg).keep_records(0)  # other ranks write nothing


def test_the_launcher_refuses_the_checkpoints_a_worker_refuses_with_the_same_line(digits_shards, tmp_path):
    import sys

    from helpers import run
    from trainer.config import load_config
    from trainer.data_spec import model_signature, resolve_data

    base = [f"run_dir={tmp_path / 'run'}", f"data.dir={digits_shards}"]
    cfg = load_config("configs/digits.yaml", base)
    written = model_signature(cfg, resolve_data(cfg))
    manager = CheckpointManager(str(tmp_path / "run" / "checkpoints"))
    model = small_model(0)
    train_a_little(model, 1)
    path = manager.save(model, {"epoch": 1, "steps_per_epoch": 1, "model": written})

    for override in (None, "model.name=resnet20", "model.num_classes=12", "model.image_size=16", "model.channels=3"):
        overrides = base + ([override] if override else [])
        # The worker's way: the signature of the data spec it builds its model from, checked by restore.
        cfg = load_config("configs/digits.yaml", overrides)
        spec = resolve_data(cfg)
        try:
            manager.restore(small_model(1), path, model_signature(cfg, spec))
            worker_line = None
        except CheckpointError as e:
            worker_line = f"checkpoint error: {e}"
        assert (worker_line is None) == (override is None)

        res = run([sys.executable, "-m", "launch", "--np", "2", "--config", "configs/digits.yaml", "--dry-run",
                   *[x for o in overrides for x in ("--set", o)]])
        if override is None:
            assert res.returncode == 0, res.stderr
        else:
            assert (res.returncode, res.stderr) == (2, f"launch: {worker_line}\n"), override


def test_a_checkpoint_of_another_optimizer_is_refused_not_half_restored(tmp_path):
    """Keras skips every optimizer variable of a mismatched count with a warning: the step counter too."""
    manager = CheckpointManager(str(tmp_path))
    model = small_model(0)
    train_a_little(model, 2)
    path = manager.save(model, {"epoch": 1})
    scaled = small_model(1)
    scaled.compile(optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(1e-2)),
                   loss="sparse_categorical_crossentropy", jit_compile=False)
    before = [v.numpy() for v in scaled.weights]
    with pytest.raises(CheckpointError, match=r"holds \d+ optimizer variables, this run's optimizer \d+: it was "
                                              r"written with another train.optimizer or train.precision"):
        manager.restore(scaled, path)
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, scaled.weights))

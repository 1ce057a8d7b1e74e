"""train.label_smoothing: the loss of the train step, on one process and on 2 ranks."""

import math

import numpy as np
import pytest

from helpers import run
from test_horovod import epoch_records, launch_argv, messages


def smoothed_floor(smoothing: float, classes: int) -> float:
    """The entropy of the smoothed labels: the least the smoothed cross-entropy can be."""
    true, other = 1 - smoothing + smoothing / classes, smoothing / classes
    return -(true * math.log(true) + (classes - 1) * other * math.log(other))


def test_the_smoothed_loss_is_the_cross_entropy_against_the_smoothed_labels():
    import keras

    from trainer.assembly import training_loss

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(7), size=5).astype("float32")
    labels = np.array([0, 3, 6, 2, 3])
    target = np.full((5, 7), 0.1 / 7)
    target[np.arange(5), labels] += 0.9
    expected = -(target * np.log(probs)).sum(axis=1).mean()
    assert float(training_loss(0.1)(labels, probs)) == pytest.approx(expected, rel=1e-5)
    plain = keras.losses.SparseCategoricalCrossentropy()(labels, probs)
    assert float(training_loss(0.0)(labels, probs)) == pytest.approx(float(plain), rel=1e-6)
    assert type(training_loss(0.0)) is keras.losses.SparseCategoricalCrossentropy


@pytest.mark.horovod
def test_two_ranks_train_on_the_smoothed_loss_and_validate_with_the_plain_one(digits_shards, tmp_path):
    # With 10 classes at 0.5 the true class keeps 0.55 and each other 0.05: the training loss cannot
    # fall below 1.68 (the plain one averages about 1.7 over the first epoch and falls well below it
    # after), and the argmax still learns.
    run_dir = tmp_path / "run"
    res = run(launch_argv(run_dir, digits_shards, "--set", "train.epochs=3", "--set", "train.label_smoothing=0.5",
                          "--set", "train.export=false"), timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    records = epoch_records(run_dir)
    floor = smoothed_floor(0.5, 10)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all(r["loss"] >= floor - 1e-3 for r in records), (floor, records)
    last = records[-1]
    assert last["val_accuracy"] > 0.5, records
    # val_loss is the plain cross-entropy: once the classes are told apart it falls below the floor.
    assert last["val_loss"] < floor - 0.2, (floor, last)
    after = messages(out, "weights after training:")
    assert sorted(after) == [0, 1] and after[0] == after[1]

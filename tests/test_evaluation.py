"""Exact distributed evaluation, per-epoch validation and the best checkpoint."""

import json
import sys
from collections import Counter

import pytest
import tensorflow as tf

from data_pipeline.reader import shard_records
from helpers import checkpoint_dir, run
from test_horovod import epoch_records, launch_argv, messages, rank_records
from trainer.evaluation import is_due


def test_validation_is_due_every_n_epochs_and_always_at_the_last():
    assert [e for e in range(1, 8) if is_due(e, 1, 7)] == [1, 2, 3, 4, 5, 6, 7]
    assert [e for e in range(1, 8) if is_due(e, 3, 7)] == [3, 6, 7]
    assert [e for e in range(1, 8) if is_due(e, 0, 7)] == [7]


def test_rank_parts_cover_every_record_once(tmp_path):
    files = []
    for i, n in enumerate([5, 3, 4]):
        files.append(str(tmp_path / f"validation-{i}.tfrecord"))
        with tf.io.TFRecordWriter(files[-1]) as w:
            for j in range(n):
                w.write(f"{i}-{j}".encode())
    everything = Counter(f"{i}-{j}".encode() for i, n in enumerate([5, 3, 4]) for j in range(n))
    # 1-3 ranks split by file, 4-13 by record (13: more ranks than records, some parts empty).
    for num_shards in (1, 2, 3, 4, 5, 13):
        parts = [[bytes(x.numpy()) for x in shard_records(files, num_shards, i)] for i in range(num_shards)]
        assert Counter(r for part in parts for r in part) == everything, num_shards


class _OneRank:
    """The two collectives Evaluator uses, for a single process."""

    def sum_scalars(self, values, name):
        return values

    max_scalars = sum_scalars


def test_a_record_count_that_differs_from_metadata_is_a_data_error():
    import keras

    from data_pipeline.metadata import DataError
    from trainer.evaluation import Evaluator

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    data = tf.data.Dataset.from_tensor_slices((tf.zeros((3, 2)), tf.zeros((3,), tf.int32))).batch(2)
    evaluator = Evaluator(_OneRank(), lambda: data, 3, expected_examples=4, source="data.dir='d'")
    with pytest.raises(DataError) as e:
        evaluator.evaluate(model)
    assert str(e.value) == "data.dir='d': the evaluation read 3 records, metadata.json lists 4"


@pytest.fixture(scope="module")
def three_val_files(digits_images, tmp_path_factory):
    """Digits with 359 validation records in 3 files: 239 + 120 records at 2 ranks, by file."""
    from data_pipeline.build_shards import build

    out = tmp_path_factory.mktemp("digits-3val") / "shards"
    build(str(digits_images), str(out), num_shards=4, val_fraction=0.2, num_val_shards=3, seed=0)
    return out


@pytest.mark.horovod
def test_two_rank_validation_equals_one_process_and_the_best_checkpoint_survives(three_val_files, tmp_path):
    run_dir = tmp_path / "run"
    meta = json.loads((three_val_files / "metadata.json").read_text())
    n_val = meta["splits"]["validation"]["num_examples"]
    assert n_val % 2 and n_val % 32  # uneven parts, and a partial last batch on both ranks
    # Ranked by the highest validation loss, the best is an early epoch: with one
    # checkpoint kept, the rotation would have deleted it.
    settings = ("--set", "train.epochs=3", "--set", "train.keep_checkpoints=1", "--set", "train.export=false",
                "--set", "train.best_metric=val_loss", "--set", "train.best_mode=max")
    res = run(launch_argv(run_dir, three_val_files, *settings), timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]

    records = epoch_records(run_dir)
    for a, b in zip(records, rank_records(out)[1], strict=True):
        assert a["val_loss"] == b["val_loss"] and a["val_accuracy"] == b["val_accuracy"]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    evaluated = messages(out, "evaluated")
    counts = {r: {tuple(int(x) for x in m.replace("(", " ").split()[0:3:2]) for m in ms} for r, ms in evaluated.items()}
    # Every evaluation counted all records; the ranks' own parts differ and add up to them.
    assert counts == {0: {(n_val, 239)}, 1: {(n_val, 120)}}

    by_loss = max(records, key=lambda r: r["val_loss"])
    summary = json.loads((run_dir / "summary.json").read_text())
    spe = summary["steps_per_epoch"]
    assert by_loss["epoch"] < 3
    best = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    assert best["checkpoint"] == checkpoint_dir(run_dir, by_loss["epoch"] * spe).name
    assert best["value"] == by_loss["val_loss"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == sorted([
        "best.json", best["checkpoint"], checkpoint_dir(run_dir, 3 * spe).name])
    state = json.loads((run_dir / "checkpoints" / best["checkpoint"] / "state.json").read_text())
    keys = ("val_accuracy", "val_loss", "val_top5_accuracy", "val_examples")
    assert state["validation"] == {k: by_loss[k] for k in keys} and by_loss["val_examples"] == n_val
    assert summary["val_examples"] == n_val and summary["val_loss"] == records[-1]["val_loss"]
    assert summary["best_checkpoint"] == str(run_dir / "checkpoints" / best["checkpoint"])

    # TensorBoard: one validation curve point per epoch, beside the training curves.
    (events,) = (run_dir / "tensorboard" / "validation").iterdir()
    curves: dict[str, list] = {}
    for event in tf.compat.v1.train.summary_iterator(str(events)):
        for v in event.summary.value:
            curves.setdefault(v.tag, []).append((event.step, float(tf.make_ndarray(v.tensor))))
    assert curves["accuracy"] == [(r["epoch"], pytest.approx(r["val_accuracy"])) for r in records]
    assert sorted(curves) == ["accuracy", "loss", "top5_accuracy"]

    # The same weights in one process, the whole split on one rank.
    res = run([sys.executable, "-m", "trainer.evaluate", "--config", "configs/digits.yaml",
               "--set", f"run_dir={run_dir}", "--set", f"data.dir={three_val_files}", "--checkpoint", "best"],
              timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    single = json.loads(res.stdout.split("evaluation ", 1)[1])
    assert single["world_size"] == 1 and single["val_examples"] == n_val
    assert single["checkpoint"] == summary["best_checkpoint"]
    for key in ("val_accuracy", "val_top5_accuracy"):
        assert round(single[key] * n_val) == round(by_loss[key] * n_val), key  # the same count of hits
    assert single["val_loss"] == pytest.approx(by_loss["val_loss"], rel=1e-6)
    print("np=2 - np=1:", {k: by_loss[k] - single[k] for k in ("val_loss", "val_accuracy", "val_top5_accuracy")})

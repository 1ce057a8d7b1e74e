"""data_pipeline.adopt_shards: ImageNet-format shards (the TPU converter's) adopted in place, read and trained on."""

import hashlib
import json
import shutil
import sys

import numpy as np
import pytest

from data_pipeline import adopt_shards
from data_pipeline.metadata import METADATA_FILE, DataError, check_metadata, load_metadata, sha256_file
from data_pipeline.record_reader import read_records
from helpers import run, small_filesystem
from imagenet_shards import SYNSETS, TEXTS, write_shards, write_synsets
from test_horovod import epoch_records, launch_argv


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imagenet") / "shards"
    return folder, write_shards(folder)


@pytest.fixture
def shards(written, tmp_path):
    """A fresh copy of the converter's shards, without metadata.json."""
    return shutil.copytree(written[0], tmp_path / "shards")


def adopt(capsys, *argv) -> tuple[int, list[str]]:
    """Runs the command line; its exit code and its stderr's lines (pytest's caplog has the log lines)."""
    code = adopt_shards.main([str(a) for a in argv])
    return code, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("low, high, classes, requested, offset", [
    (1, 3, 3, "auto", 1),  # the converter's labels: 1..N, 0 the unused background
    (1, 1000, 1000, "auto", 1),
    (0, 2, 3, "auto", 0),  # already counted from 0
    (1, 2, 3, "auto", 0),  # the maximum is not the class count: read as they are
    (0, 2, 3, "0", 0),
    (1, 3, 3, "1", 1),
    (2, 3, 3, "1", 1),  # an explicit offset where a class has no records
])
def test_label_offset_detection(low, high, classes, requested, offset):
    found, why = adopt_shards.decide_offset(low, high, classes, requested)
    assert found == offset
    assert why.startswith(f"label offset {offset} ({'auto' if requested == 'auto' else '--label-offset'})")
    assert "\n" not in why


@pytest.mark.parametrize("low, high, classes, requested, message", [
    (1, 3, 3, "0", "labels 1..3 do not fit 3 classes at label offset 0 (labels 0..2 allowed)"),
    (0, 2, 3, "1", "labels 0..2 do not fit 3 classes at label offset 1 (labels 1..3 allowed)"),
    (2, 3, 3, "auto", "labels 2..3 do not fit 3 classes at label offset 0 (labels 0..2 allowed)"),
    (1, 4, 3, "auto", "labels 1..4 do not fit 3 classes at label offset 0 (labels 0..2 allowed)"),
])
def test_labels_outside_the_class_count_are_refused(low, high, classes, requested, message):
    with pytest.raises(DataError) as e:
        adopt_shards.decide_offset(low, high, classes, requested)
    assert str(e.value).startswith(message)


def test_the_record_reader_agrees_with_tensorflow(written):
    import tensorflow as tf

    from data_pipeline.record_reader import example_features

    path = written[0] / "train-00001-of-00002"
    digest = hashlib.sha256()
    mine = list(read_records(str(path), digest))
    theirs = [r.numpy() for r in tf.data.TFRecordDataset(str(path))]
    assert mine == theirs and len(mine) == 24
    assert digest.hexdigest() == sha256_file(str(path))
    spec = {"image/class/label": tf.io.FixedLenFeature([], tf.int64),
            "image/class/synset": tf.io.FixedLenFeature([], tf.string),
            "image/encoded": tf.io.FixedLenFeature([], tf.string)}
    for record in mine:
        ex = tf.io.parse_single_example(record, spec)
        got = example_features(record, tuple(spec) + ("image/absent",))
        assert got == {k: [v.numpy()] for k, v in ex.items()}


def test_adopt_writes_metadata_from_the_shards_and_leaves_them_untouched(shards, capsys, caplog, tmp_path):
    caplog.set_level("INFO", "data_pipeline.adopt_shards")
    before = {p.name: (p.stat().st_mtime_ns, sha256_file(str(p))) for p in shards.iterdir()}
    code, err = adopt(capsys, shards, "--synsets", write_synsets(tmp_path / "synsets.txt"))
    assert code == 0, err
    assert [r.getMessage() for r in caplog.records][0] == (
            "label offset 1 (auto): labels 1..3 with 3 classes are counted from 1 (0 the unused background): "
            "each label is read as label - 1")
    assert {p.name: (p.stat().st_mtime_ns, sha256_file(str(p))) for p in shards.iterdir() if p.name in before} == before
    assert sorted(p.name for p in shards.iterdir()) == sorted([*before, METADATA_FILE])
    meta = load_metadata(str(shards))  # the trainer's own check of the file
    assert (meta["class_names"], meta["label_offset"], meta["normalisation"]) == (list(SYNSETS), 1, "as_stored")
    assert meta["image_shape"] is None  # two image sizes: model.image_size must be set
    assert meta["adopted"]["class_texts"] == list(TEXTS)
    train = meta["splits"]["train"]
    assert [s["num_examples"] for s in train["shards"]] == [24, 24]
    assert train["per_class"] == dict.fromkeys(SYNSETS, 16)
    assert meta["splits"]["validation"]["num_examples"] == 18
    assert all(s["sha256"] == before[s["file"]][1] for s in train["shards"])


def test_without_a_synsets_file_the_names_come_from_the_records(shards, capsys):
    assert adopt(capsys, shards)[0] == 0
    assert load_metadata(str(shards))["class_names"] == list(SYNSETS)


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-10])


def _cut_in_the_last_header(path):
    last = sum(len(r) + 16 for r in list(read_records(str(path)))[:-1])
    path.write_bytes(path.read_bytes()[:last + 5])


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, extra, message", [
    (lambda d: [p.unlink() for p in d.iterdir()], [], "{d!r} holds no train shards named like train-00000-of-01024 "
                                                      "(the ImageNet converter's layout)"),
    (lambda d: (d / "train-00001-of-00002").unlink(), [],
     "shard train-00001-of-00002 is missing from {d!r} (1 of 2 present)"),
    (lambda d: _truncate(d / "train-00001-of-00002"), [],
     "shard {t!r} is unreadable (truncated: record 23 at byte {last} holds "),
    (lambda d: _cut_in_the_last_header(d / "train-00001-of-00002"), [],
     "shard {t!r} is unreadable (truncated: record 23 at byte {last} has a header of 5 bytes); no metadata.json "
     "written"),
    (lambda d: _flip_a_byte(d / "train-00001-of-00002"), [], "shard {t!r} is unreadable (record "),
    (None, ["--label-offset", "0"], "labels 1..3 do not fit 3 classes at label offset 0 (labels 0..2 allowed)"),
    (None, ["--synsets", "2"], "labels 1..3 do not fit 2 classes at label offset 0 (labels 0..1 allowed)"),
    (None, ["--synsets", "4"], "--synsets {s!r} (4 synsets): line 2 is 'n01443537', but the records of label 1 "
                               "have synset 'n01440764'"),
    (None, ["--synsets", "missing"], "--synsets {s!r}: No such file or directory"),
    (lambda d: (d / METADATA_FILE).write_text("{}"), [], "{m!r} already exists: it is kept (pass --force"),
])
def test_bad_input_is_one_line_exit_2_and_no_metadata(shards, capsys, tmp_path, damage, extra, message):
    counts = {"2": SYNSETS[:2], "4": (*SYNSETS, "n01491361")}
    synsets = tmp_path / "synsets.txt"
    if "--synsets" in extra and extra[1] in counts:
        write_synsets(synsets, counts[extra[1]])
    extra = [str(synsets) if a in ("2", "4", "missing") else a for a in extra]
    # The byte where the last record of the shard starts: each record has 16 bytes of framing.
    last = sum(len(r) + 16 for r in list(read_records(str(shards / "train-00001-of-00002")))[:-1])
    if damage:
        damage(shards)
    before = (shards / METADATA_FILE).read_bytes() if (shards / METADATA_FILE).exists() else None
    code, err = adopt(capsys, shards, *extra)
    expected = "adopt_shards: error: " + message.format(
        d=str(shards), t=str(shards / "train-00001-of-00002"), s=str(synsets), m=str(shards / METADATA_FILE),
        last=last)
    assert (code, len(err)) == (2, 1), err
    assert err[0].startswith(expected), err[0]
    after = (shards / METADATA_FILE).read_bytes() if (shards / METADATA_FILE).exists() else None
    assert after == before  # none written, an existing one kept


def test_a_folder_where_metadata_json_cannot_be_written_is_one_line_exit_1(written, capsys, tmp_path):
    pages = sum(-(-p.stat().st_size // 4096) for p in written[0].iterdir())
    with small_filesystem(tmp_path / "fs", f"{pages * 4}k") as fs:  # the shards fill it
        for p in written[0].iterdir():
            shutil.copy(p, fs / p.name)
        code, err = adopt(capsys, fs)
        assert (code, err) == (1, [f"adopt_shards: error: No space left on device: {str(fs / METADATA_FILE)!r}"])
        assert sorted(p.name for p in fs.iterdir()) == sorted(p.name for p in written[0].iterdir())


def test_force_replaces_an_existing_metadata(shards, capsys):
    (shards / METADATA_FILE).write_text("{}")
    assert adopt(capsys, shards, "--force")[0] == 0
    assert load_metadata(str(shards))["label_offset"] == 1


def test_the_reader_subtracts_the_offset_and_the_environment_check_accepts_the_shards(written, shards, capsys):
    from data_pipeline.reader import eval_stream
    from data_pipeline.stream_options import EvalOptions
    from trainer.config import ConfigError, load_config
    from trainer.config_checks import check_environment
    from trainer.data_spec import resolve_data

    assert adopt(capsys, shards)[0] == 0
    cfg = load_config("configs/digits.yaml", [f"data.dir={shards}", "run_dir=r", "data.global_batch_size=8"])
    check_environment(cfg)
    with pytest.raises(ConfigError, match="model.image_size=0: the images in .* differ in size"):
        resolve_data(cfg)
    cfg.model.image_size = 16
    spec = resolve_data(cfg)
    assert (spec.label_offset, spec.num_classes, spec.input_shape) == (1, 3, (16, 16, 3))
    options = EvalOptions(per_replica_batch_size=50, image_size=16, channels=3, label_offset=spec.label_offset)
    labels = np.concatenate([y.numpy() for _, y in eval_stream(spec.val_files, options)])
    assert labels.tolist() == [label - 1 for _, label in written[1]["validation"]]


def test_metadata_label_offset_is_checked():
    meta = {"class_names": ["a"], "image_shape": None, "channels": 3, "splits": {}, "normalisation": "as_stored"}
    check_metadata({**meta, "label_offset": 1}, "m.json")
    for bad in (2, -1, True, "1"):
        with pytest.raises(DataError, match=rf"'m.json': label_offset={bad!r}: expected 0 or 1"):
            check_metadata({**meta, "label_offset": bad}, "m.json")


@pytest.mark.horovod
def test_two_ranks_train_on_adopted_shards_and_the_export_names_the_synsets(written, shards, tmp_path):
    import tensorflow as tf

    from data_pipeline.preprocess import eval_image

    res = run([sys.executable, "-m", "data_pipeline.adopt_shards", str(shards), "--synsets",
               str(write_synsets(tmp_path / "synsets.txt"))])
    assert res.returncode == 0, res.stderr
    run_dir = tmp_path / "run"
    res = run(launch_argv(run_dir, shards, "--set", "model.image_size=16", "--set", "data.global_batch_size=8",
                          "--set", "train.reference_batch_size=8", "--set", "train.epochs=3",
                          "--set", "train.warmup_epochs=0"), timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    records = epoch_records(run_dir)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[-1]["val_accuracy"] >= 0.9 and records[-1]["val_examples"] == 18, records  # chance: 1/3
    served = json.loads((run_dir / "export" / "assets" / "serving.json").read_text())
    assert (served["class_names"], served["normalisation"]) == (list(SYNSETS), None)
    # The converter's JPEGs served as files: the export decodes them as validation decoded the records,
    # and names each by its record's synset (label l is SYNSETS[l - 1]).
    export = tf.saved_model.load(str(run_dir / "export"))
    jpegs = [encoded for encoded, _ in written[1]["validation"]]
    out = export.signatures["serving_default"](image_bytes=tf.constant(jpegs))
    names = [n.decode() for n in out["top_k_names"].numpy()[:, 0]]
    right = sum(name == SYNSETS[label - 1] for name, (_, label) in zip(names, written[1]["validation"]))
    assert right / len(jpegs) == pytest.approx(records[-1]["val_accuracy"]), names
    # The same decode of the same bytes: within a float32 ulp (the graph and eager runs round the scaling
    # apart); a pixel one level off would move an input by a share of 1/255.
    for encoded in jpegs:
        np.testing.assert_allclose(export.preprocess(tf.constant(encoded)).numpy(),
                                   eval_image(tf.constant(encoded), 3, 16).numpy(), rtol=0, atol=1e-6)

import hashlib
import json
import shutil
import sys

import numpy as np
import pytest
import tensorflow as tf

from data_pipeline.build_shards import build
from data_pipeline.images import ImageOptions
from data_pipeline.metadata import DataError, check_metadata, load_metadata, shard_files
from data_pipeline.reader import eval_stream, shard_records, train_stream
from data_pipeline.records import parse_example
from data_pipeline.stream_options import EvalOptions, TrainOptions
from helpers import run

COUNTS = {"cat": 7, "dog": 5, "eel": 9}


@pytest.fixture
def images(tmp_path):
    """Small RGB images of mixed sizes and formats, 3 classes of unequal size."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for name, n in COUNTS.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            h, w = (6, 6) if i % 2 else (5, 7)
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            if i % 3 == 0:
                (root / name / f"im{i}.jpg").write_bytes(tf.io.encode_jpeg(pixels).numpy())
            else:
                (root / name / f"im{i}.png").write_bytes(tf.io.encode_png(pixels).numpy())
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    return root


def ids_of(files, num_shards, index):
    return [parse_example(r)["image/id"].numpy().decode() for r in shard_records(files, num_shards, index)]


def test_counts_split_and_metadata(images, tmp_path):
    meta = build(str(images), str(tmp_path / "out"), num_shards=3, val_fraction=0.25, seed=1)
    assert meta["class_names"] == ["cat", "dog", "eel"]
    val = meta["splits"]["validation"]["per_class"]
    train = meta["splits"]["train"]["per_class"]
    # Stratified: round(n * 0.25) of each class in validation, the rest in train.
    assert val == {"cat": 2, "dog": 1, "eel": 2}
    assert train == {"cat": 5, "dog": 4, "eel": 7}
    assert meta["splits"]["train"]["num_examples"] == 16
    assert sum(s["num_examples"] for s in meta["splits"]["train"]["shards"]) == 16
    assert meta["image_shape"] is None  # mixed sizes
    assert meta["channels"] == 3
    on_disk = load_metadata(str(tmp_path / "out"))
    assert on_disk == json.loads(json.dumps(meta))
    for shard in meta["splits"]["train"]["shards"]:
        data = (tmp_path / "out" / shard["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]


def test_same_input_gives_same_shards(images, tmp_path):
    a = build(str(images), str(tmp_path / "a"), num_shards=2, val_fraction=0.2, seed=3)
    b = build(str(images), str(tmp_path / "b"), num_shards=2, val_fraction=0.2, seed=3)
    assert a == b
    c = build(str(images), str(tmp_path / "c"), num_shards=2, val_fraction=0.2, seed=4)
    def digests(meta):
        return [s["sha256"] for s in meta["splits"]["train"]["shards"]]

    assert digests(c) != digests(a)


def test_existing_output_is_kept_unless_overwrite(images, tmp_path):
    out = tmp_path / "out"
    build(str(images), str(out), num_shards=2, val_fraction=0.2)
    before = (out / "metadata.json").read_bytes()
    with pytest.raises(DataError, match="already exists"):
        build(str(images), str(out), num_shards=3, val_fraction=0.2)
    assert (out / "metadata.json").read_bytes() == before
    meta = build(str(images), str(out), num_shards=3, val_fraction=0.2, overwrite=True)
    assert len(meta["splits"]["train"]["shards"]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "out"]  # no temporary folders left


def test_strict_stops_at_a_corrupt_image_and_writes_no_output(images, tmp_path):
    bad = images / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(DataError, match=r"cannot use image .*broken\.jpg"):
        build(str(images), str(tmp_path / "out"), num_shards=2, val_fraction=0.2, strict=True)
    assert not (tmp_path / "out").exists()


def test_cli_errors_are_one_line_with_exit_2(tmp_path):
    res = run([sys.executable, "-m", "data_pipeline.build_shards",
               "--images", tmp_path / "none", "--out", tmp_path / "o"])
    assert res.returncode == 2
    assert res.stderr.strip() == f"build_shards: error: image folder '{tmp_path / 'none'}' does not exist"


@pytest.mark.parametrize("num_files, ranks", [(4, 2), (3, 2), (3, 4), (5, 3)])
def test_every_record_lands_in_exactly_one_rank(images, tmp_path, num_files, ranks):
    meta = build(str(images), str(tmp_path / "out"), num_shards=num_files, val_fraction=0.0)
    files = shard_files(str(tmp_path / "out"), meta, "train")
    streams = [ids_of(files, ranks, r) for r in range(ranks)]
    seen = [i for s in streams for i in s]
    assert len(seen) == len(set(seen)) == sum(COUNTS.values())
    assert all(streams), "a rank got no records"


def test_training_stream_batches(images, tmp_path):
    meta = build(str(images), str(tmp_path / "out"), num_shards=4, val_fraction=0.2)
    files = shard_files(str(tmp_path / "out"), meta, "train")
    for rank in range(2):
        ds = train_stream(files, TrainOptions(num_shards=2, shard_index=rank, per_replica_batch_size=4, image_size=8,
                                              channels=3, seed=5))
        # Repeats forever: any number of steps is available on every rank,
        # whatever its shards hold.
        batches = list(ds.take(12))
        assert len(batches) == 12
        for x, y in batches:
            assert x.shape == (4, 8, 8, 3) and x.dtype == tf.float32
            assert y.dtype == tf.int32 and set(y.numpy()) <= {0, 1, 2}
            assert 0.0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 1.0


def test_evaluation_stream_keeps_every_example_once(images, tmp_path):
    meta = build(str(images), str(tmp_path / "out"), num_shards=2, val_fraction=0.4)
    files = shard_files(str(tmp_path / "out"), meta, "validation")
    ds = eval_stream(files, EvalOptions(per_replica_batch_size=4, image_size=6, channels=3))
    labels = np.concatenate([y.numpy() for _, y in ds])
    expected = meta["splits"]["validation"]["per_class"]
    assert np.bincount(labels, minlength=3).tolist() == [expected[c] for c in meta["class_names"]]


def test_pixels_survive_the_round_trip(tmp_path):
    pixels = np.arange(4 * 4, dtype=np.uint8).reshape(4, 4, 1) * 15
    (tmp_path / "img" / "a").mkdir(parents=True)
    (tmp_path / "img" / "b").mkdir(parents=True)
    for c in "ab":
        (tmp_path / "img" / c / "x.png").write_bytes(tf.io.encode_png(pixels).numpy())
    opts = ImageOptions(channels=1)
    meta = build(str(tmp_path / "img"), str(tmp_path / "out"), num_shards=1, val_fraction=0.0, image_options=opts)
    assert meta["image_shape"] == [4, 4, 1]
    files = shard_files(str(tmp_path / "out"), meta, "train")
    x, _ = next(iter(eval_stream(files, EvalOptions(per_replica_batch_size=2, image_size=4, channels=1))))
    np.testing.assert_allclose(x.numpy()[0], pixels / 255.0, atol=1e-6)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("channels"), "has no 'channels'"),
    (lambda m: m.update(channels=4), "channels=4: expected 1 or 3"),
    (lambda m: m.update(class_names=[]), "class_names=[]: expected a non-empty list of names"),
    (lambda m: m["class_names"].__setitem__(1, m["class_names"][0]), "a name appears twice"),
    (lambda m: m.update(image_shape=[8, 8]), "image_shape=[8, 8]: expected null or [height, width, channels]"),
    (lambda m: m["splits"]["train"]["shards"][0].pop("num_examples"),
     "splits.train.shards: expected a list of {file, num_examples}"),
    (lambda m: m["splits"]["validation"].update(num_examples=1), "splits.validation.num_examples=1: its shards hold"),
    # Every key the readers use, with a value of the wrong type:
    (lambda m: m.update(class_names="0123456789"), "class_names='0123456789': expected a non-empty list of names"),
    (lambda m: m.update(channels="3"), "channels='3': expected 1 or 3"),
    (lambda m: m.update(channels=True), "channels=True: expected 1 or 3"),
    (lambda m: m.update(channels=1.0), "channels=1.0: expected 1 or 3"),
    (lambda m: m.update(image_shape=[8, "8", 1]), "image_shape=[8, '8', 1]: expected null or [height, width"),
    (lambda m: m.update(splits=[m["splits"]["train"]]), "splits: expected an object"),
    (lambda m: m["splits"].update(train=[]), "splits.train=[]: expected an object"),
    (lambda m: m["splits"].update(validation=None), "splits.validation=None: expected an object"),
    (lambda m: m["splits"]["train"].update(num_examples=float(m["splits"]["train"]["num_examples"])),
     ".0: its shards hold"),
    (lambda m: m["splits"]["train"]["shards"][0].update(num_examples=359.0),
     "splits.train.shards: expected a list of {file, num_examples}"),
    (lambda m: m["splits"]["train"]["shards"][0].update(file=0),
     "splits.train.shards: expected a list of {file, num_examples}"),
    (lambda m: m["splits"]["train"]["shards"][0].update(sha256=0), "splits.train.shards: sha256 0 of 'train-"),
    (lambda m: m["splits"]["train"]["shards"][0].update(file="/etc/hostname"),
     "splits.train.shards: file '/etc/hostname' is not a file name in the data folder"),
    (lambda m: m["splits"]["train"]["shards"][0].update(file="../shards/" + m["splits"]["train"]["shards"][0]["file"]),
     "is not a file name in the data folder"),
    (lambda m: m["splits"]["validation"]["shards"].append(m["splits"]["train"]["shards"][0]), "is listed twice"),
    (lambda m: m.update(num_classes="10"), "num_classes='10': class_names has 10"),
    (lambda m: m.update(format_version="1"), "format_version='1': this code reads versions 1 to"),
    (lambda m: m.update(format_version=99), "format_version=99: this code reads versions 1 to"),
    (lambda m: m.update(normalisation={**m.get("normalisation", {}), "channels": True}),
     "normalisation.channels=True: the serving export reproduces only 1 or 3"),
])
def test_metadata_that_does_not_hold_together_is_one_line(digits_shards, tmp_path, edit, message):
    meta = json.loads((digits_shards / "metadata.json").read_text())
    check_metadata(meta, "metadata.json")  # as written by build_shards
    edit(meta)
    with pytest.raises(DataError) as e:
        check_metadata(meta, "metadata.json")
    assert str(e.value).startswith("'metadata.json': ") and message in str(e.value)


def test_worker_on_a_broken_metadata_json_exits_2_with_one_line(digits_shards, tmp_path):
    data = tmp_path / "shards"
    shutil.copytree(digits_shards, data)
    meta = json.loads((data / "metadata.json").read_text())
    del meta["channels"]  # read by the trainer: a KeyError traceback before this check
    (data / "metadata.json").write_text(json.dumps(meta))
    res = run([sys.executable, "-m", "trainer.train", "--config", "configs/digits.yaml",
               "--set", f"run_dir={tmp_path}/run", "--set", f"data.dir={data}"])
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == (
        f"data error: '{data}/metadata.json': has no 'channels'")
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()

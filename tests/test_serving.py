"""The serving export and `python -m trainer.predict`: the trained model used without this project's code.

One single-process digits run (3 epochs) gives the export; `trainer.evaluate`
on its last checkpoint gives the reference count of correct predictions and a
second export (through --export), and helpers.evaluation_predictions the
reference answer for each validation image, which the exports must give too.
"""

import base64
import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from data_pipeline import metadata as md
from data_pipeline.records import parse_example
from helpers import evaluation_predictions, run

# Run with `python -I` (implies -P -E -s): neither the working folder nor PYTHONPATH on sys.path, only the venv.
FRESH_SCRIPT = r"""
import json, sys
import tensorflow as tf
export, listing = sys.argv[1], json.load(open(sys.argv[2]))
serve = tf.saved_model.load(export).signatures["serving_default"]
probabilities = []
for start in range(0, len(listing), 50):
    data = [open(path, "rb").read() for path, _ in listing[start:start + 50]]
    probabilities += serve(image_bytes=tf.constant(data))["probabilities"].numpy().tolist()
project = sorted(m for m in sys.modules if m.split(".")[0] in ("trainer", "data_pipeline", "launch", "horovod"))
print(json.dumps({"probabilities": probabilities, "project_modules": project}))
"""


@pytest.fixture(scope="module")
def trained(digits_shards, tmp_path_factory):
    """(run_dir, the evaluate --export folder, evaluate's JSON) of a 3-epoch single-process digits run."""
    tmp = tmp_path_factory.mktemp("serving")
    run_dir = tmp / "run"
    common = ["--config", "configs/digits.yaml", "--set", f"run_dir={run_dir}", "--set", f"data.dir={digits_shards}"]
    res = run([sys.executable, "-m", "trainer.train", *common, "--set", "train.epochs=3"], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run([sys.executable, "-m", "trainer.evaluate", *common, "--checkpoint", "latest",
               "--export", tmp / "evaluated"], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir, tmp / "evaluated", json.loads(res.stdout.split("evaluation ", 1)[1])


def validation_listing(shards: Path, images: Path) -> list[tuple[str, int]]:
    """(path of the original PNG, label) of every validation record, from the records' image/id."""
    files = md.shard_files(str(shards), md.load_metadata(str(shards)), "validation")
    listing = []
    for record in tf.data.TFRecordDataset(files):
        ex = parse_example(record)
        listing.append((str(images / ex["image/id"].numpy().decode()), int(ex["image/class/label"])))
    return listing


def test_plain_tensorflow_predicts_the_png_folder_as_evaluate_does(trained, digits_shards, digits_images, tmp_path):
    run_dir, evaluated, report = trained
    listing = validation_listing(digits_shards, digits_images)
    assert len(listing) == report["val_examples"] == 359
    # The evaluation path image by image: the evaluated checkpoint's model on the validation records.
    expected, labels, _ = evaluation_predictions(run_dir, "latest")
    assert labels.tolist() == [label for _, label in listing]
    assert int((expected.argmax(axis=1) == labels).sum()) == round(report["val_accuracy"] * report["val_examples"])
    (tmp_path / "listing.json").write_text(json.dumps(listing))
    (tmp_path / "fresh.py").write_text(FRESH_SCRIPT)
    for export in (run_dir / "export", evaluated):  # the run's own export and evaluate's, of the same weights
        res = run([sys.executable, "-I", tmp_path / "fresh.py", export, tmp_path / "listing.json"])
        assert res.returncode == 0, res.stderr[-3000:]
        fresh = json.loads(res.stdout.strip().splitlines()[-1])
        assert fresh["project_modules"] == []
        # Each original PNG file, served, gets the answer its validation record got.
        served = np.array(fresh["probabilities"])
        np.testing.assert_allclose(served, expected, rtol=0, atol=1e-5, err_msg=str(export))
        np.testing.assert_array_equal(served.argmax(axis=1), expected.argmax(axis=1), err_msg=str(export))
    print("correct:", int((expected.argmax(axis=1) == labels).sum()), "of", len(listing))


def test_metadata_names_the_classes_the_step_and_the_metrics(trained):
    run_dir, evaluated, report = trained
    summary = json.loads((run_dir / "summary.json").read_text())
    for export, metrics in ((run_dir / "export", summary), (evaluated, report)):
        meta = json.loads((export / "assets" / "serving.json").read_text())
        assert meta["class_names"] == [str(i) for i in range(10)]
        assert (meta["image_size"], meta["channels"], meta["top_k"]) == (8, 1, 5)
        assert meta["global_step"] == report["global_step"] == 3 * summary["steps_per_epoch"]
        assert meta["metrics"]["val_accuracy"] == metrics["val_accuracy"]
        assert meta["config_sha256"] == report["config_sha256"] and len(meta["config_sha256"]) == 64
        assert json.loads(tf.saved_model.load(str(export)).metadata().numpy()) == meta


def test_saved_model_cli_lists_both_signatures(trained):
    run_dir, _, _ = trained
    res = run([Path(sys.executable).parent / "saved_model_cli", "show", "--all", "--dir", run_dir / "export"])
    assert res.returncode == 0, res.stderr[-3000:]
    for expected in ("signature_def['serving_default']", "inputs['image_bytes']", "dtype: DT_STRING",
                     "signature_def['serving_images']", "shape: (-1, 8, 8, 1)", "outputs['top_k_names']"):
        assert expected in res.stdout, expected


def saved_model_cli_run(export: Path, signature: str, key: str, array: np.ndarray, out: Path) -> dict:
    """The outputs of `saved_model_cli run` on `array`: the session loader of TensorFlow Serving's C++ server."""
    out.mkdir()
    np.save(out / f"{key}.npy", array, allow_pickle=True)
    res = run([Path(sys.executable).parent / "saved_model_cli", "run", "--dir", export, "--tag_set", "serve",
               "--signature_def", signature, "--inputs", f"{key}={out / f'{key}.npy'}", "--outdir", out])
    assert res.returncode == 0, res.stderr[-3000:]
    return {name: np.load(out / f"{name}.npy", allow_pickle=True)
            for name in ("probabilities", "top_k_indices", "top_k_names")}


def test_the_session_loader_answers_as_tf_saved_model_load_and_predict(trained, digits_images, tmp_path):
    run_dir, _, _ = trained
    export = run_dir / "export"
    files = [f for c in range(10) for f in sorted((digits_images / str(c)).iterdir())[:3]]
    encoded = [f.read_bytes() for f in files]
    loaded = tf.saved_model.load(str(export))
    served = loaded.signatures["serving_default"](image_bytes=tf.constant(encoded))
    reference = {k: v.numpy() for k, v in served.items()}
    images = tf.stack([loaded.preprocess(e) for e in encoded]).numpy()
    by_bytes = saved_model_cli_run(export, "serving_default", "image_bytes", np.array(encoded, dtype=object),
                                   tmp_path / "bytes")
    by_images = saved_model_cli_run(export, "serving_images", "images", images, tmp_path / "images")
    for answer in (by_bytes, by_images):
        np.testing.assert_allclose(answer["probabilities"], reference["probabilities"], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(answer["top_k_indices"], reference["top_k_indices"])
        np.testing.assert_array_equal(answer["top_k_names"].astype(bytes), reference["top_k_names"])

    res = run([sys.executable, "-m", "trainer.predict", "--model", export, *files, "--top-k", "5",
               "--output", tmp_path / "p.jsonl"])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rows] == [str(f) for f in files]
    for row, names, indices, probabilities in zip(rows, by_bytes["top_k_names"], by_bytes["top_k_indices"],
                                                  by_bytes["probabilities"]):
        assert [t["name"] for t in row["top_k"]] == [n.decode() for n in names]
        np.testing.assert_allclose([t["probability"] for t in row["top_k"]], probabilities[indices], rtol=0, atol=1e-6)


def test_rest_request_shape_gives_predicts_answer_and_a_bad_string_a_clear_error(trained, digits_images, tmp_path):
    run_dir, _, _ = trained
    files = sorted((digits_images / "7").iterdir())[:5]
    res = run([sys.executable, "-m", "trainer.predict", "--model", run_dir / "export", *files,
               "--output", tmp_path / "p.csv", "--top-k", "2"])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    # What TensorFlow Serving's REST API does with {"instances": [{"b64": ...}]} on a one-input signature.
    body = json.dumps({"instances": [{"b64": base64.b64encode(f.read_bytes()).decode()} for f in files]})
    instances = [base64.b64decode(i["b64"]) for i in json.loads(body)["instances"]]
    serve = tf.saved_model.load(str(run_dir / "export")).signatures["serving_default"]
    out = serve(image_bytes=tf.constant(instances))
    assert [r["path"] for r in rows] == [str(f) for f in files]
    for row, names, probs in zip(rows, out["top_k_names"].numpy(), out["probabilities"].numpy()):
        assert [row["class_1"], row["class_2"]] == [n.decode() for n in names[:2]]
        assert float(row["probability_1"]) == pytest.approx(float(probs.max()), abs=1e-6)

    clear = r"not a JPEG, PNG, GIF or BMP image at batch index.*\[1\]"
    with pytest.raises(tf.errors.InvalidArgumentError, match=clear):
        serve(image_bytes=tf.constant([instances[0], b"<html>not an image</html>"]))


def test_predict_skips_and_counts_bad_files_and_exits_2_on_bad_arguments(trained, digits_images, tmp_path):
    run_dir, _, _ = trained
    model = run_dir / "export"
    folder = tmp_path / "in"
    (folder / "sub" / ".hidden").mkdir(parents=True)
    good = sorted((digits_images / "1").iterdir())[:3]
    for i, f in enumerate(good):
        (folder / ("sub" if i else "") / f.name).write_bytes(f.read_bytes())
    (folder / "sub" / ".hidden" / "x.png").write_bytes(good[0].read_bytes())
    (folder / ".dot.png").write_bytes(good[0].read_bytes())
    (folder / "notes.txt").write_text("not an image")
    (folder / "text.png").write_text("not an image")
    (folder / "sub" / "cut.png").write_bytes(good[0].read_bytes()[:30])
    # A file name that is not UTF-8 (Linux names are bytes): no output row could hold it.
    with open(os.fsencode(folder) + b"/bad\xff.png", "wb") as f:
        f.write(good[0].read_bytes())

    res = run([sys.executable, "-m", "trainer.predict", "--model", model, folder, "--output", tmp_path / "p.jsonl",
               "--batch-size", "2"])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert sorted(Path(r["path"]).name for r in rows) == sorted(f.name for f in good)
    assert all(len(r["top_k"]) == 3 for r in rows)
    assert "predict: 6 image files: 3 predicted, 3 bad (skipped); 1 other files skipped" in res.stderr
    assert f"bad image {folder}/bad\\xff.png: its file name is not valid UTF-8\n" in res.stderr
    assert f"bad image {folder / 'text.png'}: not a JPEG, PNG, GIF or BMP image\n" in res.stderr
    assert f"bad image {folder / 'sub' / 'cut.png'}: Invalid PNG" in res.stderr

    only_bad = run([sys.executable, "-m", "trainer.predict", "--model", model, folder / "text.png"])
    assert only_bad.returncode == 1 and "0 predicted, 1 bad" in only_bad.stderr
    for argv, message in (
        (["--model", tmp_path / "nothing", folder], "no SavedModel there"),
        (["--model", model, folder / "notes.txt"], "no image files"),
        (["--model", model, tmp_path / "missing"], "no such file or folder"),
        (["--model", model, folder, "--top-k", "11"], "--top-k 11: must be between 1 and the model's 10 classes"),
        (["--model", model, folder, "--output", tmp_path / "no" / "p.csv"], "its folder does not exist"),
    ):
        res = run([sys.executable, "-m", "trainer.predict", *argv])
        assert res.returncode == 2 and message in res.stderr, (argv, res.returncode, res.stderr[-2000:])
        assert len([ln for ln in res.stderr.splitlines() if ln.startswith("predict: error:")]) == 1


def test_predict_imports_no_horovod_and_no_training_code(trained, digits_images):
    run_dir, _, _ = trained
    code = (
        "import runpy, sys, json\n"
        f"sys.argv = ['predict', '--model', {str(run_dir / 'export')!r}, {str(digits_images / '2')!r}]\n"
        "try:\n    runpy.run_module('trainer.predict', run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code\n"
        "top = ('horovod', 'trainer', 'data_pipeline', 'launch')\n"
        "mods = sorted(m for m in sys.modules if m.split('.')[0] in top)\n"
        "print(json.dumps({'code': code, 'modules': mods}), file=sys.stderr)\n"
    )
    res = run([sys.executable, "-c", code])
    report = json.loads(res.stderr.strip().splitlines()[-1])
    # runpy runs trainer.predict as __main__: only its (empty) package is imported by name.
    assert report == {"code": 0, "modules": ["trainer"]}, res.stderr[-2000:]

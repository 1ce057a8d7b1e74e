"""The serving export as servers load it, and what a kill during its replacement leaves.

TensorFlow Serving's C++ loader and `saved_model_cli run` build a session from
the export's MetaGraph and run its restore op; tf.saved_model.load restores
through the object graph instead, and answered where the session loader did
not. These tests load through the session (the loader saved_model_cli calls),
tests/test_serving.py through the saved_model_cli command itself.
"""

import json
import logging
import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from helpers import run

SESSION_LOADER_NOTE = "contains input name(s)"


def session_run(export: str, signature: str, feed: dict) -> tuple[dict, object]:
    """(outputs, SignatureDef) of `signature` run in a TF1 session over the loaded MetaGraph."""
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], export)
        sig = meta.signature_def[signature]
        fetches = {k: v.name for k, v in sig.outputs.items()}
        return sess.run(fetches, {sig.inputs[k].name: v for k, v in feed.items()}), sig


def randomized_model(precision: str):
    """A compiled run model (DataParallelModel, optimizer built) with random weights and BatchNorm statistics."""
    from trainer.assembly import build_compiled_model
    from trainer.config import load_config
    from trainer.data_spec import DataSpec

    cfg = load_config("configs/digits.yaml", [f"train.precision={precision}"])
    model = build_compiled_model(cfg, DataSpec((8, 8, 1), 10, 2, [], []), 0.01)
    rng = np.random.default_rng(0)
    for w in model.weights:
        value = rng.normal(0.0, 0.3, w.shape)
        w.assign(np.abs(value) + 0.5 if "variance" in w.path else value)
    return model


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_the_session_loader_answers_as_the_model_and_the_export_holds_only_its_weights(tmp_path, caplog, precision):
    from trainer.export import ExportInfo, export_serving

    model = randomized_model(precision)
    info = ExportInfo(class_names=tuple("abcdefghij"), image_size=8, channels=1, top_k=3)
    export = str(tmp_path / "export")
    with caplog.at_level(logging.INFO, logger="absl"):
        export_serving(model, export, info)
    # TensorFlow's note about its renamed capture placeholders is not shown at every export.
    assert not [r for r in caplog.records if SESSION_LOADER_NOTE in r.getMessage()]

    images = np.random.default_rng(1).uniform(0, 1, (6, 8, 8, 1)).astype(np.float32)
    out, sig = session_run(export, "serving_images", {"images": images})
    # float32 in and out whatever the training precision.
    assert sig.inputs["images"].dtype == tf.float32.as_datatype_enum
    assert sig.outputs["probabilities"].dtype == tf.float32.as_datatype_enum
    # The same saved graph as tf.saved_model.load runs: the same answers.
    loaded = tf.saved_model.load(export).signatures["serving_images"](images=tf.constant(images))
    np.testing.assert_allclose(out["probabilities"], loaded["probabilities"].numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(out["top_k_indices"], loaded["top_k_indices"].numpy())
    # The model itself, run eagerly: in 16-bit precisions the graph's fused ops round differently.
    expected = tf.cast(model(images, training=False), tf.float32).numpy()
    np.testing.assert_allclose(out["probabilities"], expected, rtol=0, atol=1e-6 if precision == "float32" else 2e-3)
    np.testing.assert_array_equal(out["top_k_indices"][:, 0], expected.argmax(axis=1))
    # The weights alone (BatchNorm statistics included), not the optimizer's variables.
    saved = [shape for name, shape in tf.train.list_variables(os.path.join(export, "variables", "variables"))
             if name != "_CHECKPOINTABLE_OBJECT_GRAPH"]
    assert sorted(saved) == sorted(list(w.shape) for w in model.weights)


def test_the_session_loader_answers_image_bytes_as_tf_saved_model_load(tmp_path, digits_images):
    from trainer.export import ExportInfo, export_serving

    export = str(tmp_path / "export")
    export_serving(randomized_model("float32"), export, ExportInfo(tuple("abcdefghij"), image_size=8, channels=1))
    encoded = [f.read_bytes() for f in sorted((digits_images / "4").iterdir())[:8]]
    out, _ = session_run(export, "serving_default", {"image_bytes": np.array(encoded, dtype=object)})
    loaded = tf.saved_model.load(export).signatures["serving_default"](image_bytes=tf.constant(encoded))
    np.testing.assert_allclose(out["probabilities"], loaded["probabilities"].numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(out["top_k_names"], loaded["top_k_names"].numpy())
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"not a JPEG, PNG, GIF or BMP image at batch index"):
        session_run(export, "serving_default", {"image_bytes": np.array([encoded[0], b"<html>"], dtype=object)})


# trainer.train, SIGKILLed by an audit hook (called before each os.rename) between the export's
# two renames: the old export already renamed aside, the new one not yet in its place.
KILLED_BETWEEN_RENAMES = r"""
import os, runpy, signal, sys
def hook(event, args):
    if event == "os.rename" and os.path.basename(os.fsdecode(args[0])).startswith("export.tmp-"):
        os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(hook)
sys.argv = ["trainer.train", *sys.argv[1:]]
runpy.run_module("trainer.train", run_name="__main__")
"""


def test_a_kill_between_the_renames_of_the_export_leaves_the_old_one_back_at_the_next_start(digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    common = ["--config", "configs/digits.yaml", "--set", f"run_dir={run_dir}", "--set", f"data.dir={digits_shards}"]
    res = run([sys.executable, "-m", "trainer.train", *common, "--set", "train.epochs=1"], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    first_step = json.loads((run_dir / "export" / "assets" / "serving.json").read_text())["global_step"]

    res = run([sys.executable, "-c", KILLED_BETWEEN_RENAMES, *common, "--set", "train.epochs=2"], timeout=300)
    assert res.returncode == -9, res.stderr[-3000:]
    names = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("export"))
    assert [n.split("-")[0] for n in names] == ["export.old", "export.tmp"], names  # the bug's state: no export/

    res = run([sys.executable, "-m", "trainer.train", *common, "--set", "train.epochs=2"], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"putting back {run_dir / 'export'}, set aside by a replacement that was killed" in res.stderr
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("export")) == ["export"]
    # The killed start had trained its last epoch: this one finishes it (summary and export), from that checkpoint.
    meta = json.loads((run_dir / "export" / "assets" / "serving.json").read_text())
    assert meta["global_step"] == 2 * first_step
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 2
    out = tf.saved_model.load(str(run_dir / "export")).signatures["serving_images"](images=tf.zeros([1, 8, 8, 1]))
    assert out["probabilities"].shape == (1, 10)

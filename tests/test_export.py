"""What a kill during the replacement of the serving export leaves, and the next start."""

import json
import sys

import tensorflow as tf

from helpers import run

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
    meta = json.loads((run_dir / "export" / "assets" / "serving.json").read_text())
    # The export put back, or a newer one if this start exported again: whole either way.
    assert meta["global_step"] >= first_step
    out = tf.saved_model.load(str(run_dir / "export")).signatures["serving_images"](images=tf.zeros([1, 8, 8, 1]))
    assert out["probabilities"].shape == (1, 10)

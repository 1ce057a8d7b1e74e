"""Every entry point fed bad values: one line on stderr, no traceback, and the documented exit code.

The cases run the entry points as a user does, each in a process of its own,
and fail before TensorFlow loads. trainer.predict imports TensorFlow first
(a served model's predictor needs nothing else), so its cases share one
process (PREDICT_DRIVER), which calls its main() once per case with stderr
captured; it runs them as the user nobody when the tests run as root, so
that a model folder without permission is one.
"""

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import run

# Start-up lines of TensorFlow (trainer.predict), which no environment variable silences.
BANNERS = re.compile(r"absl::InitializeLog|oneDNN custom operations|cpu_feature_guard|rebuild TensorFlow|"
                     r"Unable to register cu|computation placer|Could not find cuda|TF-TRT Warning")

BASE = ["--config", "configs/digits.yaml", "--set", "data.dir={d}/shards", "--set", "run_dir={d}/new",
        "--set", "data.global_batch_size=2"]
# --dry-run checks all that a run checks before its workers start, and never starts them.
LAUNCH = ["-m", "launch", "--np", "2", "--dry-run"]
SLURM = ["-m", "launch", "slurm", "--dry-run"]
TRAIN = ["-m", "trainer.train"]
EVALUATE = ["-m", "trainer.evaluate"]
SHARDS = ["-m", "data_pipeline.build_shards"]
METADATA = "'{d}/{name}/metadata.json': "
CHECKPOINT = ("checkpoint '{d}/run/checkpoints/step-000000002' was written for model resnet20 with 2 classes and "
              "input 8x8x1; this run builds model simple_cnn with 2 classes and input 8x8x1")


def sets(*pairs):
    return [x for p in pairs for x in ("--set", p)]


# (argv after the interpreter, exit code, the one line on stderr); {d} is the folder of files the cases use.
CASES = {
    "launch: unknown key": (
        [*LAUNCH, *BASE, *sets("train.epochz=3")], 2, "launch: error: unknown config key 'train.epochz'"),
    "launch: argument": (
        ["-m", "launch", "--np", "abc", "--dry-run", *BASE], 2,
        "python -m launch run: error: argument --np: invalid int value: 'abc' (see --help)"),
    "launch: non-ASCII slots": (
        [*LAUNCH, "--hosts", "h:\u00b2", *BASE], 2,
        "launch: error: --hosts entry 'h:\u00b2' is not host[:slots] with slots >= 1"),
    "launch: non-ASCII slots in a hostfile": (
        ["-m", "launch", "--hostfile", "{d}/hostfile", "--dry-run", *BASE], 2,
        "launch: error: {d}/hostfile line 1: slots='\u00b2' is not a number"),
    "launch: cycle time nan": (
        [*LAUNCH, "--cycle-time-ms", "nan", *BASE], 2, "launch: error: --cycle-time-ms must be a number > 0, got nan"),
    "launch: timeline in a folder that does not exist": (
        [*LAUNCH, "--timeline", "{d}/missing/timeline.json", *BASE], 2,
        "launch: error: --timeline '{d}/missing/timeline.json': its folder does not exist"),
    "launch: infinite learning rate": (
        [*LAUNCH, *BASE, *sets("train.base_learning_rate=.inf")], 2,
        "launch: error: train.base_learning_rate=inf: expected a finite number"),
    "launch: run_dir under a file": (
        [*LAUNCH, *BASE, *sets("run_dir={d}/afile/run")], 2,
        "launch: error: run_dir '{d}/afile/run': '{d}/afile' is not a folder"),
    "launch: channels as a string": (
        [*LAUNCH, *BASE, *sets("data.dir={d}/channels")], 2,
        "launch: data error: " + METADATA.format(d="{d}", name="channels") + "channels='3': expected 1 or 3"),
    "launch: checkpoint of another model": (
        [*LAUNCH, *BASE, *sets("run_dir={d}/run")], 2, "launch: checkpoint error: " + CHECKPOINT),
    "launch: a state.json whose model is a string": (
        [*LAUNCH, *BASE, *sets("run_dir={d}/odd")], 2,
        "launch: checkpoint error: checkpoint '{d}/odd/checkpoints/step-000000002' was written for an unknown "
        "model; this run builds model simple_cnn with 2 classes and input 8x8x1"),
    "launch: batch larger than the data": (
        [*LAUNCH, *BASE, *sets("data.global_batch_size=64")], 2,
        "launch: error: data.global_batch_size=64: times train.accumulation_steps=1, larger than the 8 training "
        "examples"),
    "slurm: non-ASCII time": (
        [*SLURM, "--time", "\u0662\u0660", *BASE], 2,
        "launch: error: --time '\u0662\u0660' is not a Slurm time (MM, HH:MM:SS, D-HH:MM:SS)"),
    "slurm: splits.train as a list": (
        [*SLURM, *BASE, *sets("data.dir={d}/splits")], 2,
        "launch: data error: " + METADATA.format(d="{d}", name="splits") + "splits.train=[]: expected an object"),
    "slurm: checkpoint of another model": (
        [*SLURM, *BASE, *sets("run_dir={d}/run")], 2, "launch: checkpoint error: " + CHECKPOINT),
    "slurm: argument": (
        [*SLURM, "--nodes", "two", *BASE], 2,
        "python -m launch slurm: error: argument --nodes: invalid int value: 'two' (see --help)"),
    "train: run_dir under a file": (
        [*TRAIN, *BASE, *sets("run_dir={d}/afile/run")], 2,
        "config error: run_dir '{d}/afile/run': '{d}/afile' is not a folder"),
    "train: class_names as a string": (
        [*TRAIN, *BASE, *sets("data.dir={d}/class_names")], 2,
        "data error: " + METADATA.format(d="{d}", name="class_names")
        + "class_names='ab': expected a non-empty list of names"),
    "train: sha256 as a number": (
        [*TRAIN, *BASE, *sets("data.dir={d}/sha256")], 2,
        "data error: " + METADATA.format(d="{d}", name="sha256")
        + "splits.train.shards: sha256 7 of 'train-00000-of-00002.tfrecord' is not 64 hexadecimal digits"),
    "train: image_shape with a string": (
        [*TRAIN, *BASE, *sets("data.dir={d}/image_shape")], 2,
        "data error: " + METADATA.format(d="{d}", name="image_shape")
        + "image_shape=[8, '8', 1]: expected null or [height, width, channels]"),
    "train: checkpoint of another model": (
        [*TRAIN, *BASE, *sets("run_dir={d}/run")], 2, "checkpoint error: " + CHECKPOINT),
    "train: negative seed": (
        [*TRAIN, *BASE, *sets("train.seed=-5")], 2, "config error: train.seed=-5: must be in 0..2147483647"),
    "train: threads": (
        [*TRAIN, *BASE, *sets("runtime.intra_op_threads=100000000000")], 2,
        "config error: runtime.intra_op_threads=100000000000: must be in 0..1024"),
    "train: argument": (
        [*TRAIN, *BASE, "--bogus"], 2, "python -m trainer.train: error: unrecognized arguments: --bogus (see --help)"),
    "evaluate: no such checkpoint": (
        [*EVALUATE, *BASE, "--checkpoint", "nope"], 2, "checkpoint error: 'nope' is not a checkpoint"),
    "evaluate: export under a file": (
        [*EVALUATE, *BASE, "--export", "{d}/afile/export"], 2,
        "config error: --export '{d}/afile/export': its folder does not exist"),
    "evaluate: a shard outside the data folder": (
        [*EVALUATE, *BASE, *sets("data.dir={d}/file")], 2,
        "data error: " + METADATA.format(d="{d}", name="file")
        + "splits.train.shards: file '/etc/hostname' is not a file name in the data folder"),
    "evaluate: checkpoint of another model": (
        [*EVALUATE, *BASE, *sets("run_dir={d}/run"), "--checkpoint", "latest"], 2, "checkpoint error: " + CHECKPOINT),
    "build_shards: no image folder": (
        [*SHARDS, "--images", "{d}/missing", "--out", "{d}/out"], 2,
        "build_shards: error: image folder '{d}/missing' does not exist"),
    "build_shards: infinite shard size": (
        [*SHARDS, "--images", "{d}/images", "--out", "{d}/out", "--shard-size-mb", "inf"], 2,
        "build_shards: error: --shard-size-mb must be a number >= 0, got inf"),
    "build_shards: argument": (
        [*SHARDS, "--images", "{d}/images", "--out", "{d}/out", "--num-shards", "x"], 2,
        "python -m data_pipeline.build_shards: error: argument --num-shards: invalid int value: 'x' (see --help)"),
}

# metadata.json edits, one folder each: a value of the wrong type for a key the readers use.
METADATA_EDITS = {
    "channels": lambda m: m.update(channels="3"),
    "class_names": lambda m: m.update(class_names="ab"),
    "image_shape": lambda m: m.update(image_shape=[8, "8", 1]),
    "splits": lambda m: m["splits"].update(train=[]),
    "sha256": lambda m: m["splits"]["train"]["shards"][0].update(sha256=7),
    "file": lambda m: m["splits"]["train"]["shards"][0].update(file="/etc/hostname"),
}


@pytest.fixture(scope="module")
def d(tmp_path_factory) -> Path:
    """The files the cases point at: tiny shards and broken copies, a plain file, a run of another model."""
    from data_pipeline.build_shards import build
    from data_pipeline.images import ImageOptions

    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    for label in "ab":
        (d / "images" / label).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(d / "images" / label / f"{i}.png")
    build(str(d / "images"), str(d / "shards"), num_shards=2, val_fraction=0.3, image_options=ImageOptions(channels=1))
    for name, edit in METADATA_EDITS.items():
        shutil.copytree(d / "shards", d / name)
        meta = json.loads((d / name / "metadata.json").read_text())
        edit(meta)
        (d / name / "metadata.json").write_text(json.dumps(meta))
    (d / "afile").write_text("a plain file\n")
    (d / "hostfile").write_text("localhost slots=\u00b2\n")
    for run_dir, model in (("run", {"name": "resnet20", "input_shape": [8, 8, 1], "num_classes": 2}), ("odd", "x")):
        checkpoint = d / run_dir / "checkpoints" / "step-000000002"
        checkpoint.mkdir(parents=True)
        (checkpoint / "state.json").write_text(json.dumps({
            "epoch": 1, "global_step": 2, "steps_per_epoch": 2, "model": model}))
    return d


def lines(stderr: str) -> list[str]:
    return [x for x in stderr.splitlines() if x.strip() and not BANNERS.search(x)]


@pytest.mark.parametrize("case", CASES)
def test_bad_values_get_one_line_and_the_documented_exit_code(d, case):
    argv, code, line = CASES[case]
    res = run([sys.executable, *[a.format(d=d) for a in argv]], timeout=120)
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert (res.returncode, lines(res.stderr), res.stdout) == (code, [line.format(d=d)], ""), res.stderr[-3000:]


PREDICT_DRIVER = r"""
import json, os, pwd, shutil, sys, tempfile, traceback
import numpy as np
import tensorflow as tf
from trainer.predict import main

shared, cases = sys.argv[1], json.loads(sys.argv[2])
plain = os.path.join(shared, "plain")
module = tf.Module()
module.v = tf.Variable(np.arange(1000, dtype=np.float32))
module.f = tf.function(lambda x: x * module.v, input_signature=[tf.TensorSpec([1000], tf.float32)])
tf.saved_model.save(module, plain)
for name in ("garbage", "no_variables", "cut_variables", "locked"):
    shutil.copytree(plain, os.path.join(shared, name))
with open(os.path.join(shared, "garbage", "saved_model.pb"), "wb") as f:
    f.write(b"\x08\x96\x01 not a SavedModel " * 10)
shutil.rmtree(os.path.join(shared, "no_variables", "variables"))
data = os.path.join(shared, "cut_variables", "variables", "variables.data-00000-of-00001")
os.truncate(data, os.path.getsize(data) // 2)
os.makedirs(os.path.join(shared, "images"))
tf.io.write_file(os.path.join(shared, "images", "x.png"), tf.io.encode_png(tf.zeros([4, 4, 1], tf.uint8)))
for root, dirs, files in os.walk(shared):
    for name in dirs + files:
        os.chmod(os.path.join(root, name), 0o755)
os.chmod(os.path.join(shared, "locked"), 0)
if os.getuid() == 0:  # root reads any folder: the cases run as nobody
    user = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)
results = []
for argv in cases:
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile("w+") as err:
        os.dup2(err.fileno(), 2)
        try:
            code = main([a.format(d=shared) for a in argv])
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        results.append([code, err.read()])
print(json.dumps(results))
"""

MODEL = "--model"
PREDICT_CASES = {
    "no SavedModel": (
        [MODEL, "{d}/missing", "{d}/images"], "--model '{d}/missing': no SavedModel there (expected RUN_DIR/export)"),
    "saved_model.pb of garbage": (
        [MODEL, "{d}/garbage", "{d}/images"],
        re.compile(r"--model '{d}/garbage': cannot be loaded: .*saved_model\.pb.*")),
    "no variables": (
        [MODEL, "{d}/no_variables", "{d}/images"], re.compile(r"--model '{d}/no_variables': cannot be loaded: .+")),
    "variables cut short": (
        [MODEL, "{d}/cut_variables", "{d}/images"], re.compile(r"--model '{d}/cut_variables': cannot be loaded: .+")),
    "not an export of this trainer": (
        [MODEL, "{d}/plain", "{d}/images"],
        "--model '{d}/plain': not a serving export of this trainer (no serving_default over image bytes)"),
    "folder without permission": ([MODEL, "{d}/locked", "{d}/images"], "--model '{d}/locked': permission denied"),
    "batch size": ([MODEL, "{d}/plain", "{d}/images", "--batch-size", "0"], "--batch-size 0: must be in 1..2147483647"),
    "output folder": (
        [MODEL, "{d}/plain", "{d}/images", "--output", "{d}/nowhere/p.csv"],
        "--output '{d}/nowhere/p.csv': its folder does not exist"),
    "no image files": ([MODEL, "{d}/plain", "{d}/plain"], re.compile(r"no image files \(.*\) in {d}/plain")),
}


def test_predict_bad_models_and_arguments_get_one_line_and_exit_2():
    shared = Path(tempfile.mkdtemp(prefix="predict-"))  # not under pytest's folder, which only root may enter
    try:
        shared.chmod(0o755)
        argvs = [argv for argv, _ in PREDICT_CASES.values()] + [["--top-k", "x", MODEL, "{d}/plain", "{d}/images"]]
        res = run([sys.executable, "-c", PREDICT_DRIVER, shared, json.dumps(argvs)], timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        results = json.loads(res.stdout.splitlines()[-1])
    finally:
        for root, dirs, _ in os.walk(shared):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o755)
        shutil.rmtree(shared)
    expected = [("predict: error: ", line) for _, line in PREDICT_CASES.values()]
    expected.append(("", "python -m trainer.predict: error: argument --top-k: invalid int value: 'x' (see --help)"))
    for case, (code, stderr), (prefix, line) in zip([*PREDICT_CASES, "argument"], results, expected):
        assert "Traceback" not in stderr, (case, stderr[-3000:])
        shown = lines(stderr)
        assert code == 2 and len(shown) == 1 and shown[0].startswith(prefix), (case, code, stderr[-3000:])
        text = shown[0][len(prefix):]
        if isinstance(line, str):
            assert text == line.format(d=shared), case
        else:
            assert re.fullmatch(line.pattern.format(d=re.escape(str(shared))), text), (case, text)

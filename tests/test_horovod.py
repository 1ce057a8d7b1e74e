"""Integration tests through the real horovodrun with 2 ranks on this machine."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run

pytestmark = pytest.mark.horovod

LINE = re.compile(r"rank(\d) (\w+) ([\w.]+): (.*)$")


def launch_argv(run_dir, shards, *extra):
    return [sys.executable, "-m", "launch", "--np", "2", "--config", "configs/digits.yaml",
            "--set", f"run_dir={run_dir}", "--set", f"data.dir={shards}", "--set", "runtime.log_all_ranks=true",
            *extra]


def messages(output: str, prefix: str) -> dict[int, list[str]]:
    """Log messages starting with `prefix`, by rank."""
    found: dict[int, list[str]] = {}
    for line in output.splitlines():
        m = LINE.search(line)
        if m and m.group(4).startswith(prefix):
            found.setdefault(int(m.group(1)), []).append(m.group(4)[len(prefix):].strip())
    return found


def epoch_records(output: str) -> dict[int, list[dict]]:
    return {r: [json.loads(x) for x in xs] for r, xs in messages(output, "epoch_metrics").items()}


@pytest.fixture(scope="module")
def trained(digits_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("hvd") / "run"
    res = run(launch_argv(run_dir, digits_shards, "--set", "train.epochs=3"), timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return run_dir, res.stdout + res.stderr


def test_ranks_start_apart_and_end_identical(trained):
    _, out = trained
    before = messages(out, "weights before broadcast:")
    after = messages(out, "weights after training:")
    assert sorted(before) == sorted(after) == [0, 1]
    # Seeds differ per rank, so the initial weights differ: the broadcast is what aligns them.
    assert before[0] != before[1]
    assert after[0] == after[1]


def test_ranks_read_different_shards(trained):
    _, out = trained
    shards = {r: set(v[0].split(",")) for r, v in messages(out, "train shards read by this rank:").items()}
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    assert len(shards[0] | shards[1]) == 4


def test_logged_metrics_are_identical_on_both_ranks(trained):
    _, out = trained
    records = epoch_records(out)
    assert [r["epoch"] for r in records[0]] == [1, 2, 3]
    for a, b in zip(records[0], records[1]):
        assert {k: v for k, v in a.items() if k != "rank"} == {k: v for k, v in b.items() if k != "rank"}
    assert records[0][-1]["loss"] < records[0][0]["loss"]


def test_only_rank0_writes_checkpoints_events_and_summary(trained):
    run_dir, out = trained
    pids = {int(r): int(p) for r, p in re.findall(r"rank(\d) INFO trainer.train: rank \d of 2 .* pid (\d+)", out)}
    assert sorted(pids) == [0, 1]
    for sub in ("train", "validation"):
        events = list((run_dir / "tensorboard" / sub).iterdir())
        assert len(events) == 1, events
        # Event file names end in .<hostname>.<pid>.<n>.v2: the writer's pid.
        assert events[0].name.split(".")[-3] == str(pids[0])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch-00001", "epoch-00002", "epoch-00003"]
    state = json.loads((run_dir / "checkpoints" / "epoch-00003" / "state.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert state == {"epoch": 3, "global_step": 3 * summary["steps_per_epoch"], "world_size": 2, "global_batch_size": 64}
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 64 and summary["epochs"] == 3
    assert summary["steps_per_epoch"] == 1437 // 64
    assert summary["images_per_sec"] > 0
    assert summary["val_accuracy"] > 0.8
    assert (run_dir / "config.yaml").is_file()
    assert not [p for p in run_dir.rglob("*") if ".tmp-" in p.name]


def test_exported_model_serves_the_evaluated_accuracy(trained, digits_shards):
    import tensorflow as tf

    from data_pipeline.metadata import load_metadata, shard_files
    from data_pipeline.reader import make_dataset

    run_dir, _ = trained
    summary = json.loads((run_dir / "summary.json").read_text())
    served = tf.saved_model.load(str(run_dir / "export"))
    meta = load_metadata(str(digits_shards))
    ds = make_dataset(shard_files(str(digits_shards), meta, "validation"), 1, 0, 50, 8, 1, training=False,
                      drop_remainder=False)
    correct = total = 0
    for x, y in ds:
        pred = np.argmax(served.serve(x).numpy(), axis=1)
        correct += int((pred == y.numpy()).sum())
        total += len(y)
    assert total == meta["splits"]["validation"]["num_examples"]
    assert correct / total == pytest.approx(summary["val_accuracy"], abs=1e-6)


def test_stopped_run_resumes_at_the_next_epoch(digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    argv = launch_argv(run_dir, digits_shards, "--set", "train.epochs=40")
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "epoch-00002").exists():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint for epoch 2"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    first = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, "the run finished before it could be stopped"
    done = [r["epoch"] for r in epoch_records(first)[0]]
    latest = max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").iterdir() if "tmp" not in p.name)
    assert done and latest == done[-1] < 40

    # Resume with the MPI controller and fp16 gradient compression this time:
    # the checkpoint does not depend on either, and the replicas must still agree.
    res = run(launch_argv(run_dir, digits_shards, "--set", "train.epochs=40", "--mpi",
                          "--set", "allreduce.fp16_compression=true"), timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert f"resumed from {run_dir}/checkpoints/epoch-{latest:05d}" in out
    records = epoch_records(out)
    assert [r["epoch"] for r in records[0]] == list(range(latest + 1, 41))
    assert [r["epoch"] for r in records[1]] == list(range(latest + 1, 41))
    after = messages(out, "weights after training:")
    assert after[0] == after[1]
    summary = json.loads((run_dir / "summary.json").read_text())
    state = json.loads((run_dir / "checkpoints" / "epoch-00040" / "state.json").read_text())
    assert state["global_step"] == 40 * summary["steps_per_epoch"]

    # A third start finds the run finished, says so, and trains nothing.
    res = run(launch_argv(run_dir, digits_shards, "--set", "train.epochs=40"), timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "already finished at epoch 40" in out
    assert "epoch_metrics" not in out
    assert f"val_accuracy            {summary['val_accuracy']:.4f}" in out


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.global_batch_size=0", "config error: data.global_batch_size=0: must be > 0"),
        ("trian.epochs=2", "config error: unknown config key 'trian'"),
        ("data.dir=/nonexistent/shards", "config error: data.dir='/nonexistent/shards': folder does not exist"),
    ],
)
def test_worker_bad_config_exits_2_with_one_line(override, message, tmp_path):
    res = run([sys.executable, "-m", "trainer.train", "--config", "configs/digits.yaml",
               "--set", f"run_dir={tmp_path}/run", "--set", override])
    assert res.returncode == 2
    assert res.stderr.strip() == message
    assert not (tmp_path / "run").exists()


def test_worker_without_shards_exits_2(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metadata.json").write_text("{}")
    res = run([sys.executable, "-m", "trainer.train", "--config", "configs/digits.yaml",
               "--set", f"run_dir={tmp_path}/run", "--set", f"data.dir={tmp_path}/empty"])
    assert res.returncode == 2
    assert res.stderr.strip() == f"config error: data.dir='{tmp_path}/empty': has no train-*.tfrecord shards"


def test_workers_under_horovodrun_refuse_an_indivisible_batch(digits_shards, tmp_path):
    horovodrun = Path(sys.executable).parent / "horovodrun"
    res = run([horovodrun, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, "-m", "trainer.train",
               "--config", "configs/digits.yaml", "--set", f"data.dir={digits_shards}",
               "--set", f"run_dir={tmp_path}/run", "--set", "data.global_batch_size=63"], timeout=300)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    for rank in (0, 1):
        assert re.search(
            rf"\[{rank}\]<stderr>:config error: data.global_batch_size=63: is not divisible by the world size 2", out
        ), out[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()

"""Integration tests through the real horovodrun with 2 ranks on this machine."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from helpers import ROOT, checkpoint_dir, checkpoint_step, checkpoint_steps, run

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


def epoch_records(run_dir: Path, skip: int = 0) -> list[dict]:
    """Rank 0's per-epoch records in RUN_DIR/metrics.jsonl, after the first `skip` (earlier starts)."""
    path = Path(run_dir) / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    # Only whole lines: a reader during the run may see the last record half written.
    return [json.loads(x) for x in text[:text.rfind("\n") + 1].splitlines()[skip:]]


def rank_records(output: str) -> dict[int, list[dict]]:
    """Every rank's per-epoch records from its DEBUG log lines (shown with runtime.log_all_ranks), by rank."""
    return {r: [json.loads(x) for x in xs] for r, xs in messages(output, "epoch_metrics").items()}


def auto_precision() -> str:
    """What `train.precision: auto` resolves to on this machine (the default of every test run)."""
    from trainer.assembly import resolve_precision, this_device

    return resolve_precision("auto", *this_device())


def without_rank(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "rank"}


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
    run_dir, out = trained
    records = epoch_records(run_dir)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    ranks = rank_records(out)
    assert [without_rank(r) for r in ranks[0]] == [without_rank(r) for r in ranks[1]] == records
    assert records[-1]["loss"] < records[0]["loss"]


def test_only_rank0_writes_checkpoints_events_and_summary(trained):
    run_dir, out = trained
    pids = {int(r): int(p) for r, p in re.findall(r"rank(\d) INFO trainer.train: rank \d of 2 .* pid (\d+)", out)}
    assert sorted(pids) == [0, 1]
    for sub in ("train", "validation"):
        events = list((run_dir / "tensorboard" / sub).iterdir())
        assert len(events) == 1, events
        # Event file names end in .<hostname>.<pid>.<n>.v2: the writer's pid.
        assert events[0].name.split(".")[-3] == str(pids[0])
    summary = json.loads((run_dir / "summary.json").read_text())
    spe = summary["steps_per_epoch"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "best.json", *(f"ckpt-{n:06d}-step-{n * spe:09d}" for n in (1, 2, 3))]
    state = json.loads((checkpoint_dir(run_dir, 3 * spe) / "state.json").read_text())
    assert state["epoch"] == 3 and state["global_step"] == 3 * spe and state["steps_per_epoch"] == spe
    assert state["world_size"] == 2 and state["global_batch_size"] == 64 and state["data_seed"] == 0
    assert state["model"] == {"name": "simple_cnn", "input_shape": [8, 8, 1], "num_classes": 10}
    assert len(state["config_sha256"]) == 64
    # Owner and group only: nothing in the run directory is readable by others.
    assert all(p.stat().st_mode & 0o007 == 0 for p in [run_dir, *run_dir.rglob("*")])
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 64 and summary["epochs"] == 3
    assert summary["steps_per_epoch"] == 1437 // 64
    assert summary["images_per_sec"] > 0
    assert summary["val_accuracy"] > 0.8
    # The default train.precision, `auto`, as this machine resolves it (mixed_bfloat16 on a bfloat16 CPU).
    assert summary["precision"] == auto_precision()
    assert f"precision {auto_precision()}, " in out
    assert (run_dir / "config.yaml").is_file()
    assert not [p for p in run_dir.rglob("*") if ".tmp-" in p.name]


def test_exported_model_serves_the_evaluated_accuracy(trained):
    import tensorflow as tf

    from helpers import evaluation_predictions

    run_dir, _ = trained
    summary = json.loads((run_dir / "summary.json").read_text())
    # The evaluation path image by image: the final checkpoint's model on the validation stream.
    expected, labels, encoded = evaluation_predictions(run_dir)
    served = tf.saved_model.load(str(run_dir / "export"))
    by_bytes, by_images = [], []
    for start in range(0, len(labels), 50):
        by_bytes.append(served.signatures["serving_default"](
            image_bytes=tf.constant(encoded[start:start + 50]))["probabilities"].numpy())
        images = tf.stack([served.preprocess(e) for e in encoded[start:start + 50]])
        by_images.append(served.signatures["serving_images"](images=images)["probabilities"].numpy())
    for answers in (np.concatenate(by_bytes), np.concatenate(by_images)):
        np.testing.assert_allclose(answers, expected, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(answers.argmax(axis=1), expected.argmax(axis=1))
    assert len(labels) == summary["val_examples"]
    # The summary comes from the 2-rank evaluation (by record: one validation file); this one ran in one process.
    assert np.mean(expected.argmax(axis=1) == labels) == pytest.approx(summary["val_accuracy"], abs=1e-6)


def start_and_wait_for(argv, path: Path, timeout=300, ready=Path.exists) -> subprocess.Popen:
    """Starts `argv` and returns once `ready(path)` (by default: once `path` exists)."""
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while not (path.exists() and ready(path)):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)
    return proc


def at_step(step: int):
    """`ready` for start_and_wait_for(argv, RUN_DIR / "checkpoints"): a checkpoint at global step `step` is there."""
    return lambda checkpoints: step in checkpoint_steps(checkpoints.parent)


def test_sigterm_checkpoints_at_a_step_boundary_and_the_run_resumes_there(digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    argv = launch_argv(run_dir, digits_shards, "--set", "train.epochs=12")
    proc = start_and_wait_for(argv, run_dir / "checkpoints", ready=at_step(44))  # after epoch 2
    time.sleep(0.2)  # land inside a later epoch
    proc.send_signal(signal.SIGTERM)  # what Slurm sends before it kills a job; the launcher passes it on
    first = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, "the run finished before it could be stopped"
    # The launcher exits with the workers' code; no traceback, neither horovodrun's nor the workers'.
    assert proc.returncode == 143 and "Traceback" not in first, first[-3000:]
    stopped = messages(first, "stopped at step")
    # Both ranks stopped at the same step and exited with the documented code.
    assert sorted(stopped) == [0, 1] and stopped[0] == stopped[1]
    step = int(stopped[0][0].split()[0])
    # The launcher shows rank 0's lines without a label and the others' after `[N] `.
    assert re.search(r"^[^[].*exiting with 143", first, re.M) and re.search(r"^\[1\] .*exiting with 143", first, re.M)
    assert checkpoint_steps(run_dir)[-1] == step
    stopped_at = checkpoint_dir(run_dir, step)
    # The epoch of the last step taken is validated only when the stop landed on its last step:
    # otherwise its weights are mid-epoch, and the resumed run validates it when it completes it.
    before = epoch_records(run_dir)
    interrupted = before[-1]
    completed = step % 22 == 0
    assert interrupted["epoch"] == (step - 1) // 22 + 1 and ("val_loss" in interrupted) == completed
    state = json.loads((stopped_at / "state.json").read_text())
    assert ("validation" in state) == completed

    # Resume with the MPI controller and fp16 gradient compression this time:
    # the checkpoint does not depend on either, and the replicas must still agree.
    res = run(launch_argv(run_dir, digits_shards, "--set", "train.epochs=12", "--mpi",
                          "--set", "allreduce.fp16_compression=true"), timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert f"resumed from {stopped_at} " in out
    spe = 22
    records = epoch_records(run_dir)
    first_epoch = step // spe + 1  # the interrupted epoch is finished first, then the rest
    assert [r["epoch"] for r in rank_records(out)[1]] == list(range(first_epoch, 13))
    # Across the stop and the resume, metrics.jsonl holds every epoch once, each validated: the resumed
    # run replaced the record of the epoch the stop cut short by the completed epoch's.
    assert [r["epoch"] for r in records] == list(range(1, 13))
    assert records[:first_epoch - 1] == before[:first_epoch - 1]
    assert all("val_accuracy" in r for r in records)
    after = messages(out, "weights after training:")
    assert after[0] == after[1]
    assert checkpoint_steps(run_dir)[-1] == 12 * spe
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["val_accuracy"] > 0.95

    # A third start finds the run finished, says so, and trains nothing.
    res = run(launch_argv(run_dir, digits_shards, "--set", "train.epochs=12"), timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "already finished at epoch 12" in out
    assert "epoch_metrics" not in out
    assert epoch_records(run_dir) == records
    assert f"val_accuracy            {summary['val_accuracy']:.4f}" in out


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(digits_shards, tmp_path):
    det = ("--set", "train.epochs=4", "--set", "runtime.deterministic=true", "--set", "train.export=false")
    straight = run(launch_argv(tmp_path / "a", digits_shards, *det), timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    # The signal lands while rank 0 holds its first save (runtime.fault_slow_save_sec), so the
    # step after it carries the stop, however fast the machine: a stop in the middle of epoch 2.
    held = launch_argv(tmp_path / "b", digits_shards, *det, "--set", "runtime.fault_slow_save_sec=3")
    proc = start_and_wait_for(held, tmp_path / "b" / "checkpoints", ready=lambda ckpt: any(ckpt.glob("*.tmp-*")))
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode != 0, "the run finished before it could be stopped"
    stopped_at = checkpoint_steps(tmp_path / "b")[-1]
    assert stopped_at == 23, f"stopped at step {stopped_at}, not on the step after the held save"
    stopped_dir = checkpoint_dir(tmp_path / "b", stopped_at)
    resumed = run(launch_argv(tmp_path / "b", digits_shards, *det), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {stopped_dir} " in resumed.stdout + resumed.stderr
    a = messages(straight.stdout + straight.stderr, "weights after training:")[0]
    b = messages(resumed.stdout + resumed.stderr, "weights after training:")[0]
    assert a == b, f"stopped at step {stopped_at}: straight {a}, resumed {b}"


def test_kill_9_of_one_rank_ends_the_whole_job(digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_and_wait_for(launch_argv(run_dir, digits_shards, "--set", "train.epochs=200"), run_dir / "checkpoints",
                              ready=at_step(22))
    victim = None
    for p in psutil.process_iter(["pid", "cmdline", "environ"]):
        cmd = " ".join(p.info["cmdline"] or [])
        rank = (p.info["environ"] or {}).get("HOROVOD_RANK")
        if "trainer.train" in cmd and f"run_dir={run_dir}" in cmd and rank == "1":
            victim = p
    assert victim is not None
    before = sorted(checkpoint_steps(run_dir))
    killed_at = time.time()
    victim.kill()
    out = proc.communicate(timeout=90)[0]
    detected = time.time() - killed_at
    # Seconds, not the 30 s that rank 0 waits for the failed rank to end first: horovodrun's
    # SIGTERM, which often lands while rank 0's failed collective is still being raised, ends it.
    assert detected < 20, f"the job ended {detected:.1f} s after the kill"
    # One line on how the job ended, and the killed rank's code; no traceback of horovodrun's.
    assert proc.returncode == 137, out[-2000:]
    assert "launch: error: rank 1 was killed by SIGKILL (exit code 137); the job ended\n" in out, out[-2000:]
    # (Rank 0's failed collective is one ERROR line; its traceback is at DEBUG, which log_all_ranks shows.)
    assert not re.search(r'File ".*/horovod/runner/|Process name', out), out[-2000:]
    leftovers = [
        p for p in psutil.process_iter(["cmdline"]) if f"run_dir={run_dir}" in " ".join(p.info["cmdline"] or [])
    ]
    assert not leftovers, leftovers
    # The checkpoints written before the kill are intact and loadable.
    steps = checkpoint_steps(run_dir)
    assert steps and steps[0] >= before[0]
    res = run(launch_argv(run_dir, digits_shards, "--set", "train.epochs=1", "--set", "train.export=false"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "already finished" in res.stdout + res.stderr or "resumed from" in res.stdout + res.stderr
    print(f"dead rank detected after {detected:.1f} s")


def test_resume_at_another_world_size_and_refusal_of_another_model(digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    res = run(launch_argv(run_dir, digits_shards, "--set", "train.epochs=2", "--set", "train.export=false"))
    assert res.returncode == 0, res.stderr[-3000:]
    # np=2 -> np=1, and a smaller global batch: more steps per epoch, a lower peak learning rate.
    res = run([sys.executable, "-m", "launch", "--np", "1", "--config", "configs/digits.yaml",
               "--set", f"run_dir={run_dir}", "--set", f"data.dir={digits_shards}", "--set", "train.epochs=3",
               "--set", "data.global_batch_size=32", "--set", "train.export=false"])
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert re.search(r"checkpoint written at world size 2, resuming at 1: global batch 64 -> 32, "
                     r"per-replica batch 32 -> 32, peak learning rate 0.002 -> 0.001", out), out[-3000:]
    assert "steps per epoch 22 -> 44: continuing at the start of epoch 3 (step 88)" in out
    assert [r["epoch"] for r in epoch_records(run_dir)] == [1, 2, 3]
    assert checkpoint_steps(run_dir)[-1] == 3 * 44

    # The same run directory with another network: refused, nothing overwritten.
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    latest = checkpoint_dir(run_dir, 132)
    res = run([sys.executable, "-m", "trainer.train", "--config", "configs/digits.yaml", "--set", f"run_dir={run_dir}",
               "--set", f"data.dir={digits_shards}", "--set", "train.epochs=5", "--set", "model.name=resnet20"])
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last == (
        f"checkpoint error: checkpoint '{latest}' was written for model simple_cnn "
        "with 10 classes and input 8x8x1; this run builds model resnet20 with 10 classes and input 8x8x1"
    )
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_a_larger_global_batch_re_bases_the_step_lower_and_resumes_still_go_forward(digits_shards, tmp_path):
    from trainer.checkpoint import CheckpointManager

    run_dir = tmp_path / "run"
    ends = []
    # 1437 training images: 44 steps an epoch at global batch 32, 11 at 128 (step 4 x 11 = 44 < 176).
    for batch, epochs in ((32, 4), (128, 5), (128, 6)):
        res = run(launch_argv(run_dir, digits_shards, "--set", f"data.global_batch_size={batch}",
                              "--set", f"train.epochs={epochs}", "--set", "train.export=false"), timeout=600)
        out = res.stdout + res.stderr
        assert res.returncode == 0, out[-3000:]
        if ends:  # every restart continues from the previous run's end
            resumed = re.search(r"resumed from (\S+) \(epoch (\d+), step (\d+)\)", out)
            assert resumed and (resumed.group(1), int(resumed.group(2))) == ends[-1], out[-3000:]
        latest = CheckpointManager(str(run_dir / "checkpoints")).latest()
        ends.append((latest, json.loads((Path(latest) / "state.json").read_text())["epoch"]))
    assert [epoch for _, epoch in ends] == [4, 5, 6]
    # The global step fell from 176 to 55, yet the folder names sort in training order (what `ls` shows).
    assert [checkpoint_step(p) for p, _ in ends] == [176, 55, 66]
    names = [Path(p).name for p, _ in ends]
    assert sorted(names) == names and sorted(p.name for p in (run_dir / "checkpoints").iterdir())[-1] == names[-1]
    assert [r["epoch"] for r in epoch_records(run_dir)] == [1, 2, 3, 4, 5, 6]


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
    assert res.stderr.strip() == f"data error: data.dir='{tmp_path}/empty': has no train-*.tfrecord shards"


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


# What the runners print about failed workers, which the launcher turns into its own exit code (and a line
# when the workers' own lines do not say why): none of it may reach the console.
RUNNER_NOISE = re.compile(r"Traceback|Process name|Exit code|exit with status code|^-{20,}$|Primary job|"
                          r"mpirun (detected|noticed)|^Terminated$", re.M)


def write_torn_checkpoint(run_dir: Path) -> Path:
    """A digits checkpoint whose state.json fits the config but whose weights are torn: only workers find out."""
    torn = run_dir / "checkpoints" / "step-000000022"
    torn.mkdir(parents=True)
    (torn / "state.json").write_text(json.dumps({
        "epoch": 1, "global_step": 22, "steps_per_epoch": 22,
        "model": {"name": "simple_cnn", "input_shape": [8, 8, 1], "num_classes": 10}}))
    (torn / "model.weights.h5").write_bytes(b"torn by a crash")
    return torn


def error_lines(out: str) -> list[str]:
    """The `... error: ` lines of a job's output (config, data, checkpoint, launch), without a rank's label."""
    return [x for x in (re.sub(r"^\[\d+\] ", "", line) for line in out.splitlines()) if re.match(r"\S+ error: ", x)]


def torn_checkpoint_line(run_dir: Path, torn: Path) -> str:
    return (f"checkpoint error: no readable checkpoint in '{run_dir}/checkpoints': cannot restore checkpoint "
            f"'{torn}': ")


@pytest.mark.parametrize("controller", ["--gloo", "--mpi"])
def test_an_error_every_rank_finds_is_one_line_and_the_launcher_exits_with_its_code(digits_shards, tmp_path,
                                                                                    controller):
    run_dir = tmp_path / "run"
    torn = write_torn_checkpoint(run_dir)
    res = run(launch_argv(run_dir, digits_shards, controller, "--set", "train.epochs=2"), timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-3000:]
    # Every rank refuses it with the same line (rank 0 restores, the others get its error): shown once,
    # with the label of the rank that printed it first.
    errors = error_lines(out)
    assert len(errors) == 1 and errors[0].startswith(torn_checkpoint_line(run_dir, torn)), out[-3000:]
    assert not RUNNER_NOISE.search(out), out[-3000:]
    assert sorted(p.name for p in torn.iterdir()) == ["model.weights.h5", "state.json"]


def test_an_error_of_one_rank_is_its_line_and_its_code_and_verbose_shows_horovodrun_too(digits_shards, tmp_path):
    """A shard that only rank 1 hashes is damaged: rank 1 stops with exit 2, rank 0's next collective fails."""
    shards = tmp_path / "shards"
    shutil.copytree(digits_shards, shards)
    shard = shards / "train-00001-of-00004.tfrecord"  # rank 1's share of the hashing: shards 1 and 3
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    line = (f"[1] data error: shard '{shard}' does not match its SHA-256 in metadata.json (truncated or changed); "
            "rebuild the shards, or set data.skip_corrupt_records=true to skip its corrupt records")
    quiet = ("--set", "runtime.log_all_ranks=false")  # as by default: the failed collective's traceback is DEBUG
    res = run(launch_argv(tmp_path / "run", shards, "--set", "train.epochs=1", *quiet), timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-3000:]
    assert error_lines(out) == [line[4:]], out[-3000:]
    # Rank 0 says in one log line why it stopped too, and that the other rank's line is the reason.
    assert re.search(r"rank0 ERROR trainer.train: a collective failed: another rank ended", out), out[-3000:]
    assert not RUNNER_NOISE.search(out), out[-3000:]

    res = run(launch_argv(tmp_path / "run", shards, "--set", "train.epochs=1", *quiet, "--verbose"), timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Exit code: 2" in res.stderr and f"[1]<stderr>:{line[4:]}" in res.stderr

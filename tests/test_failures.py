"""A failed write or non-finite training stops every rank at one step, with one line and its exit code.

Full disks are real: a small tmpfs mounted for the test (the tests run as
root), unmounted after it whatever happens.
"""

import errno
import os
import re
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import checkpoint_dir, checkpoint_steps, resize_filesystem, run, small_filesystem
from launch.runner_report import GLOO_END
from test_horovod import launch_argv, messages

NO_SPACE = "No space left on device (errno 28, ENOSPC)"
# What must never reach the console from a worker: a traceback, h5py's, a crash.
CRASH = re.compile(r"Traceback|Exception ignored|HDF5-DIAG|Segmentation fault|status code 139")


def tiny_model(momentum: float = 0.0):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=momentum), loss="sparse_categorical_crossentropy",
                  jit_compile=False)
    model.optimizer.build(model.trainable_variables)
    return model


@pytest.mark.parametrize("error, line", [
    (OSError(28, "No space left on device", "/r/metrics.jsonl"), f"cannot write /r/metrics.jsonl: {NO_SPACE}"),
    (PermissionError(13, "Permission denied", "/r/config.yaml"),
     "cannot write /r/config.yaml: Permission denied (errno 13, EACCES)"),
    (OSError(122, "Disk quota exceeded", "/r/summary.json"),
     "cannot write /r/summary.json: Disk quota exceeded (errno 122, EDQUOT)"),
    # TensorFlow's writers: the file and the reason are in the message's first line.
    (tf.errors.ResourceExhaustedError(None, None, "{{function_node __wrapped__WriteSummary_device_/job:localhost/"
                                      "replica:0/task:0/device:CPU:0}} /r/tb/events.v2; No space left on device\n"
                                      "\tFailed to flush 11 events to /r/tb/events.v2"),
     f"cannot write /r/tb/events.v2: {NO_SPACE}"),
    (tf.errors.ResourceExhaustedError(None, None, "/r/export.tmp-7/variables/part-0; No space left on device "
                                      "[Op:SaveV2]"), f"cannot write /r/export.tmp-7/variables/part-0: {NO_SPACE}"),
])
def test_a_failed_write_is_one_line_naming_the_file_and_the_errno(error, line):
    from trainer.failures import describe_write_error

    assert describe_write_error(error) == line


def test_the_first_failed_write_is_recorded_and_nothing_more_is_written(tmp_path):
    from trainer.callbacks import EpochCheckpoint, MetricsFile
    from trainer.checkpoint import CheckpointManager
    from trainer.failures import RunFailures, WriteGuard
    from trainer.preemption import StopRequest

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the checkpoints folder should be")
    failures = RunFailures(StopRequest())
    metrics = tmp_path / "metrics.jsonl"
    writers = [EpochCheckpoint(CheckpointManager(str(blocker / "checkpoints")), lambda step: {"epoch": 0}, failures),
               MetricsFile(str(metrics))]
    x, y = np.zeros((16, 4), np.float32), np.zeros(16, np.int64)
    tiny_model().fit(x, y, batch_size=8, epochs=3, callbacks=[WriteGuard(failures, writers)], verbose=0)
    assert failures.write == f"cannot write {blocker / 'checkpoints'}: Not a directory (errno 20, ENOTDIR)"
    assert float(failures.request.local.numpy()) == 1.0  # the next step takes the stop to every rank
    assert not metrics.exists()  # it comes after the checkpoint: nothing is written after a failure


def test_a_failed_metrics_append_leaves_the_file_as_it_was(tmp_path):
    from trainer.callbacks import MetricsFile

    with small_filesystem(tmp_path / "fs", "8k") as fs:  # two pages
        path = fs / "metrics.jsonl"
        MetricsFile(str(path)).on_epoch_end(0, {"loss": 1.5})
        before = path.read_bytes()
        (fs / "filler").write_bytes(b"x" * 4096)  # the second page
        big = {f"metric_{i:04d}": float(i) for i in range(300)}  # 6 KB: more than the first page has left
        with pytest.raises(OSError) as e:
            MetricsFile(str(path)).on_epoch_end(1, big)
        # No half record for the resumed run to append after.
        assert path.read_bytes() == before
        assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)


SAVE = """
import sys
import keras
from trainer.checkpoint import CheckpointManager

inputs = keras.Input((256,))
model = keras.Model(inputs, keras.layers.Dense(512)(inputs))  # 0.5 MB of weights, 1 MB of Adam slots
model.compile(optimizer="adam", loss="mse", jit_compile=False)
model.optimizer.build(model.trainable_variables)
try:
    CheckpointManager(sys.argv[1]).save(model, {"epoch": 1})
except OSError as e:
    print(f"OSError errno={e.errno} filename={e.filename}")
"""


def test_a_checkpoint_on_a_full_disk_fails_with_one_error_and_prints_nothing(tmp_path):
    with small_filesystem(tmp_path / "fs", "256k") as fs:
        res = run([sys.executable, "-c", SAVE, fs / "checkpoints"], timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]  # no crash at exit either
        assert res.stdout.strip() == f"OSError errno=28 filename={fs}/checkpoints/ckpt-000001-step-000000000"
        assert not CRASH.search(res.stderr), res.stderr[-3000:]
        assert [p.name for p in (fs / "checkpoints").iterdir()] == []  # the partial folder is gone


def test_a_checkpoint_of_nonfinite_weights_or_slots_is_never_written(tmp_path):
    from trainer.checkpoint import CheckpointManager, NonFiniteState

    manager = CheckpointManager(str(tmp_path / "checkpoints"))
    model = tiny_model(momentum=0.9)
    kernel = model.layers[-1].kernel
    kernel.assign(np.where(np.eye(4, 3) > 0, np.nan, kernel.numpy()))
    with pytest.raises(NonFiniteState, match=f"^{kernel.path} is not finite$"):
        manager.save(model, {"epoch": 1})
    model = tiny_model(momentum=0.9)
    slot = [v for v in model.optimizer.variables if "momentum" in v.path][0]
    slot.assign(np.full(slot.shape, np.inf, np.float32))
    with pytest.raises(NonFiniteState, match=f"^{slot.path} is not finite$"):
        manager.save(model, {"epoch": 1})
    assert not (tmp_path / "checkpoints").exists()


def train_once(run_dir, shards, *overrides):
    """One worker without horovodrun (world size 1), from the repository root."""
    return run([sys.executable, "-m", "trainer.train", "--config", "configs/digits.yaml", "--set", f"run_dir={run_dir}",
                "--set", f"data.dir={shards}", "--set", "train.export=false", *overrides], timeout=600)


def one_line(output: str, prefix: str) -> str:
    """The one line that starts (after horovodrun's rank prefix, if any) with `prefix`; fails if not one."""
    found = [line for line in output.splitlines() if re.match(rf"^(\[\d\]<stderr>:)?{prefix}", line)]
    assert len(found) == 1, output[-3000:]
    return found[0]


def worker_codes(output: str) -> dict[int, int]:
    """The non-zero exit codes horovodrun reports for the workers, by rank.

    When one worker exits, horovodrun terminates the others; a worker that is
    exiting with a code of its own by then is reported with that code (our
    patch of its safe_shell_exec: unpatched, it read 0 or 143 for some).
    """
    ends = (GLOO_END.match(line) for line in output.splitlines())
    return {int(m.group(1)): int(m.group(2)) for m in ends if m}


def worker_crashes(output: str) -> list[str]:
    """Workers' lines (horovodrun prefixes them under --verbose) that show a traceback or a crash."""
    return [line for line in output.splitlines() if CRASH.search(line) and (
        re.match(r"^\[\d\]<std", line) or "Segmentation" in line or "status code 139" in line)]


@pytest.mark.horovod
def test_a_diverging_run_stops_every_rank_at_one_step_and_keeps_the_last_finite_checkpoint(digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    first = train_once(run_dir, digits_shards, "--set", "train.epochs=1", "--set", "train.optimizer=sgd")
    assert first.returncode == 0, first.stderr[-3000:]
    # The run goes on at 2 ranks with a learning rate 10^5 times too large: it diverges within steps.
    argv = launch_argv(run_dir, digits_shards, "--verbose", "--set", "train.epochs=3", "--set", "train.optimizer=sgd",
                       "--set", "train.base_learning_rate=10000", "--set", "train.export=false")
    res = run(argv, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    # Both ranks agreed on the step and left with exit code 3 (the launcher passes it on once
    # it reports the workers' codes; horovodrun itself exits 1).
    stops = messages(out, "stopping at step")
    assert sorted(stops) == [0, 1] and stops[0][0].split(":")[0] == stops[1][0].split(":")[0], out[-3000:]
    step = int(stops[0][0].split(":")[0])
    assert 22 < step < 66
    assert worker_codes(out) == {0: 3, 1: 3}, out[-3000:]
    line = one_line(out, "training error: ")
    assert re.search(rf"the (loss is (nan|inf)|weights are not finite \(\S+\)) at step {step}; every rank stopped "
                     rf"there \(train.stop_on_nonfinite\); newest checkpoint: {checkpoint_dir(run_dir, 22)}$",
                     line), line
    assert not worker_crashes(out), out[-3000:]
    # No checkpoint of the diverged weights: the newest is the last finite one.
    assert checkpoint_steps(run_dir) == [22]


def test_with_stop_on_nonfinite_false_training_goes_on_without_checkpoints_of_it(digits_shards, tmp_path):
    res = train_once(tmp_path / "run", digits_shards, "--set", "train.epochs=2", "--set", "train.optimizer=sgd",
                     "--set", "train.base_learning_rate=10000", "--set", "train.stop_on_nonfinite=false")
    assert res.returncode == 0, res.stderr[-3000:]
    assert [x.split()[1] for x in res.stdout.splitlines() if x.startswith("epoch ")] == ["1/2", "2/2"]
    refused = re.findall(r"checkpoint at step (\d+) not written: \S+ is not finite; training goes on", res.stderr)
    assert refused == ["22", "44"], res.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_run_that_cannot_write_at_its_start_stops_at_its_first_step(digits_shards, tmp_path):
    with small_filesystem(tmp_path / "fs", "64k") as fs:
        with open(fs / "filler", "wb", buffering=0) as f, pytest.raises(OSError) as full:
            while True:
                f.write(b"x" * 4096)
        assert full.value.errno == errno.ENOSPC
        # One page left: the run folder's claim (trainer.run_claim) fits, config.yaml does not.
        os.truncate(fs / "filler", (fs / "filler").stat().st_size - 4096)
        res = train_once(fs / "run", digits_shards, "--set", "train.epochs=1")
    assert res.returncode == 74, res.stderr[-3000:]
    line = one_line(res.stderr, "write error: ")
    assert re.fullmatch(rf"write error: cannot write {fs}/run/\S+: {re.escape(NO_SPACE)}; every rank stopped at "
                        r"step 1; newest good checkpoint: none", line), line
    assert not CRASH.search(res.stderr), res.stderr[-3000:]


@pytest.mark.horovod
def test_a_full_disk_stops_every_rank_with_one_line_and_the_run_resumes_after(digits_shards, tmp_path):
    # One digits checkpoint is 3 MB: the first fits, the second does not.
    with small_filesystem(tmp_path / "fs", "3m") as fs:
        run_dir = fs / "run"
        argv = launch_argv(run_dir, digits_shards, "--set", "train.epochs=3", "--set", "train.export=false")
        res = run([*argv, "--verbose"], timeout=600)
        out = res.stdout + res.stderr
        assert res.returncode != 0, out[-3000:]
        assert worker_codes(out) == {0: 74, 1: 74}, out[-3000:]
        assert sorted(messages(out, "stopping at step")) == [0, 1], out[-3000:]
        line = one_line(out, "write error: ")
        newest = f"newest good checkpoint: {checkpoint_dir(run_dir, 22)}"
        assert re.search(rf"write error: cannot write {run_dir}/\S+: {re.escape(NO_SPACE)}; every rank stopped at "
                         rf"step (2[3-9]|3\d|4[0-4]); {newest}$", line), line
        assert not worker_crashes(out), out[-3000:]
        assert checkpoint_steps(run_dir) == [22]

        # A stop (as on SIGTERM) whose checkpoint cannot be written says so, and is not resumable-143.
        stop = train_once(run_dir, digits_shards, "--set", "train.epochs=3",
                          "--set", "runtime.fault_stop_after_step=30")
        assert stop.returncode == 74, stop.stderr[-3000:]
        line = one_line(stop.stderr, "write error: ")
        assert line.endswith("; every rank stopped at step 30 (runtime.fault_stop_after_step: the checkpoint of that "
                             f"stop was not written); {newest}"), line
        assert "; checkpoint written" not in stop.stderr and not CRASH.search(stop.stderr)
        assert checkpoint_steps(run_dir) == [22]

        resize_filesystem(fs, "64m")  # space freed: the run resumes from the checkpoint that survived
        res = run(argv, timeout=600)
        out = res.stdout + res.stderr
        assert res.returncode == 0, out[-3000:]
        assert f"resumed from {checkpoint_dir(run_dir, 22)} (epoch 1, step 22)" in out
        assert checkpoint_steps(run_dir)[-1] == 66

"""Stops through the real horovodrun with 2 ranks: on an epoch's last step, and on one rank's SIGTERM."""

import json

import pytest

from helpers import run
from test_horovod import checkpoint_steps, epoch_records, launch_argv, messages

pytestmark = pytest.mark.horovod

SPE = 22  # digits: 1437 training examples, global batch 64


def test_a_stop_on_an_epochs_last_step_validates_that_epoch_once(digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    argv = launch_argv(run_dir, digits_shards, "--set", "train.epochs=3", "--set", "train.export=false",
                       "--set", f"runtime.fault_stop_after_step={2 * SPE}")
    first = run(argv, timeout=600)
    out = first.stdout + first.stderr
    assert first.returncode != 0, out[-3000:]
    stopped = messages(out, "stopped at step")
    assert sorted(stopped) == [0, 1], out[-3000:]
    expected = f"{2 * SPE} (runtime.fault_stop_after_step); checkpoint written"
    assert all(m[0].startswith(expected) for m in stopped.values())
    assert checkpoint_steps(run_dir) == [SPE, 2 * SPE]
    state = json.loads((run_dir / "checkpoints" / f"step-{2 * SPE:09d}" / "state.json").read_text())
    assert state["epoch"] == 2 and state["validation"]["val_accuracy"] > 0.5
    before = epoch_records(run_dir)
    assert [r["epoch"] for r in before] == [1, 2] and all("val_accuracy" in r for r in before)

    res = run(argv, timeout=600)  # the fault lies behind the resumed step: it does not fire again
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert f"resumed from {run_dir}/checkpoints/step-{2 * SPE:09d}" in out
    records = epoch_records(run_dir)
    # Every epoch exactly once, each with its validation, across the stop and the resume.
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all("val_accuracy" in r for r in records)
    assert checkpoint_steps(run_dir)[-1] == 3 * SPE

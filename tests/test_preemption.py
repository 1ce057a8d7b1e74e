"""Stops through the real horovodrun with 2 ranks: mid-epoch, on an epoch's last step, and on one rank's SIGTERM."""

import json
import math
import re
import signal
import subprocess
import time

import psutil
import pytest

from helpers import checkpoint_dir, checkpoint_steps, run
from test_horovod import at_step, epoch_records, launch_argv, messages, start_and_wait_for

pytestmark = pytest.mark.horovod

SPE = 22  # digits: 1437 training examples, global batch 64


def evaluations(output: str) -> dict[int, int]:
    """How many validations each rank ran (its `evaluated N examples` lines, shown with runtime.log_all_ranks)."""
    return {rank: len(found) for rank, found in messages(output, "evaluated").items()}


@pytest.mark.parametrize("step", [SPE + 8, 2 * SPE, 3 * SPE], ids=["mid-epoch", "inner-epoch", "last-epoch"])
def test_a_stop_and_a_resume_validate_and_record_every_epoch_once(digits_shards, tmp_path, step):
    run_dir, completed = tmp_path / "run", step % SPE == 0
    epoch = (step - 1) // SPE + 1  # the epoch of the last step taken
    argv = launch_argv(run_dir, digits_shards, "--set", "train.epochs=3", "--set", "train.export=false",
                       "--set", f"runtime.fault_stop_after_step={step}")
    first = run(argv, timeout=600)
    out = first.stdout + first.stderr
    assert first.returncode != 0, out[-3000:]
    stopped = messages(out, "stopped at step")
    assert sorted(stopped) == [0, 1], out[-3000:]
    expected = f"{step} (runtime.fault_stop_after_step); checkpoint written"
    assert all(m[0].startswith(expected) for m in stopped.values())
    assert checkpoint_steps(run_dir) == [e * SPE for e in range(1, step // SPE + 1)] + ([] if completed else [step])
    stopped_at = checkpoint_dir(run_dir, step)
    state = json.loads((stopped_at / "state.json").read_text())
    # An epoch cut short is validated by the resumed run, once it completes it; one stopped on its last step now.
    assert state["epoch"] == step // SPE and ("validation" in state) == completed
    before = epoch_records(run_dir)
    assert [r["epoch"] for r in before] == list(range(1, epoch + 1))
    assert [r["epoch"] for r in before if "val_accuracy" in r] == list(range(1, step // SPE + 1))
    assert evaluations(out) == {0: step // SPE, 1: step // SPE}

    res = run(argv, timeout=600)  # the fault lies behind the resumed step: it does not fire again
    resumed = res.stdout + res.stderr
    assert res.returncode == 0, resumed[-3000:]
    assert f"resumed from {stopped_at} " in resumed
    records = epoch_records(run_dir)
    # Every epoch exactly once, each with its validation, across the stop and the resume: the record of an
    # epoch cut short is replaced by the completed epoch's; the records of the epochs before stay as they were.
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all("val_accuracy" in r for r in records)
    assert records[:step // SPE] == before[:step // SPE]
    assert checkpoint_steps(run_dir)[-1] == 3 * SPE
    # Each epoch evaluated once, on each rank: the last one's validation, recorded in its checkpoint, is not
    # repeated by a resumed run that has nothing left to train.
    assert {r: n + evaluations(resumed).get(r, 0) for r, n in evaluations(out).items()} == {0: 3, 1: 3}
    # TensorBoard too: each epoch's training and validation scalars once.
    assert scalar_steps(run_dir / "tensorboard" / "train", "loss") == [1, 2, 3]
    assert scalar_steps(run_dir / "tensorboard" / "validation", "accuracy") == [1, 2, 3]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["val_accuracy"] == records[-1]["val_accuracy"]
    assert summary["val_examples"] == 359 and summary["val_loss"] == records[-1]["val_loss"]


def scalar_steps(log_dir, tag: str) -> list[int]:
    """The steps (epochs) at which `tag` was written, over every event file in `log_dir` (one per start)."""
    import tensorflow as tf

    return sorted(e.step for path in log_dir.iterdir() for e in tf.compat.v1.train.summary_iterator(str(path))
                  for v in e.summary.value if v.tag == tag)


def worker(launcher: psutil.Process, rank: int) -> psutil.Process:
    """The Python worker process of `rank` under the launcher (found by its HOROVOD_RANK)."""
    deadline = time.time() + 60
    while time.time() < deadline:
        found = []
        for p in launcher.children(recursive=True):
            try:
                if p.environ().get("HOROVOD_RANK") == str(rank) and "-m" in p.cmdline() and "trainer" in " ".join(
                        p.cmdline()):
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        if len(found) == 1:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no single worker of rank {rank}: {found}")


def test_sigterm_to_one_rank_stops_both_after_the_same_step(digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    argv = launch_argv(run_dir, digits_shards, "--set", "train.epochs=10", "--set", "train.export=false")
    proc = start_and_wait_for(argv, run_dir / "checkpoints", ready=at_step(2 * SPE))
    rank1 = worker(psutil.Process(proc.pid), 1)
    time.sleep(0.2)  # land inside a later epoch
    rank1.send_signal(signal.SIGTERM)  # one drained node: the launcher and rank 0 get no signal
    try:
        out = proc.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        # Ranks that stopped at different steps wait forever in mismatched collectives.
        for p in [*psutil.Process(proc.pid).children(recursive=True), proc]:
            p.kill()
        out = proc.communicate()[0]
        raise AssertionError("the ranks did not stop together:\n" + out[-3000:]) from None
    assert proc.returncode != 0, "the run finished before it could be stopped"
    stopped = messages(out, "stopped at step")
    assert sorted(stopped) == [0, 1], out[-3000:]
    step = int(stopped[0][0].split()[0])
    assert step == int(stopped[1][0].split()[0])
    assert "another rank was signalled" in stopped[0][0] and "SIGTERM" in stopped[1][0]
    assert checkpoint_steps(run_dir)[-1] == step  # rank 0 wrote it
    stopped_at = checkpoint_dir(run_dir, step)

    res = run(argv, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert f"resumed from {stopped_at} " in out
    assert [r["epoch"] for r in epoch_records(run_dir)] == list(range(1, 11))


def batch_digests(output: str) -> dict[int, dict[int, str]]:
    """Each rank's `batch_digest STEP LABELS IMAGES` lines (runtime.log_batch_digests), as {rank: {step: digests}}.

    A pipeline produces a batch or two ahead of its step: a stopped run logs
    steps it never trained, and the resumed run, reading them again, replaces them.
    """
    return {rank: {int(m.split()[0]): " ".join(m.split()[1:]) for m in found}
            for rank, found in messages(output, "batch_digest").items()}


# The augmentation recipe: RandAugment per record, mixup or cutmix per batch (soft labels). Not the crop
# and flip: a flipped digit is another glyph, and the reader's own tests cover their resume.
RECIPE = ("data.augment.randaugment_layers=2", "data.augment.randaugment_magnitude=0.5",
          "data.augment.mixup_alpha=0.2", "data.augment.cutmix_alpha=1.0")


def test_a_resumed_run_sees_the_same_batches_at_the_same_steps_with_the_augmentation_recipe(digits_shards, tmp_path):
    # Default order settings (no runtime.deterministic), every augmentation on. Stopped mid-epoch 2, then resumed.
    base = ("--set", "train.epochs=3", "--set", "train.export=false", "--set", "runtime.log_batch_digests=true",
            *(x for key in RECIPE for x in ("--set", key)))
    straight = run(launch_argv(tmp_path / "a", digits_shards, *base), timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = straight.stdout + straight.stderr
    assert "RandAugment 2 ops, magnitude 0.5, mixup 0.2 or cutmix 1 (one per batch, 1/2 each): soft labels" in out
    expected = batch_digests(out)
    # The same steps on both ranks, with other records and other draws (the labels' hashes differ too).
    assert sorted(expected) == [0, 1] and all(sorted(d) == list(range(3 * SPE)) for d in expected.values())
    assert all(expected[0][s].split()[i] != expected[1][s].split()[i] for s in range(3 * SPE) for i in (0, 1))
    # It learns on soft labels: finite loss, training accuracy (against the label of most weight) above chance.
    records = epoch_records(tmp_path / "a")
    assert all(math.isfinite(r["loss"]) for r in records) and records[-1]["loss"] < records[0]["loss"], records
    assert records[-1]["accuracy"] > 0.15 and records[-1]["val_accuracy"] > 0.5, records

    stop = SPE + 8
    argv = launch_argv(tmp_path / "b", digits_shards, *base)
    first = run([*argv, "--set", f"runtime.fault_stop_after_step={stop}"], timeout=600)
    assert first.returncode != 0 and checkpoint_steps(tmp_path / "b")[-1] == stop, first.stderr[-3000:]
    seen = batch_digests(first.stdout + first.stderr)
    resumed = run(argv, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = batch_digests(resumed.stdout + resumed.stderr)
    assert all(min(d) == stop for d in after.values())
    for rank in (0, 1):
        combined = {**seen[rank], **after[rank]}
        differ = [s for s in range(3 * SPE) if combined.get(s) != expected[rank][s]]
        assert not differ, f"rank {rank}: other batches than the uninterrupted run's at steps {differ}"


@pytest.mark.parametrize("controller", ["--gloo", "--mpi"])
def test_a_save_slower_than_horovodruns_5_s_completes_within_the_grace_and_the_run_resumes_from_it(
        digits_shards, tmp_path, controller):
    # Unpatched, horovodrun SIGKILLs its workers 5 s after it passes SIGTERM on, and mpirun 2 s after its
    # SIGTERM (the launcher stops MPI jobs with SIGUSR2, see launch.command.stop_plan): this save would be cut off.
    run_dir = tmp_path / "run"
    argv = launch_argv(run_dir, digits_shards, "--set", "train.epochs=4", "--set", "train.export=false", controller)
    # The signal lands while rank 0 holds its first save: the step after it carries the stop, whose save is held too.
    proc = start_and_wait_for([*argv, "--set", "runtime.fault_slow_save_sec=6", "--signal-grace-sec", "60"],
                              run_dir / "checkpoints", ready=lambda ckpt: any(ckpt.glob("*.tmp-*")))
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    took = time.time() - signalled
    assert proc.returncode != 0, "the run finished before it could be stopped"
    stopped = messages(out, "stopped at step")
    assert sorted(stopped) == [0, 1], out[-3000:]
    step = int(stopped[0][0].split()[0])
    assert step == SPE + 1 and step == int(stopped[1][0].split()[0]), out[-3000:]
    assert checkpoint_steps(run_dir)[-1] == step
    stopped_at = checkpoint_dir(run_dir, step)
    assert f"holding the save of {stopped_at} for 6 s" in out
    assert took > 6, f"the job ended {took:.1f} s after SIGTERM, before the save could have completed"
    assert re.search(r"^[^[].*exiting with 143", out, re.M) and re.search(r"^\[1\] .*exiting with 143", out, re.M)
    assert not list((run_dir / "checkpoints").glob("*.tmp-*"))
    if controller == "--mpi":
        return  # the checkpoint is complete; resuming from one is the same under either controller

    res = run(argv, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert f"resumed from {stopped_at} " in out
    assert [r["epoch"] for r in epoch_records(run_dir)] == [1, 2, 3, 4]


def test_a_rank_whose_collective_failed_after_the_runners_sigterm_exits_at_once():
    # horovodrun SIGTERMs the other ranks once one has ended; that SIGTERM often lands while the
    # failed collective is still being raised, and is then taken as a stop request. Waiting for a
    # second one would keep the job (and its Slurm allocation) alive for the whole grace.
    from trainer.preemption import StopRequest
    from trainer.train import yield_to_the_failed_rank

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)}
    try:
        started = time.monotonic()
        yield_to_the_failed_rank(0.5)  # no SIGTERM yet: the failed rank gets its moment
        assert time.monotonic() - started >= 0.5
        StopRequest().install()
        signal.raise_signal(signal.SIGTERM)
        started = time.monotonic()
        yield_to_the_failed_rank(30)
        assert time.monotonic() - started < 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

"""Training under a real Slurm (one node on loopback, see slurm_cluster.py): sbatch, scancel, requeue."""

import dataclasses
import json
import re
import shlex
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, checkpoint_dir, checkpoint_steps, run
from slurm_cluster import SlurmCluster
from test_horovod import (
    RUNNER_NOISE,
    epoch_records,
    error_lines,
    messages,
    rank_records,
    torn_checkpoint_line,
    write_torn_checkpoint,
)

pytestmark = [pytest.mark.horovod, pytest.mark.slurm]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def test_daemons_listen_on_loopback_only(slurm):
    # auth/none: whoever reaches slurmd's port may run anything as root.
    sockets = slurm.listening()
    assert sorted(proc.split('"')[1] for _, proc in sockets) == ["slurmctld", "slurmd"], sockets
    assert all(addr.startswith("127.0.0.1:") for addr, _ in sockets), sockets


def submit(slurm: SlurmCluster, run_dir: Path, shards: Path, *extra, refused=False) -> tuple[str, str]:
    """The job id and what `launch slurm` printed; with `refused`, its exit code and error line instead."""
    res = run([sys.executable, "-m", "launch", "slurm", "--config", "configs/digits.yaml", "--ntasks-per-node", "2",
               "--time", "10", "--partition", "debug", "--set", f"run_dir={run_dir}", "--set", f"data.dir={shards}",
               "--set", "runtime.log_all_ranks=true", "--set", "train.export=false", *extra], env=slurm.env)
    if refused:
        return str(res.returncode), res.stderr
    assert res.returncode == 0, res.stderr
    job_id = re.search(r"^submitted Slurm job (\d+) ", res.stdout, re.M).group(1)
    return job_id, res.stdout


def job_log(run_dir: Path, job_id: str) -> str:
    return "".join((run_dir / "slurm" / f"digits-{job_id}.{ext}").read_text() for ext in ("out", "err"))


def wait_for(run_dir: Path, step: int, slurm: SlurmCluster, job_id: str, timeout=300) -> None:
    """Returns once RUN_DIR holds a checkpoint at global step `step`."""
    deadline = time.monotonic() + timeout
    while step not in checkpoint_steps(run_dir):
        state = slurm.job(job_id)["JobState"]
        assert state in ("PENDING", "RUNNING"), f"job {job_id} is {state} before the checkpoint at step {step}"
        assert time.monotonic() < deadline, f"no checkpoint at step {step} in {run_dir}"
        time.sleep(0.1)


def test_sbatch_job_trains_with_two_ranks_and_completes(slurm, digits_shards, tmp_path):
    # Shell syntax in a config value stays a literal path: nothing in it is run or expanded.
    run_dir = tmp_path / "run $(touch pwned) `id` ;x' $HOME"
    started = time.monotonic()
    job_id, printed = submit(slurm, run_dir, digits_shards, "--set", "train.epochs=2")
    # A double submission: refused while the first job is queued, and while its launcher holds the run folder.
    code, line = submit(slurm, run_dir, digits_shards, "--set", "train.epochs=2", refused=True)
    assert code == "2" and re.fullmatch(rf"launch: error: run_dir .+ is in use by (Slurm job {job_id} \(\w+\), "
                                        rf"submitted with .*|pid \d+ on {slurm.host} \(Slurm job {job_id}\) .*)\n",
                                        line), line
    deadline = time.monotonic() + 300
    while not (run_dir / "claim.json").exists():  # the job's launcher has started
        assert slurm.job(job_id)["JobState"] in ("PENDING", "RUNNING") and time.monotonic() < deadline
        time.sleep(0.1)
    code, line = submit(slurm, run_dir, digits_shards, "--set", "train.epochs=2", refused=True)
    assert code == "2" and f" is in use by pid {json.loads((run_dir / 'claim.json').read_text())['pid']} on " \
        f"{slurm.host} (Slurm job {job_id}) since " in line, line
    info = slurm.wait(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"))
    log = job_log(run_dir, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    print(f"sbatch job {job_id}: submit to COMPLETED in {time.monotonic() - started:.1f} s")
    assert not list(ROOT.glob("pwned")) and not list(tmp_path.rglob("pwned"))

    assert f"log: {run_dir}/slurm/digits-{job_id}.out" in printed
    tensorboard = ["tensorboard", "--logdir", f"{run_dir}/tensorboard", "--host", "127.0.0.1"]
    assert f"watch: {shlex.join(tensorboard)}" in printed
    # horovodrun got its host list from the allocation: this node, 2 slots.
    assert f" -np 2 --gloo -H {slurm.host}:2 " in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["world_size"] == 2 and summary["val_accuracy"] > 0.5
    assert checkpoint_steps(run_dir) == [22, 44]
    for sub in ("train", "validation"):
        assert len(list((run_dir / "tensorboard" / sub).glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (run_dir / "slurm").iterdir()) == [f"digits-{job_id}.{x}" for x in ("err", "out")] \
        + ["digits.sbatch"]  # the refused submissions wrote nothing
    assert not (run_dir / "claim.json").exists()  # given back at the end
    stopped = messages(log, "weights after training:")
    assert sorted(stopped) == [0, 1] and stopped[0] == stopped[1]


EPOCHS = 8


def test_time_limit_requeue_scancel_and_resubmission_resume_from_checkpoints(slurm, digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    # Epochs to spare after each stop: an epoch of digits takes about 0.25 s at np=2, and the stops come
    # 0.3 s after a checkpoint (with 4 epochs, the scancel once came after the last one).
    epochs = ("--set", f"train.epochs={EPOCHS}")
    job_id, _ = submit(slurm, run_dir, digits_shards, *epochs)
    wait_for(run_dir, 22, slurm, job_id)
    time.sleep(0.3)  # into epoch 2

    # What Slurm does --signal-grace-sec before the time limit: SIGUSR1 to the batch shell,
    # which is the launcher. It stops the workers at a checkpoint and requeues the job.
    slurm.run("scancel", "--batch", "--signal=USR1", job_id)
    slurm.wait(job_id, ("PENDING",), timeout=120)
    log = job_log(run_dir, job_id)
    first = messages(log, "stopped at step")
    assert sorted(first) == [0, 1] and first[0] == first[1], log[-3000:]
    step1 = int(first[0][0].split()[0])
    assert checkpoint_steps(run_dir)[-1] == step1 > 22
    first_stop = checkpoint_dir(run_dir, step1)
    assert f"launch: requeued Slurm job {job_id}" in log
    # Slurm holds a requeued job for cred_expire (120 s by default, 10 s in the test cluster).
    info = slurm.wait(job_id, ("RUNNING", "COMPLETED", "FAILED", "CANCELLED"), timeout=120)
    assert info["JobState"] == "RUNNING" and info["Restarts"] == "1", job_log(run_dir, job_id)[-3000:]

    # scancel: SIGTERM to every process of the job; the workers checkpoint before KillWait ends.
    wait_for(run_dir, (step1 // 22 + 1) * 22, slurm, job_id)
    # The requeued run's launcher holds the run folder, as the run it continues: the same job, restarted once.
    claim = json.loads((run_dir / "claim.json").read_text())
    assert (claim["slurm_job"], claim["slurm_restart"], claim["slurm_cluster"]) == (job_id, 1, "hvdtest")
    time.sleep(0.3)
    slurm.run("scancel", job_id)
    info = slurm.wait(job_id, ("CANCELLED",), timeout=120)
    log = job_log(run_dir, job_id)
    assert f"resumed from {first_stop} " in log, log[-3000:]
    second = messages(log, "stopped at step")
    assert len(second[0]) == len(second[1]) == 2 and second[0] == second[1], log[-3000:]
    step2 = int(second[0][1].split()[0])
    assert checkpoint_steps(run_dir)[-1] == step2 > step1
    second_stop = checkpoint_dir(run_dir, step2)
    print(f"USR1 stopped at step {step1}, requeued; scancel stopped at step {step2}; job {info['JobState']}")

    # A new submission resumes from the scancel checkpoint, with srun starting MPI ranks this time.
    job2, _ = submit(slurm, run_dir, digits_shards, *epochs, "--srun")
    info = slurm.wait(job2, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"))
    log2 = job_log(run_dir, job2)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log2[-3000:]
    assert "srun --mpi=pmix --ntasks 2" in log2
    assert f"resumed from {second_stop} " in log2, log2[-3000:]
    # One record per epoch: the resumed job replaced those of the epochs the stops cut short.
    assert [r["epoch"] for r in epoch_records(run_dir)] == list(range(1, EPOCHS + 1))
    assert [r["epoch"] for r in rank_records(log2)[1]] == list(range(step2 // 22 + 1, EPOCHS + 1))
    assert checkpoint_steps(run_dir)[-1] == EPOCHS * 22
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == EPOCHS


def test_a_worker_error_under_srun_is_one_line_and_the_jobs_exit_code(slurm, digits_shards, tmp_path):
    """srun exits with the highest code of its tasks and prints a line per task: the launcher shows neither."""
    run_dir = tmp_path / "run"
    torn = write_torn_checkpoint(run_dir)
    job_id, _ = submit(slurm, run_dir, digits_shards, "--set", "train.epochs=2", "--srun")
    info = slurm.wait(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"))
    log = job_log(run_dir, job_id)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), log[-3000:]
    errors = error_lines(log)
    assert len(errors) == 1 and errors[0].startswith(torn_checkpoint_line(run_dir, torn)), log[-3000:]
    assert not RUNNER_NOISE.search(log) and "srun: " not in log and "slurmstepd" not in log, log[-3000:]


def test_a_claim_of_a_slurm_job_that_ended_is_stale_at_once(slurm, tmp_path, monkeypatch):
    from trainer import run_claim

    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    job = slurm.run("sbatch", "--parsable", f"--output={tmp_path}/%j.out", "--wrap", "sleep 300").stdout.strip()
    slurm.wait(job, ("RUNNING",), timeout=60)
    # Held by a process of that job on another node: its heartbeat is fresh.
    held = dataclasses.replace(run_claim.this_process(), token="0" * 16, host="node7", boot_id="other",
                               slurm_job=job, slurm_cluster="hvdtest")
    (tmp_path / "claim.json").write_text(json.dumps(dataclasses.asdict(held)))
    with pytest.raises(run_claim.RunClaimError):
        run_claim.check(str(tmp_path))
    slurm.run("scancel", job)
    slurm.wait(job, ("CANCELLED",), timeout=60)
    assert run_claim.slurm_state(job, "hvdtest") == "CANCELLED"
    run_claim.check(str(tmp_path))  # not refused
    assert run_claim.slurm_state("999999", "hvdtest") == "GONE"
    # A job id of another cluster is not this one's to judge: the heartbeat decides.
    assert run_claim.slurm_state(job, "elsewhere") is None
    (tmp_path / "claim.json").write_text(json.dumps(dataclasses.asdict(dataclasses.replace(
        held, slurm_cluster="elsewhere"))))
    with pytest.raises(run_claim.RunClaimError):
        run_claim.check(str(tmp_path))


def test_unknown_partition_is_refused_before_submitting(slurm, digits_shards, tmp_path):
    res = run([sys.executable, "-m", "launch", "slurm", "--config", "configs/digits.yaml", "--partition", "gpu",
               "--ntasks-per-node", "2", "--set", f"run_dir={tmp_path}/run", "--set", f"data.dir={digits_shards}"],
              env=slurm.env)
    assert res.returncode == 2
    assert res.stderr.strip() == "launch: error: --partition 'gpu' is not a partition of this cluster (debug)"
    assert res.stdout == "" and not (tmp_path / "run").exists()
    assert slurm.run("squeue", "-h").stdout == ""

"""Training across two real Slurm nodes on one machine (see slurm_nodes.py): one rank per node.

The batch step runs on node1; horovodrun reaches node2 over ssh (Gloo), or
mpirun starts it through Slurm (MPI), or srun starts both ranks (--srun).
Each node has its own network namespace, address and hostname, so the ranks'
traffic crosses a real (virtual) link and a dead node is a real dead node.
"""

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, checkpoint_dir, checkpoint_steps, run
from slurm_nodes import TwoNodeCluster
from test_horovod import messages

pytestmark = [pytest.mark.horovod, pytest.mark.slurm]

ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    with TwoNodeCluster(tmp_path_factory.mktemp("slurm2")) as cluster:
        yield cluster


def submit(nodes: TwoNodeCluster, run_dir: Path, shards: Path, *extra) -> str:
    res = run([sys.executable, "-m", "launch", "slurm", "--config", "configs/digits.yaml", "--nodes", "2",
               "--ntasks-per-node", "1", "--partition", "debug", "--set", f"run_dir={run_dir}",
               "--set", f"data.dir={shards}", "--set", "runtime.log_all_ranks=true", "--set", "train.export=false",
               *extra], env=nodes.env)
    assert res.returncode == 0, res.stderr
    return re.search(r"^submitted Slurm job (\d+) ", res.stdout, re.M).group(1)


def job_log(run_dir: Path, job_id: str) -> str:
    return "".join((run_dir / "slurm" / f"digits-{job_id}.{ext}").read_text() for ext in ("out", "err"))


def rank_hosts(run_dir: Path) -> list[str]:
    """The host of each rank, by rank, from the last per-rank timing table in TensorBoard."""
    import tensorflow as tf

    table = ""
    for path in sorted((run_dir / "tensorboard" / "train").glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag == "rank_timing/table":
                    table = tf.make_ndarray(value.tensor).item().decode()
    return [row.split("|")[2].strip() for row in table.splitlines()[2:]]


def assert_one_rank_per_node(run_dir: Path, log: str) -> None:
    """Rank 0 ran on node1 and rank 1 on node2, and they ended with the same weights."""
    assert rank_hosts(run_dir) == ["node1", "node2"]
    for rank in (0, 1):
        assert re.search(rf"rank {rank} of 2 \(local 0 of 1\)", log), log[-3000:]
    after = messages(log, "weights after training:")
    assert sorted(after) == [0, 1] and after[0][-1] == after[1][-1], log[-3000:]


def test_daemons_listen_only_on_the_nodes_addresses(nodes):
    sockets = nodes.listening()
    names = {re.search(r'"(\w+)"', proc).group(1) for _, proc in sockets}
    assert names == {"slurmctld", "slurmd", "sshd"}, sockets
    assert sorted(addr for addr, _ in sockets) == sorted(
        [f"{nodes.net}.1:6817", f"{nodes.net}.11:6818", f"{nodes.net}.12:6818", f"{nodes.net}.12:22"]), sockets


def test_mpi_job_across_the_nodes_completes(nodes, digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    started = time.monotonic()
    job_id = submit(nodes, run_dir, digits_shards, "--set", "train.epochs=1", "--mpi")
    info = nodes.wait(job_id, ENDED, timeout=300)
    log = job_log(run_dir, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:] + nodes.logs()
    print(f"mpi: job {job_id} on {info['NodeList']}, submit to COMPLETED in {time.monotonic() - started:.1f} s")
    assert info["NodeList"] == "node[1-2]"
    # The launcher built -H from the allocation, one slot on each node; mpirun, inside the
    # allocation, starts its daemon on node2 with srun.
    assert " -np 2 --mpi -H node1:1,node2:1 " in log, log[-3000:]
    assert_one_rank_per_node(run_dir, log)
    assert checkpoint_steps(run_dir) == [22]


EPOCHS = 400  # more than any first run gets through, however fast the machine


def test_time_limit_signal_from_slurm_checkpoints_requeues_and_completes_under_gloo(nodes, digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    # slurmctld checks time limits every 30 s and sends the warning signal at the first check
    # within grace + 30 s of the limit: with --time 2 and a 45 s grace, when the job is 45 to
    # 75 s old, mostly while it trains (it starts its ranks in 25-45 s here).
    # The job reads its config file at every start: the test shortens the restart through it.
    config = tmp_path / "digits.yaml"
    digits = (ROOT / "configs" / "digits.yaml").read_text()
    config.write_text(digits.replace("  epochs: 60\n", f"  epochs: {EPOCHS}\n"))
    accepted = (nodes.dir / "sshd-node2.out").read_text().count("Accepted publickey")
    started = time.monotonic()
    job_id = submit(nodes, run_dir, digits_shards, "--time", "2", "--signal-grace-sec", "45", "--config", config)
    stopped: dict[int, list[str]] = {}
    for restarts in (1, 2, 3):  # a signal before the first step finds nothing to save: the next run gets one
        nodes.wait(job_id, ("RUNNING",) + ENDED, timeout=60)
        info = nodes.wait(job_id, ("PENDING",) + ENDED, timeout=200)
        log = job_log(run_dir, job_id)
        assert info["JobState"] == "PENDING" and info["Restarts"] == str(restarts), log[-3000:]
        assert log.count("launch: time limit near: stopping the workers at a checkpoint") == restarts
        # (Restarts is the requeue: the launcher's own line about it may be cut off, as
        # `scontrol requeue` ends the batch step that prints it.)
        stopped = messages(log, "stopped at step")
        if stopped:
            break
    signalled = time.monotonic() - started
    # Rank 1's own line may be lost: horovodrun ends the ssh that carries its output as it stops.
    # The stop is agreed on in an allreduce, so rank 0's step is the step of both.
    assert 0 in stopped and stopped.get(1, stopped[0]) == stopped[0], log[-3000:]
    first = int(stopped[0][0].split()[0])
    assert checkpoint_steps(run_dir)[-1] == first > 0
    stopped_at = checkpoint_dir(run_dir, first)
    # The restart would get its warning as early: a longer limit, and an end one epoch after
    # the stop, let it finish soon.
    epochs = first // 22 + 1
    config.write_text(digits.replace("  epochs: 60\n", f"  epochs: {epochs}\n"))
    nodes.run("scontrol", "update", f"JobId={job_id}", "TimeLimit=10")
    info = nodes.wait(job_id, ENDED, timeout=300)
    log = job_log(run_dir, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == str(restarts), \
        log[-3000:]
    assert f"resumed from {stopped_at} " in log, log[-3000:]
    assert checkpoint_steps(run_dir)[-1] == epochs * 22
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == epochs
    # The launcher built -H from the allocation; rank 1 logged in on node2 over ssh (at least
    # once: horovodrun caches its ssh check and NIC probe for an hour).
    assert " -np 2 --gloo -H node1:1,node2:1 " in log
    assert (nodes.dir / "sshd-node2.out").read_text().count("Accepted publickey") >= accepted + 1
    assert_one_rank_per_node(run_dir, log)
    print(f"time limit: SIGUSR1 from Slurm, stopped at step {first}, ran to {epochs * 22}, {restarts} requeue(s) "
          f"after {signalled:.1f} s; COMPLETED after {time.monotonic() - started:.1f} s")


def test_dead_node_ends_the_job_and_the_checkpoint_resumes_under_srun(nodes, digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    epochs = ("--set", "train.epochs=8")
    job_id = submit(nodes, run_dir, digits_shards, *epochs)
    deadline = time.monotonic() + 300
    while 22 not in checkpoint_steps(run_dir):
        assert nodes.job(job_id)["JobState"] in ("PENDING", "RUNNING") and time.monotonic() < deadline
        time.sleep(0.1)
    # node2 dies: its slurmd and every process of the job on it, at once.
    sshd = nodes.nodes.procs[0].pid  # the harness's one sshd, on node2
    killed = time.monotonic()
    for pid in nodes.pids_in("node2"):
        if pid != sshd:
            os.kill(pid, signal.SIGKILL)
    info = nodes.wait(job_id, ENDED, timeout=60)
    ended = time.monotonic() - killed
    log = job_log(run_dir, job_id)
    assert info["JobState"] in ("FAILED", "NODE_FAIL") and info["ExitCode"] != "0:0", log[-3000:]
    print(f"dead node: job {job_id} {info['JobState']} ({info['ExitCode']}) {ended:.1f} s after the kill")
    last = checkpoint_steps(run_dir)[-1]
    latest = checkpoint_dir(run_dir, last)

    # node2 comes back; a new submission, with srun starting both ranks this time, resumes.
    nodes.restart_slurmd("node2")
    job2 = submit(nodes, run_dir, digits_shards, *epochs, "--srun")
    info = nodes.wait(job2, ENDED, timeout=400)
    log2 = job_log(run_dir, job2)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log2[-3000:]
    assert "srun --mpi=pmix --ntasks 2" in log2
    assert f"resumed from {latest} " in log2, log2[-3000:]
    assert checkpoint_steps(run_dir)[-1] == 8 * 22
    assert_one_rank_per_node(run_dir, log2)

"""One job per run folder, with real jobs: a second start on a run folder in use is refused while the first trains.

The rules and the race between starters: test_run_claim.py.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import ROOT, checkpoint_steps, run
from test_horovod import launch_argv
from trainer.run_claim_rules import parse

pytestmark = pytest.mark.horovod


def start(argv, log: Path, run_dir: Path, step: int) -> subprocess.Popen:
    """Starts a job (in a session of its own, its output in `log`); returns once it has a checkpoint at `step`."""
    with open(log, "w") as out:
        proc = subprocess.Popen([str(a) for a in argv], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, start_new_session=True)
    deadline = time.time() + 300
    while step not in checkpoint_steps(run_dir):
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    return proc


def kill_tree(proc: subprocess.Popen) -> None:
    """kill -9 of a job and every process under it (horovodrun, its workers): a node that dies."""
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in tree:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(tree, timeout=30)
    proc.wait()


def outputs(run_dir: Path) -> set[str]:
    """Every file of the run but its checkpoints (the holder goes on writing those)."""
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.parts[len(run_dir.parts)] != "checkpoints"}


def refused(res: subprocess.CompletedProcess, holder: int, prefix: str) -> str:
    claim_line = re.compile(rf"{prefix}run_dir '.*' is in use by pid {holder} on {re.escape(socket.gethostname())} "
                            r"since [-0-9: ]+; stop that job first, or use another run_dir$", re.M)
    return claim_line.findall(res.stdout + res.stderr)


def test_a_second_start_on_a_run_folder_in_use_is_refused_and_a_killed_holder_blocks_nothing(digits_shards,
                                                                                             tmp_path):
    run_dir = tmp_path / "run"
    first = start(launch_argv(run_dir, digits_shards, "--set", "train.epochs=1000", "--set", "train.export=false"),
                  tmp_path / "first.log", run_dir, 44)
    assert parse((run_dir / "claim.json").read_bytes()).pid == first.pid  # the launcher holds it for the job
    before = outputs(run_dir)
    config = (run_dir / "config.yaml").read_text(), (run_dir / "config.yaml").stat().st_mtime_ns
    other = ["--set", f"run_dir={run_dir}", "--set", f"data.dir={digits_shards}", "--set", "train.epochs=7"]

    # While the first trains: the launcher, and trainer.train without it (under a horovodrun of one's own).
    res = run([sys.executable, "-m", "launch", "--np", "2", "--config", "configs/digits.yaml", *other])
    assert res.returncode == 2 and len(refused(res, first.pid, "launch: error: ")) == 1
    assert res.stderr.count("\n") == 1, res.stderr
    horovodrun = Path(sys.executable).parent / "horovodrun"
    res = run([horovodrun, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, "-m", "trainer.train",
               "--config", "configs/digits.yaml", *other])
    assert res.returncode != 0, (res.stdout + res.stderr)[-3000:]
    assert sorted(refused(res, first.pid, r"\[[01]\]<stderr>:error: ")) == [  # rank 0's answer stops every rank
        re.search(rf"\[{r}\]<stderr>:error: .*", res.stdout + res.stderr).group(0) for r in (0, 1)]
    assert first.poll() is None, "the first job stopped"
    # None of them wrote anything: the first job's config, events and claim are the only ones.
    assert outputs(run_dir) == before
    assert ((run_dir / "config.yaml").read_text(), (run_dir / "config.yaml").stat().st_mtime_ns) == config

    kill_tree(first)  # its claim stays behind, of a process that has ended
    assert parse((run_dir / "claim.json").read_bytes()).pid == first.pid
    epoch = checkpoint_steps(run_dir)[-1] // 22 + 1
    alone = start([sys.executable, "-m", "trainer.train", "--config", "configs/digits.yaml", *other[:4],
                   "--set", "train.epochs=1000", "--set", "train.export=false"], tmp_path / "alone.log",
                  run_dir, 22 * epoch)
    assert f"taking over the stale claim of pid {first.pid} on {socket.gethostname()}: pid {first.pid} has ended" in (
        tmp_path / "alone.log").read_text()
    res = run([sys.executable, "-m", "launch", "--np", "2", "--config", "configs/digits.yaml", *other])
    assert res.returncode == 2 and len(refused(res, alone.pid, "launch: error: ")) == 1  # its rank 0 holds it

    alone.send_signal(signal.SIGTERM)  # it checkpoints, and gives the folder back
    assert alone.wait(timeout=120) == 143, (tmp_path / "alone.log").read_text()[-3000:]
    assert not [p for p in run_dir.iterdir() if p.name.startswith("claim.json")]

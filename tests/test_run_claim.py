"""The run folder's claim: its rules as data, and its files with real processes (one job per run folder)."""

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from helpers import ROOT, run
from launch.slurm import queued_job
from trainer import run_claim
from trainer.run_claim_rules import Claim, Verdict, describe, judge, parse

ME = Claim(token="a" * 16, host="node1", pid=100, pid_start=5000, boot_id="boot-1", pid_ns="pid:[1]",
           since="2026-12-04 10:00:00", heartbeat_sec=30.0, stale_sec=300.0)
HERE = dataclasses.replace(ME, token="b" * 16, pid=200, pid_start=6000)  # another process of this machine
ELSEWHERE = dataclasses.replace(HERE, host="node7", boot_id="boot-7")


@dataclass
class Known:
    """The world as `judge` may ask about it; `asked` records what it did ask."""

    start: int | None = None
    slurm: str | None = None
    age: float = 0.0
    asked: list = field(default_factory=list)

    def process_start(self, pid):
        self.asked.append(("process", pid))
        return self.start

    def slurm_state(self, job, cluster):
        self.asked.append(("slurm", job))
        return self.slurm

    def heartbeat_age(self):
        self.asked.append(("heartbeat",))
        return self.age


def in_job(claim: Claim, job="5678", restart=0) -> Claim:
    return dataclasses.replace(claim, slurm_job=job, slurm_restart=restart, slurm_cluster="c1")


@pytest.mark.parametrize("me, held, known, verdict, asked", [
    (ME, HERE, Known(start=6000), Verdict("live"), [("process", 200)]),
    (ME, HERE, Known(start=None), Verdict("stale", "pid 200 has ended"), [("process", 200)]),
    (ME, HERE, Known(start=6001), Verdict("stale", "pid 200 is another process now"), [("process", 200)]),
    # The same host name after a reboot, or in another pid namespace: not this machine's pid to look up.
    (ME, dataclasses.replace(HERE, boot_id="boot-2"), Known(age=3), Verdict("live", age=3), [("heartbeat",)]),
    (ME, dataclasses.replace(HERE, pid_ns="pid:[2]"), Known(age=3), Verdict("live", age=3), [("heartbeat",)]),
    (ME, ELSEWHERE, Known(age=299), Verdict("live", age=299), [("heartbeat",)]),
    (ME, ELSEWHERE, Known(age=301), Verdict("stale", "no heartbeat from node7 for 301 s", 301), [("heartbeat",)]),
    # Its Slurm job: still running, the heartbeat decides; ended or unknown to Slurm, stale at once.
    (ME, in_job(ELSEWHERE), Known(slurm="RUNNING", age=5), Verdict("live", age=5), [("slurm", "5678"), ("heartbeat",)]),
    (ME, in_job(ELSEWHERE), Known(slurm="COMPLETING", age=5), Verdict("live", age=5),
     [("slurm", "5678"), ("heartbeat",)]),
    (ME, in_job(ELSEWHERE), Known(slurm="COMPLETED", age=5), Verdict("stale", "Slurm job 5678 is COMPLETED"),
     [("slurm", "5678")]),
    (ME, in_job(ELSEWHERE), Known(slurm="GONE", age=5), Verdict("stale", "Slurm job 5678 is GONE"),
     [("slurm", "5678")]),
    (ME, in_job(ELSEWHERE), Known(slurm=None, age=5), Verdict("live", age=5), [("slurm", "5678"), ("heartbeat",)]),
    # A requeued job's earlier run, wherever it ran; the same run (another launcher in it) is not ours.
    (in_job(ME, restart=1), in_job(ELSEWHERE), Known(age=1), Verdict("stale", "an earlier run of this Slurm job 5678, "
                                                                     "requeued"), []),
    (in_job(ME, restart=1), in_job(HERE), Known(start=6000), Verdict("stale", "an earlier run of this Slurm job 5678, "
                                                                     "requeued"), []),
    (in_job(ME), in_job(ELSEWHERE), Known(age=1), Verdict("live", age=1), [("heartbeat",)]),
    (in_job(ME), in_job(HERE), Known(start=6000), Verdict("live"), [("process", 200)]),
    (in_job(ME, "9", 1), in_job(ELSEWHERE), Known(slurm="RUNNING", age=1), Verdict("live", age=1),
     [("slurm", "5678"), ("heartbeat",)]),
    (ME, None, Known(), Verdict("stale", "the claim file is empty or torn"), []),
])
def test_judge(me, held, known, verdict, asked):
    assert judge(me, held, known) == verdict
    assert known.asked == asked


def test_our_launchers_claim_is_ours_wherever_it_runs():
    assert judge(ME, ELSEWHERE, Known(), own_token="b" * 16) == Verdict("own")
    assert judge(ME, HERE, Known(start=6000), own_token="c" * 16) == Verdict("live")


def test_the_line_names_the_holder():
    assert describe("runs/x", in_job(HERE), Verdict("live")) == (
        "run_dir 'runs/x' is in use by pid 200 on node1 (Slurm job 5678) since 2026-12-04 10:00:00; "
        "stop that job first, or use another run_dir")
    assert describe("runs/x", ELSEWHERE, Verdict("live", age=42.4)) == (
        "run_dir 'runs/x' is in use by pid 200 on node7 since 2026-12-04 10:00:00; its last heartbeat was 42 s ago: "
        "stop that job first, or use another run_dir (if node7 is lost, its claim lapses 300 s after its last "
        "heartbeat)")


@pytest.mark.parametrize("data", [
    b"", b"{", b'{"token": "bbbbbbbbbbbbbbbb", "host": "node1"', b"[]", b"null", b'"text"',
    b'{"token": "bbbbbbbbbbbbbbbb", "host": "node1"}',  # no pid
    b'{"token": "bbbbbbbbbbbbbbbb", "host": "node1", "pid": "200"}',
    b'{"token": "../../etc/x", "host": "node1", "pid": 200}',  # the token names a file: hex only
    b'{"token": "bbbbbbbbbbbbbbbb", "host": "node1", "pid": 200, "stale_sec": NaN}',
])
def test_a_torn_or_foreign_claim_file_is_no_claim(data):
    assert parse(data) is None


def test_a_claim_survives_its_file():
    assert parse(json.dumps(dataclasses.asdict(in_job(HERE))).encode()) == in_job(HERE)


HOLDER = """
import sys
from trainer import run_claim
held = run_claim.acquire(sys.argv[1])
print(held.token, flush=True)
sys.stdin.read()  # holds the claim until the test closes stdin
held.release()
"""


def start_holder(run_dir: Path, **env) -> tuple[subprocess.Popen, Claim]:
    """A real process (not this one) that claims `run_dir` and holds it; returns it and its claim."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, **env})
    token = proc.stdout.readline().strip()
    claim = parse((run_dir / "claim.json").read_bytes())
    assert claim is not None and claim.token == token and claim.pid == proc.pid
    return proc, claim


def stop_holder(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0


def files(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}


def write_claim(run_dir: Path, claim: Claim) -> Path:
    run_dir.mkdir(exist_ok=True)
    path = run_dir / "claim.json"
    path.write_text(json.dumps(dataclasses.asdict(claim)))
    return path


def test_a_live_holder_refuses_a_second_start_which_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    holder, claim = start_holder(run_dir)
    before = files(run_dir)
    with pytest.raises(run_claim.RunClaimError) as e:
        run_claim.acquire(str(run_dir))
    assert str(e.value) == (f"run_dir '{run_dir}' is in use by pid {holder.pid} on {claim.host} since {claim.since}; "
                            "stop that job first, or use another run_dir")
    with pytest.raises(run_claim.RunClaimError):
        run_claim.check(str(run_dir))
    assert files(run_dir) == before
    # The workers of the holder's launcher know its claim by its token: theirs, and nothing written.
    assert run_claim.acquire(str(run_dir), own_token=claim.token) is None
    assert files(run_dir) == before
    stop_holder(holder)
    assert not run_dir.exists()  # the holder made the folder, wrote nothing else, and left nothing behind


@pytest.mark.parametrize("reaped", [True, False], ids=["ended", "zombie"])
def test_a_holder_killed_with_sigkill_does_not_block_the_next_start(tmp_path, caplog, reaped):
    run_dir = tmp_path / "run"
    holder, claim = start_holder(run_dir)
    holder.kill()
    if reaped:
        holder.wait()
    else:  # dead, its exit status not yet collected by its parent (this test)
        while psutil.Process(holder.pid).status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.01)
    with caplog.at_level(logging.WARNING, logger="trainer.run_claim"):
        held = run_claim.acquire(str(run_dir))
    assert held is not None and parse((run_dir / "claim.json").read_bytes()).token == held.token
    assert caplog.messages == [f"run_dir '{run_dir}': taking over the stale claim of pid {holder.pid} on {claim.host}: "
                               f"pid {holder.pid} has ended"]
    assert sorted(os.listdir(run_dir)) == ["claim.json"]  # no marker or temporary file left
    held.release()
    holder.wait()
    assert os.listdir(run_dir) == []  # the folder was there before this start: kept


def test_a_pid_reused_by_another_process_is_not_the_holder(tmp_path, caplog):
    me = run_claim.this_process()
    # This process is alive, under the claim's pid, but it started at another time than the holder.
    write_claim(tmp_path, dataclasses.replace(me, token="c" * 16, pid_start=me.pid_start - 1))
    with caplog.at_level(logging.WARNING, logger="trainer.run_claim"):
        held = run_claim.acquire(str(tmp_path))
    assert held is not None
    assert caplog.messages[0].endswith(f"pid {os.getpid()} is another process now")
    held.release()


def test_another_hosts_claim_lapses_by_the_file_servers_clock_not_ours(tmp_path, monkeypatch, caplog):
    lost = dataclasses.replace(run_claim.this_process(), token="d" * 16, host="node7", boot_id="other",
                               heartbeat_sec=1.0, stale_sec=10.0)
    path = write_claim(tmp_path, lost)
    # This machine's clock an hour ahead of the file server's changes nothing: ages come from mtimes in the folder.
    clock = time.time
    monkeypatch.setattr(time, "time", lambda: clock() + 3600)
    with pytest.raises(run_claim.RunClaimError) as e:
        run_claim.acquire(str(tmp_path))
    assert f"is in use by pid {lost.pid} on node7 since {lost.since}; its last heartbeat was 0 s ago" in str(e.value)
    assert "(if node7 is lost, its claim lapses 10 s after its last heartbeat)" in str(e.value)
    assert os.listdir(tmp_path) == ["claim.json"]
    last = path.stat().st_mtime - 11  # a node lost 11 s ago
    os.utime(path, (last, last))
    with caplog.at_level(logging.WARNING, logger="trainer.run_claim"):
        held = run_claim.acquire(str(tmp_path))
    assert held is not None and caplog.messages[0].endswith("no heartbeat from node7 for 11 s")
    held.release()


def test_the_holder_refreshes_its_heartbeat(tmp_path):
    holder, _ = start_holder(tmp_path / "run", HVD_KERAS_CLAIM_HEARTBEAT_SEC="0.2")
    path = tmp_path / "run" / "claim.json"
    first = path.stat().st_mtime_ns
    time.sleep(1.5)
    assert path.stat().st_mtime_ns - first >= 0.8e9
    assert parse(path.read_bytes()).stale_sec == pytest.approx(2.0)
    stop_holder(holder)


@pytest.mark.parametrize("data", [b"", b'{"token": "0123456789abcdef", "ho'], ids=["empty", "torn"])
def test_an_empty_or_torn_claim_file_does_not_block(tmp_path, caplog, data):
    (tmp_path / "claim.json").write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="trainer.run_claim"):
        held = run_claim.acquire(str(tmp_path))
    assert held is not None and caplog.messages[0].endswith("nobody: the claim file is empty or torn")
    held.release()
    assert os.listdir(tmp_path) == []


def test_a_requeued_slurm_jobs_earlier_run_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_CLUSTER_NAME", "c1")
    earlier = dataclasses.replace(run_claim.this_process(), token="e" * 16, host="node7", boot_id="other")
    write_claim(tmp_path, earlier)  # a fresh heartbeat: the node's end is not what frees it
    with pytest.raises(run_claim.RunClaimError) as e:  # another launcher in the same run of the job
        run_claim.acquire(str(tmp_path))
    assert f"in use by pid {earlier.pid} on node7 (Slurm job 77) since" in str(e.value)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    held = run_claim.acquire(str(tmp_path))
    assert held is not None
    held.release()


def test_a_run_dir_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(run_claim.RunClaimError) as e:
        run_claim.acquire(str(tmp_path / "file" / "run"))
    assert str(e.value) == f"run_dir '{tmp_path}/file/run': cannot claim it: Not a directory ('{tmp_path}/file/run')"


RACER = """
import logging, sys
from trainer import run_claim
taking_over = []
logging.getLogger("trainer.run_claim").addHandler(logging.Handler())
logging.getLogger("trainer.run_claim").handlers[0].emit = lambda record: taking_over.append(record)
for command in sys.stdin:
    if command.strip() != "go":
        held.release() if held else None
        print("released", flush=True)
        continue
    taking_over.clear()
    try:
        held = run_claim.acquire(sys.argv[1])
        print("won", held.token, len(taking_over), flush=True)
    except run_claim.RunClaimError as e:
        held = None
        print("refused", len(taking_over), e, flush=True)
"""


def ended_process() -> tuple[int, int]:
    """The pid and start time of a process that has ended."""
    proc = subprocess.Popen(["sleep", "60"])
    start = run_claim.process_start(proc.pid)
    proc.kill()
    proc.wait()
    return proc.pid, start


def test_starters_racing_for_a_free_or_stale_folder_leave_exactly_one_holder(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(run_dir)], cwd=ROOT, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True) for _ in range(4)]
    me = run_claim.this_process()
    dead = [dataclasses.replace(me, token=f"{i:016x}", pid=pid, pid_start=start)
            for i, (pid, start) in enumerate(ended_process() for _ in range(2))]
    lost = dataclasses.replace(me, token="f" * 16, host="node7", boot_id="other", stale_sec=10.0)
    contended = 0
    try:
        for round_ in range(80):
            # A free folder; the claim of an ended process; of a lost node (judged by its heartbeat's
            # age, which takes a write); a stale claim whose first taker died holding its marker.
            scenario = round_ % 4
            if scenario in (1, 3):
                write_claim(run_dir, dead[0])
            if scenario == 2:
                last = write_claim(run_dir, lost).stat().st_mtime - 60
                os.utime(run_dir / "claim.json", (last, last))
            if scenario == 3:
                (run_dir / f"claim.json.taken-{dead[0].token}").write_text(json.dumps(dataclasses.asdict(dead[1])))
            for r in racers:
                r.stdin.write("go\n")
                r.stdin.flush()
            # "won TOKEN TRIES" or "refused TRIES LINE", TRIES: the stale claims it went for
            answers = [r.stdout.readline().rstrip("\n").split(" ", 2) for r in racers]
            winners = [(r.pid, a[1]) for r, a in zip(racers, answers) if a[0] == "won"]
            assert len(winners) == 1, (scenario, answers)
            assert parse((run_dir / "claim.json").read_bytes()).token == winners[0][1]
            refusals = [a[2] for a in answers if a[0] == "refused"]
            assert all(line.startswith(f"run_dir '{run_dir}' is in use by pid {winners[0][0]} ") for line in refusals)
            contended += scenario > 0 and sum(int(a[2 if a[0] == "won" else 1]) for a in answers) > 1
            for r in racers:
                r.stdin.write("release\n")
                r.stdin.flush()
            assert [r.stdout.readline().strip() for r in racers] == ["released"] * 4
            assert os.listdir(run_dir) == [], scenario  # no claim, marker or temporary file left
    finally:
        for r in racers:
            r.stdin.close()
            r.wait(timeout=30)
    # How often two or more racers judged the same stale claim and went for it (not a check: a figure).
    print(f"stale rounds where several racers tried to take over: {contended} of 60")


def test_launch_and_launch_slurm_refuse_a_run_dir_in_use_before_writing(digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    holder, claim = start_holder(run_dir)
    before = files(run_dir)
    line = f"launch: error: run_dir '{run_dir}' is in use by pid {holder.pid} on {claim.host} since {claim.since}; "
    common = ["--config", "configs/digits.yaml", "--set", f"run_dir={run_dir}", "--set", f"data.dir={digits_shards}"]
    for argv in (["--np", "2", *common], ["slurm", *common, "--ntasks-per-node", "2"]):
        res = run([sys.executable, "-m", "launch", *argv])
        assert (res.returncode, res.stdout) == (2, ""), res.stderr
        assert res.stderr == line + "stop that job first, or use another run_dir\n"
        assert files(run_dir) == before  # no sbatch script, no slurm/ folder, nothing
    stop_holder(holder)


def test_a_queued_job_of_the_run_dir_is_found_in_squeues_answer():
    out = "12|RUNNING|/runs/b/slurm/digits.sbatch\n13|PENDING|/runs/a b|c/slurm/digits.sbatch\n14|RUNNING|(null)\n"
    assert queued_job(out, "/runs/a b|c") == ("13", "PENDING", "/runs/a b|c/slurm/digits.sbatch")
    assert queued_job(out, "/runs/a") is None  # a folder whose name only starts the same
    assert queued_job(out, "/runs/c") is None

"""A one-node Slurm cluster on loopback for the tests: slurmctld and slurmd from Debian's slurm-wlm.

    with SlurmCluster(tmp_path) as cluster:   # installs slurm-wlm if missing, starts, always stops
        cluster.run("sbatch", ...)

Everything (config, state, spool, logs) lives in one temporary folder; the
daemons run in the foreground as children of the test process and are stopped
by process id. Authentication is off (auth/none), so it must never listen
beyond 127.0.0.1. It needs root, as slurmd starts jobs as their users.
"""

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from emulated_nodes import stop_processes
from helpers import free_port

# What the one-node and the two-node clusters (slurm_nodes.py) share.
CONF_COMMON = """\
ClusterName=hvdtest
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
# Also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# Look at pending jobs every 2 s, not 60: a requeued job starts as soon as it may.
SchedulerParameters=sched_interval=2
StateSaveLocation={dir}/state
SlurmctldPidFile={dir}/slurmctld.pid
SlurmctldLogFile={dir}/slurmctld.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={dir}/jobcomp.txt
# Keep finished jobs in `scontrol show job` (there is no slurmdbd for sacct).
MinJobAge=3600
# Between SIGTERM and SIGKILL when a job is cancelled: the time to checkpoint.
KillWait=30
ReturnToService=2
# Each daemon binds to its own address (SlurmctldHost's, NodeAddr), not to every
# address: with auth/none, whoever reaches a port may run anything as root.
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
"""

CONF = CONF_COMMON + """\
SlurmctldHost={host}(127.0.0.1)
SlurmdSpoolDir={dir}/spool
SlurmdPidFile={dir}/slurmd.pid
SlurmdLogFile={dir}/slurmd.log
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

DAEMONS = ("slurmctld", "slurmd")


def install_if_missing() -> None:
    """Debian's slurm-wlm, as scripts/setup.sh installs it, when a daemon is missing."""
    if all(shutil.which(d) or os.path.exists(f"/usr/sbin/{d}") for d in (*DAEMONS, "sbatch")):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "slurm-wlm"], check=True, env=env, stdout=subprocess.DEVNULL)


class SlurmCluster:
    """slurmctld and one slurmd on loopback; a context manager that starts it and always stops it."""

    DAEMONS_STARTED = "slurmctld and slurmd"  # for the start-up line

    def __init__(self, workdir: Path):
        self.dir = workdir
        self.host = socket.gethostname().split(".")[0]
        self.conf = workdir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []
        self.startup_sec = 0.0

    def __enter__(self) -> "SlurmCluster":
        install_if_missing()
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        print(f"{self.DAEMONS_STARTED} ready after {self.startup_sec:.1f} s")
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        alive = [" ".join(map(str, p.args)) for p in self.procs if p.poll() is None]
        assert not alive, f"still running after stop(): {alive}"

    def start(self, timeout: float = 60) -> None:
        for sub in ("state", "spool"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(CONF.format(host=self.host, dir=self.dir, cpus=os.cpu_count(),
                                         ctld_port=free_port(), slurmd_port=free_port()))
        started = time.monotonic()
        sbin = "/usr/sbin"
        for argv in ([f"{sbin}/slurmctld", "-D", "-i"], [f"{sbin}/slurmd", "-D", "-N", self.host]):
            log = open(self.dir / f"{Path(argv[0]).name}.out", "w")
            self.procs.append(subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT))
            log.close()
        self.wait_idle(1, started, timeout)

    def wait_idle(self, nodes: int, started: float, timeout: float) -> None:
        while time.monotonic() - started < timeout:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{' '.join(p.args)} exited with {p.returncode}: {self.logs()}")
            res = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
            if res.returncode == 0 and res.stdout.split() == ["idle"] * nodes:
                self.startup_sec = time.monotonic() - started
                return
            time.sleep(0.1)
        raise RuntimeError(f"the Slurm nodes were not idle after {timeout} s: {self.logs()}")

    def listening(self) -> list[tuple[str, str]]:
        """(address:port, process) of every listening TCP socket of the daemons and their children."""
        res = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True)
        return [(line.split()[3], line.split()[-1]) for line in res.stdout.splitlines()
                if any(f"pid={p.pid}," in line for p in self.procs)]

    def logs(self) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out"):
            path = self.dir / name
            if path.exists():
                out.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(out)

    def run(self, *argv, check=True) -> subprocess.CompletedProcess:
        res = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=60)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {res.stderr.strip()}")
        return res

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        text = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(self, job_id: str, states: tuple[str, ...], timeout: float = 400) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info["JobState"] in states:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} is {info['JobState']} (reason {info.get('Reason')}, exit "
                                     f"{info.get('ExitCode')}) after {timeout} s, wanted {states}\n{self.logs()}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancels what still runs, then stops the daemons by process id (SIGKILL after 15 s)."""
        if all(p.poll() is None for p in self.procs):
            res = self.run("squeue", "-h", "-o", "%i", check=False)
            ids = res.stdout.split()
            if ids:
                self.run("scancel", *ids, check=False)
                deadline = time.monotonic() + 45
                while time.monotonic() < deadline and self.run("squeue", "-h", "-o", "%i", check=False).stdout.split():
                    time.sleep(0.2)
        stop_processes(self.procs, grace=15)

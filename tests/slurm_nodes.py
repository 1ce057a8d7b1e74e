"""A two-node Slurm cluster on one machine: each slurmd in its own network namespace.

    root namespace     bridge BRIDGE, SUBNET.1: slurmctld, and the test's sbatch/scontrol
    namespace node1    eth1 SUBNET.11, hostname node1: slurmd -N node1 (the batch step runs here)
    namespace node2    eth1 SUBNET.12, hostname node2: slurmd -N node2, and sshd on port 22

Each daemon also gets its own UTS namespace with the node's name as hostname,
so the processes of a job report node1 or node2, and its own mount namespace
where the test's hosts file is bound over /etc/hosts: the nodes find each
other by name there, and nowhere else. The file system is shared, as on a
cluster with a shared home: the venv, the data and the run directory are the
same paths on both nodes.

Nothing listens outside SUBNET (CommunicationParameters binds the daemons to
their addresses, sshd to node2's); everything is stopped by process id, then
the namespaces and links are removed. The namespaces, links, hosts file and
sshd are scripts/emulated_nodes.py's, which the network benchmark and test use too.
"""

import os
import subprocess
import time
from pathlib import Path

from emulated_nodes import EmulatedNodes
from slurm_cluster import CONF_COMMON, SlurmCluster

NODES = ("node1", "node2")

TWO_NODE_CONF = CONF_COMMON + """\
SlurmctldHost=ctl({net}.1)
SlurmdSpoolDir={dir}/spool-%n
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmdLogFile={dir}/slurmd-%n.log
# A /tmp of each node's own for what Slurm keeps there: the nodes share one /tmp, and srun's
# PMIx plugin creates the same spmix_appdir_* folder on every node of a step.
TmpFS={dir}/tmp-%n
# Declare a node dead 10 s after it stops answering (default 300 s), and check every 5 s.
SlurmdTimeout=10
NodeName=node1 NodeAddr={net}.11 CPUs={cpus} State=UNKNOWN
NodeName=node2 NodeAddr={net}.12 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class TwoNodeCluster(SlurmCluster):
    """slurmctld on the bridge, two slurmd in namespaces, sshd on node2; `ssh_bin` holds the ssh to use.

    The namespaces, links, hosts file and sshd are scripts/emulated_nodes.py's.
    """

    DAEMONS_STARTED = "slurmctld, 2 slurmd and sshd"

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.nodes = EmulatedNodes(workdir, NODES, sshd=("node2",))
        self.net, self.addr, self.ssh_bin = self.nodes.net, self.nodes.addr, self.nodes.ssh_bin

    def in_node(self, name: str, argv: list[str]) -> list[str]:
        return self.nodes.in_node(name, argv)

    def start(self, timeout: float = 60) -> None:
        for sub in ("state", *(f"{kind}-{n}" for n in NODES for kind in ("spool", "tmp"))):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(TWO_NODE_CONF.format(dir=self.dir, net=self.net, cpus=os.cpu_count(),
                                                  ctld_port=6817, slurmd_port=6818))
        self.env = self.nodes.env(self.env)
        started = time.monotonic()
        self.nodes.start()
        sbin = "/usr/sbin"
        argvs = {"slurmctld": self.in_node("ctl", [f"{sbin}/slurmctld", "-D", "-i"])}
        for name in NODES:
            argvs[f"slurmd-{name}"] = self.in_node(name, [f"{sbin}/slurmd", "-D", "-N", name])
        for label, argv in argvs.items():
            with open(self.dir / f"{label}.out", "w") as log:
                self.procs.append(subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT))
        self.labels = list(argvs)
        self.wait_idle(len(NODES), started, timeout)

    def restart_slurmd(self, name: str, timeout: float = 60) -> None:
        """A new slurmd for node `name` (after the test killed the old one), and both nodes idle again."""
        i = self.labels.index(f"slurmd-{name}")
        self.procs[i].wait(timeout=10)
        with open(self.dir / f"slurmd-{name}.out", "a") as log:
            self.procs[i] = subprocess.Popen(self.procs[i].args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.wait_idle(len(NODES), time.monotonic(), timeout)

    def logs(self) -> str:
        out = []
        for path in sorted(self.dir.glob("*.log")) + sorted(self.dir.glob("*.out")):
            out.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(out)

    def pids_in(self, name: str) -> list[int]:
        return self.nodes.pids_in(name)

    def listening(self) -> list[tuple[str, str]]:
        """The daemons' listening sockets here, and every listening socket in the nodes' namespaces."""
        return super().listening() + self.nodes.listening()

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self.nodes.stop()  # sshd, what a job left behind in a namespace (by pid), then the links

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
the namespaces and links are removed.
"""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from slurm_cluster import CONF_COMMON, SlurmCluster

NODES = ("node1", "node2")
NIC = "eth1"  # the same name in both namespaces: Horovod's common-interface probe matches by name

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


def _ip(*argv: str) -> None:
    res = subprocess.run(["ip", *argv], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(argv)}: {res.stderr.strip()}")


def free_subnet() -> str:
    """A 10.213.N /24 that no interface of this machine uses yet."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    for n in range(40 + os.getpid() % 100, 250):
        if f" 10.213.{n}." not in used:
            return f"10.213.{n}"
    raise RuntimeError("no free 10.213.N.0/24 subnet")


class TwoNodeCluster(SlurmCluster):
    """slurmctld on the bridge, two slurmd in namespaces, sshd on node2; `ssh_bin` holds the ssh to use."""

    DAEMONS_STARTED = "slurmctld, 2 slurmd and sshd"

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        tag = f"hvd{os.getpid() % 100000}"
        self.bridge = f"{tag}br"
        self.netns = {name: f"{tag}{name}" for name in NODES}
        self.net = free_subnet()
        self.addr = {"node1": f"{self.net}.11", "node2": f"{self.net}.12"}
        self.ssh_dir = workdir / "ssh"
        self.ssh_bin = self.ssh_dir / "bin"
        self._made: list[tuple[str, ...]] = []  # undo steps, newest last

    def _network(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", "del", self.bridge))
        _ip("addr", "add", f"{self.net}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        # The nodes' /etc/hosts: unshare --mount keeps the bind mount inside their mount namespaces.
        (self.dir / "hosts").write_text(f"127.0.0.1 localhost\n{self.net}.1 ctl\n"
                                        + "".join(f"{a} {n}\n" for n, a in self.addr.items()))
        for i, (name, ns) in enumerate(self.netns.items(), 1):
            _ip("netns", "add", ns)
            self._made.append(("netns", "del", ns))
            veth = f"{self.bridge[:-2]}v{i}"
            _ip("link", "add", veth, "type", "veth", "peer", "name", NIC, "netns", ns)
            self._made.append(("link", "del", veth))  # both ends, even while the namespace lingers
            _ip("link", "set", veth, "master", self.bridge)
            _ip("link", "set", veth, "up")
            _ip("-n", ns, "addr", "add", f"{self.addr[name]}/24", "dev", NIC)
            _ip("-n", ns, "link", "set", NIC, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def in_node(self, name: str, argv: list[str]) -> list[str]:
        """argv run in node `name`: its network namespace, its /etc/hosts, and its hostname.

        "ctl" (slurmctld) stays in this network namespace: with NoCtldInAddrAny
        it binds to the address its hostname resolves to, which must be the bridge's.

        Not `ip netns exec`: that mounts a sysfs of the namespace, without
        /sys/fs/cgroup, and slurmd then refuses to start. nsenter, unshare and
        sh all exec in place, so the Popen's pid is the daemon's.
        """
        net = [f"--net=/run/netns/{self.netns[name]}"] if name in self.netns else []
        return ["nsenter", *net, "unshare", "--mount", "--uts", "sh", "-c",
                'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"',
                str(self.dir / "hosts"), name, *argv]

    def _ssh(self) -> list[str]:
        d = self.ssh_dir
        (d / "bin").mkdir(parents=True)
        for key in ("host_key", "id"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
        shutil.copy(d / "id.pub", d / "authorized_keys")
        (d / "sshd_config").write_text(
            f"ListenAddress {self.addr['node2']}\nPort 22\nHostKey {d}/host_key\n"
            f"AuthorizedKeysFile {d}/authorized_keys\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            f"UsePAM no\nStrictModes no\nPidFile {d}/sshd.pid\n"
        )
        # The ssh of the jobs (first on their PATH): the test's key, its known_hosts; the host key is new to it.
        (d / "bin" / "ssh").write_text(
            f'#!/bin/sh\nexec /usr/bin/ssh -i {d}/id -o UserKnownHostsFile={d}/known_hosts '
            f'-o StrictHostKeyChecking=accept-new -o LogLevel=ERROR "$@"\n')
        (d / "bin" / "ssh").chmod(0o755)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        return self.in_node("node2", ["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")])

    def start(self, timeout: float = 60) -> None:
        for sub in ("state", *(f"{kind}-{n}" for n in NODES for kind in ("spool", "tmp"))):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(TWO_NODE_CONF.format(dir=self.dir, net=self.net, cpus=os.cpu_count(),
                                                  ctld_port=6817, slurmd_port=6818))
        self.env["PATH"] = f"{self.ssh_bin}:{os.environ['PATH']}"
        started = time.monotonic()
        self._network()
        sbin = "/usr/sbin"
        argvs = {"slurmctld": self.in_node("ctl", [f"{sbin}/slurmctld", "-D", "-i"]), "sshd": self._ssh()}
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
        res = subprocess.run(["ip", "netns", "pids", self.netns[name]], capture_output=True, text=True)
        return [int(p) for p in res.stdout.split()]

    def listening(self) -> list[tuple[str, str]]:
        """The daemons' listening sockets here, and every listening socket in the nodes' namespaces."""
        found = super().listening()
        for ns in self.netns.values():
            res = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "ss", "-Hltnp"],
                                 capture_output=True, text=True, check=True)
            found += [(line.split()[3], line.split()[-1]) for line in res.stdout.splitlines()]
        return found

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            # What a job left behind in a namespace (a worker of a killed node) goes first, by pid.
            for name in NODES:
                for pid in self.pids_in(name):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            for step in reversed(self._made):
                subprocess.run(["ip", *step], capture_output=True)

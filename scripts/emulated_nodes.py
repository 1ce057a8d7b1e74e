"""Cluster nodes emulated on one machine: network namespaces on a bridge, each with sshd, egress shaped by tc.

    root namespace     bridge BRIDGE, SUBNET.1 (a `ctl` host for daemons that stay here)
    namespace nodeK    NIC SUBNET.(10+K), hostname nodeK, sshd on SUBNET.(10+K):22,
                       egress through a tc token bucket (tbf) at the chosen rate

What runs in a node (`in_node`) also gets its own UTS namespace, with the
node's name as hostname, and its own mount namespace, where a hosts file of
the nodes is bound over /etc/hosts: the nodes find each other by name there,
and nowhere else. The file system is shared, as on a cluster with a shared
home: the venv, the data and the run directory are the same paths everywhere.

The bandwidth is a tbf on each node's NIC, inside its namespace: everything a
node sends (Gloo's ring sends on every rank) waits for tokens there, so a ring
allreduce is limited by the rate as on a real link. The kernel here has no
netem qdisc, so no delay can be added: the link's own latency is what it is
(measure it with `round_trip_seconds`), and latency stays a parameter of the
cost model.

Nothing listens outside SUBNET, traffic goes only between the namespaces made
here, everything started is stopped by process id, and every namespace and
link is removed, also when a test fails (use it as a context manager).
Used by tests/slurm_nodes.py (a two-node Slurm cluster), tests/test_network.py
and scripts/bench_network.py. Needs root.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from launch.hosts import parse_hosts

NIC = "eth1"  # one name in every namespace: Horovod's common-interface probe matches interfaces by name


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


def tbf_args(rate_bps: float) -> list[str]:
    """tc arguments of a token bucket at `rate_bps` bits/s.

    The bucket holds 1 ms of traffic, and at least 16 KiB: a real link has no
    credit to spend, and a bigger bucket lets a message that fits in it pass
    at memory speed (a 128 KiB bucket made 256 KiB allreduces at 50 Mbit/s
    run 2x faster than the rate allows). 1 ms is the least that keeps the
    timer's granularity from cutting the rate at 1 Gbit/s. tbf cuts veth's
    64 KiB GSO packets to fit the bucket. The queue holds 200 ms, so TCP's
    window, not drops, is what the bucket throttles.
    """
    burst = max(16 * 1024, int(rate_bps / 8 / 1000))
    return ["tbf", "rate", f"{int(rate_bps)}bit", "burst", str(burst), "latency", "200ms"]


def stop_processes(procs: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM to those still running (newest first), then SIGKILL to any not ended within `grace` seconds."""
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def ranks_of(hosts: str) -> int:
    """The ranks horovodrun's -H `hosts` (node1:1,node2:2) starts."""
    return sum(slots for _, slots in parse_hosts(hosts))


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


class EmulatedNodes:
    """N nodes in network namespaces; `ssh_bin` holds the ssh that reaches them (first on PATH)."""

    def __init__(self, workdir: Path, names: tuple[str, ...] = ("node1", "node2"), sshd: tuple[str, ...] | None = None):
        tag = f"en{os.getpid() % 100000}"
        self.dir = Path(workdir)
        self.bridge = f"{tag}br"
        self.names = tuple(names)
        self.netns = {name: f"{tag}n{i}" for i, name in enumerate(self.names, 1)}
        self.net = free_subnet()
        self.addr = {name: f"{self.net}.{10 + i}" for i, name in enumerate(self.names, 1)}
        self.sshd_nodes = self.names if sshd is None else tuple(sshd)
        self.ssh_dir = self.dir / "ssh"
        self.ssh_bin = self.ssh_dir / "bin"
        self.hosts = self.dir / "hosts"
        self.rate_bps: float | None = None
        self.procs: list[subprocess.Popen] = []
        self._made: list[tuple[str, ...]] = []  # undo steps, newest last

    def __enter__(self) -> "EmulatedNodes":
        if threading.current_thread() is threading.main_thread():
            # A SIGTERM (a killed benchmark, a CI timeout) unwinds through __exit__: no namespace outlives us.
            self._sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            if hasattr(self, "_sigterm"):
                signal.signal(signal.SIGTERM, self._sigterm)

    def start(self, timeout: float = 20) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._network()
        self._ssh_files()
        for name in self.sshd_nodes:
            self.popen(name, ["/usr/sbin/sshd", "-D", "-e", "-f", str(self.ssh_dir / f"sshd_config-{name}")],
                       log=self.dir / f"sshd-{name}.out")
        deadline = time.monotonic() + timeout
        for name in self.sshd_nodes:
            while "Server listening" not in (self.dir / f"sshd-{name}.out").read_text():
                if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                    raise RuntimeError(f"sshd on {name} did not start: {(self.dir / f'sshd-{name}.out').read_text()}")
                time.sleep(0.05)

    def _network(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", "del", self.bridge))
        _ip("addr", "add", f"{self.net}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        # The nodes' /etc/hosts: unshare --mount keeps the bind mount inside their mount namespaces.
        self.hosts.write_text(f"127.0.0.1 localhost\n{self.net}.1 ctl\n"
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

    def shape(self, rate_bps: float | None) -> None:
        """Every node's egress through a token bucket at `rate_bps` bits/s; None: unshaped."""
        for ns in self.netns.values():
            if rate_bps is None:
                subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", NIC, "root"], capture_output=True)
                continue
            res = subprocess.run(["tc", "-n", ns, "qdisc", "replace", "dev", NIC, "root", *tbf_args(rate_bps)],
                                 capture_output=True, text=True)
            if res.returncode:
                raise RuntimeError(f"tc on {ns}: {res.stderr.strip()}")
        self.rate_bps = rate_bps

    def qdisc(self, name: str) -> str:
        """`tc -s qdisc` of node `name`'s NIC: the bucket's settings and how much it passed."""
        return subprocess.run(["tc", "-n", self.netns[name], "-s", "qdisc", "show", "dev", NIC],
                              capture_output=True, text=True, check=True).stdout

    def _ssh_files(self) -> None:
        d = self.ssh_dir
        self.ssh_bin.mkdir(parents=True)
        for key in ("host_key", "id"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
        shutil.copy(d / "id.pub", d / "authorized_keys")
        for name in self.sshd_nodes:
            (d / f"sshd_config-{name}").write_text(
                f"ListenAddress {self.addr[name]}\nPort 22\nHostKey {d}/host_key\n"
                f"AuthorizedKeysFile {d}/authorized_keys\n"
                "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                f"UsePAM no\nStrictModes no\nPidFile {d}/sshd-{name}.pid\n")
        # The ssh of the jobs (first on their PATH): this key, this known_hosts; the host key is new to it.
        (self.ssh_bin / "ssh").write_text(
            f'#!/bin/sh\nexec /usr/bin/ssh -i {d}/id -o UserKnownHostsFile={d}/known_hosts '
            f'-o StrictHostKeyChecking=accept-new -o LogLevel=ERROR "$@"\n')
        (self.ssh_bin / "ssh").chmod(0o755)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory

    def env(self, base: dict | None = None) -> dict:
        """`base` (default os.environ) with this harness's ssh first on PATH."""
        base = dict(os.environ if base is None else base)
        return {**base, "PATH": f"{self.ssh_bin}:{base.get('PATH', os.defpath)}"}

    def in_node(self, name: str, argv: list[str]) -> list[str]:
        """argv run in node `name`: its network namespace, its /etc/hosts, and its hostname.

        A name that is not a node ("ctl") stays in this network namespace.
        Not `ip netns exec`: that mounts a sysfs of the namespace, without
        /sys/fs/cgroup, and slurmd then refuses to start. nsenter, unshare and
        sh all exec in place, so a Popen's pid is the program's.
        """
        net = [f"--net=/run/netns/{self.netns[name]}"] if name in self.netns else []
        return ["nsenter", *net, "unshare", "--mount", "--uts", "sh", "-c",
                'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"',
                str(self.hosts), name, *map(str, argv)]

    def popen(self, name: str, argv: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        """A long-running program in node `name`, output to `log`; stopped by stop()."""
        with open(log, "w") as out:
            proc = subprocess.Popen(self.in_node(name, argv), env=self.env(env), stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def run(self, name: str, argv: list[str], env: dict | None = None, timeout: float | None = None,
            cwd: str | None = None) -> subprocess.CompletedProcess:
        """argv in node `name` to its end, its output captured."""
        return subprocess.run(self.in_node(name, argv), env=self.env(env), capture_output=True, text=True,
                              timeout=timeout, cwd=cwd)

    def pids_in(self, name: str) -> list[int]:
        res = subprocess.run(["ip", "netns", "pids", self.netns[name]], capture_output=True, text=True)
        return [int(p) for p in res.stdout.split()]

    def listening(self) -> list[tuple[str, str]]:
        """(address:port, process) of every listening TCP socket in the nodes' namespaces."""
        found = []
        for ns in self.netns.values():
            res = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "ss", "-Hltnp"],
                                 capture_output=True, text=True, check=True)
            found += [(line.split()[3], line.split()[-1]) for line in res.stdout.splitlines()]
        return found

    def stop(self) -> None:
        """Stops what it started by pid (SIGKILL after 10 s), kills what is left in the namespaces, unlinks all."""
        try:
            stop_processes(self.procs, grace=10)
        finally:
            # What a job left behind in a namespace (a rank of a killed job) goes first, by pid.
            for name in self.netns:
                for pid in self.pids_in(name):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            for step in reversed(self._made):
                subprocess.run(["ip", *step], capture_output=True)
            self._made.clear()


def allreduce_times(nodes: EmulatedNodes, hosts: str, sizes: list[int], budget_seconds: float = 2.0,
                    extra: tuple[str, ...] = (), env: dict | None = None, timeout: float = 900) -> list[dict]:
    """scripts/allreduce_probe.py under horovodrun from the first node (Gloo over the nodes' NIC): one dict per size.

    `hosts` is horovodrun's -H (node1:1,node2:1); `extra` more horovodrun flags
    (--cycle-time-ms, --fusion-threshold-mb) or, after "--", probe flags (--fp16).
    """
    root = Path(__file__).resolve().parents[1]
    launcher_flags, probe_flags = (list(extra), []) if "--" not in extra else (
        list(extra[:extra.index("--")]), list(extra[extra.index("--") + 1:]))
    ranks = ranks_of(hosts)
    argv = [str(Path(sys.executable).parent / "horovodrun"), "-np", str(ranks), "-H", hosts, "--gloo",
            "--network-interfaces", NIC, *launcher_flags, sys.executable, str(root / "scripts" / "allreduce_probe.py"),
            "--sizes", ",".join(map(str, sizes)), "--budget-seconds", str(budget_seconds), *probe_flags]
    res = nodes.run(nodes.names[0], argv, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})},
                    timeout=timeout, cwd=str(root))
    if res.returncode:
        raise RuntimeError(f"allreduce probe failed ({res.returncode}): {(res.stdout + res.stderr)[-3000:]}")
    return [json.loads(line.split(":", 1)[1]) for line in res.stdout.splitlines() if line.startswith("[0]<stdout>:{")]

"""Each local rank on its own share of the host's cores (runtime.bind_cores).

Ranks on one host that may all run on any of its cores share every core: the
scheduler moves their threads between cores and runs one rank's Horovod and
Gloo threads where the other rank computes, and the ranks, which wait for each
other at every allreduce, go at the pace of whichever was held up last. Bound,
a rank's own threads take turns on its own cores. Measured in
docs/benchmarks.md#each-rank-on-its-own-cores.

Only ranks of one host that share one set of allowed cores are split: ranks
that the launcher already bound (mpirun --bind-to core, srun --cpu-bind) or
that a cgroup gave other cores keep theirs.
"""

import collections
import os
import socket

TOPOLOGY = "/sys/devices/system/cpu"


def core_order(cpus, topology: str = TOPOLOGY) -> list[int]:
    """`cpus` by socket, then physical core: a run of them holds whole cores (hyperthreads together) of one socket.

    Where sysfs does not say (a container without it), by number.
    """

    def key(cpu: int) -> tuple[int, int, int]:
        try:
            with open(f"{topology}/cpu{cpu}/topology/physical_package_id", encoding="ascii") as f:
                package = int(f.read())
            with open(f"{topology}/cpu{cpu}/topology/core_id", encoding="ascii") as f:
                core = int(f.read())
        except (OSError, ValueError):
            return (0, cpu, cpu)
        return (package, core, cpu)

    return sorted(cpus, key=key)


def _splits(cores: tuple[int, ...], ranks: int) -> bool:
    """Whether `ranks` ranks that share `cores` split them: more than one rank, and a core for each."""
    return ranks >= 2 and len(cores) >= ranks


def share(placements: list[tuple[str, tuple[int, ...]]], rank: int, order=core_order) -> set[int] | None:
    """The cores rank `rank` gets, from every rank's (host name, allowed cores); None: keep what it has.

    The ranks whose placement equals this rank's split its cores in
    contiguous runs (in rank order; the first ones get one more where they do
    not divide evenly). None when no other rank shares them, or when there
    are fewer cores than ranks to share them.
    """
    mine = placements[rank]
    peers = [r for r, p in enumerate(placements) if p == mine]
    if not _splits(mine[1], len(peers)):
        return None
    cpus = order(mine[1])
    base, extra = divmod(len(cpus), len(peers))
    i = peers.index(rank)
    start = i * base + min(i, extra)
    return set(cpus[start:start + base + (i < extra)])


def any_share(placements: list[tuple[str, tuple[int, ...]]]) -> bool:
    """Whether `share` gives any rank cores, without working out each rank's (the same answer on every rank)."""
    return any(_splits(p[1], n) for p, n in collections.Counter(placements).items())


def placement(cpu_host: bool = True) -> tuple[str, tuple[int, ...]]:
    """This process's host name and the cores it may run on; no cores for a rank that is not to be bound (GPU)."""
    return socket.gethostname(), (tuple(sorted(os.sched_getaffinity(0))) if cpu_host else ())


def _threads() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def bind_process(cpus: set[int]) -> None:
    """Every thread of this process, and so every thread they start from now on, on `cpus`."""
    done: set[int] = set()
    # Threads started while the loop runs inherit the affinity of their creator, bound or not yet:
    # go round again until no new thread has appeared.
    while todo := _threads() - done:
        for tid in todo:
            try:
                os.sched_setaffinity(tid, cpus)
            except ProcessLookupError:
                pass  # the thread ended meanwhile
        done |= todo


def process_cores() -> set[int]:
    """The cores any thread of this process may run on, read back from the kernel."""
    cores: set[int] = set()
    for tid in _threads():
        try:
            cores |= os.sched_getaffinity(tid)
        except ProcessLookupError:
            pass
    return cores


def format_cores(cores) -> str:
    """`0-3,8` for {0, 1, 2, 3, 8}."""
    runs: list[list[int]] = []
    for c in sorted(cores):
        if runs and c == runs[-1][-1] + 1:
            runs[-1].append(c)
        else:
            runs.append([c])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)

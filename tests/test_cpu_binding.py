"""runtime.bind_cores: which cores each local rank gets, and where a 2-rank job's threads run."""

import os

import pytest

from trainer.cpu_binding import any_share, core_order, format_cores, share


def by_number(cpus):
    return sorted(cpus)


def shares(placements):
    result = [share(placements, r, by_number) for r in range(len(placements))]
    assert any_share(placements) is any(result)  # the shortcut every rank takes before its own share
    return result


def test_ranks_that_share_a_hosts_cores_split_them_in_rank_order():
    assert shares([("a", (0, 1, 2, 3))] * 2) == [{0, 1}, {2, 3}]
    # Where they do not divide evenly, the first ranks get one more.
    assert shares([("a", tuple(range(8)))] * 3) == [{0, 1, 2}, {3, 4, 5}, {6, 7}]


def test_only_ranks_of_the_same_host_with_the_same_cores_count():
    assert shares([("a", (0, 1)), ("b", (0, 1)), ("a", (0, 1)), ("b", (0, 1))]) == [{0}, {0}, {1}, {1}]
    # Rank 2 got other cores (a cgroup, a launcher's binding): it keeps them, and the others split theirs.
    assert shares([("a", (0, 1, 2, 3)), ("a", (0, 1, 2, 3)), ("a", (4, 5))]) == [{0, 1}, {2, 3}, None]


@pytest.mark.parametrize("placements", [
    [("a", (0,)), ("a", (1,))],  # already bound one core each (mpirun --bind-to core)
    [("a", (0,))] * 2,  # fewer cores than ranks: nothing to split
    [("a", (0, 1))],  # one rank
    [("a", ()), ("a", ())],  # GPU ranks take part with no cores
])
def test_ranks_keep_their_cores_where_there_is_nothing_to_split(placements):
    assert shares(placements) == [None] * len(placements)


def fake_topology(root, cpus):
    for cpu, (package, core) in cpus.items():
        d = root / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "physical_package_id").write_text(f"{package}\n")
        (d / "core_id").write_text(f"{core}\n")
    return str(root)


def test_shares_are_whole_cores_of_one_socket(tmp_path):
    # Two sockets of two cores with two hyperthreads each, numbered as Linux does: the first thread of
    # every core, then the second ones.
    topology = fake_topology(tmp_path, {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1),
                                        4: (0, 0), 5: (0, 1), 6: (1, 0), 7: (1, 1)})
    order = lambda cpus: core_order(cpus, topology)  # noqa: E731
    assert order(range(8)) == [0, 4, 1, 5, 2, 6, 3, 7]
    two = [("a", tuple(range(8)))] * 2
    assert [share(two, r, order) for r in range(2)] == [{0, 1, 4, 5}, {2, 3, 6, 7}]  # a socket each
    assert [share(two * 2, r, order) for r in range(4)] == [{0, 4}, {1, 5}, {2, 6}, {3, 7}]  # a core each
    # Without sysfs: by number.
    assert core_order([3, 1, 2], str(tmp_path / "absent")) == [1, 2, 3]


def test_cores_are_written_as_ranges():
    assert format_cores({0, 1, 2, 3, 8}) == "0-3,8"
    assert format_cores({5}) == "5"
    assert format_cores(set()) == ""


WORKER = r"""
import json, os, sys
import tensorflow as tf
from trainer.distributed import DistContext

ctx = DistContext.initialize(1, 1, sys.argv[1])
# Threads started after the binding (tf.data's) as well as those before it (Horovod's, TensorFlow's pools).
total = sum(int(x) for x in tf.data.Dataset.range(100).map(lambda x: x * 2, num_parallel_calls=2).prefetch(2))
assert total == 9900
per_thread = {tuple(sorted(os.sched_getaffinity(int(t)))) for t in os.listdir("/proc/self/task")}
print("REPORT " + json.dumps({"rank": ctx.rank, "cores": ctx.cores_per_rank, "per_thread": sorted(per_thread)}),
      flush=True)
"""


@pytest.mark.horovod
@pytest.mark.parametrize("mode", ["auto", "none"])
def test_two_ranks_threads_run_on_their_own_cores(tmp_path, mode):
    from helpers import worker_reports

    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs two cores to give the two ranks one each")
    r0, r1 = worker_reports(tmp_path, WORKER, mode)
    if mode == "none":
        assert r0["per_thread"] == r1["per_thread"] == [allowed]
        assert r0["cores"] is r1["cores"] is None
        return
    # Every thread of a rank on the same cores; the two ranks' cores apart, and together all the job had.
    assert len(r0["per_thread"]) == len(r1["per_thread"]) == 1
    mine, theirs = set(r0["per_thread"][0]), set(r1["per_thread"][0])
    assert mine and theirs and not mine & theirs
    assert sorted(mine | theirs) == allowed
    assert r0["cores"] == r1["cores"] == f"0: {format_cores(mine)}; 1: {format_cores(theirs)}"

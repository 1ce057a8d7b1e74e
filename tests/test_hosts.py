"""Host lists, hostfiles and Slurm node lists to horovodrun's `-H host:slots,...`."""

import subprocess

import pytest

from launch.hosts import (
    HostError,
    allocation_hosts,
    expand_nodelist,
    format_hosts,
    parse_hostfile,
    parse_hosts,
    parse_tasks_per_node,
    valid_host,
)


def test_parse_hosts():
    assert parse_hosts("a:2,b,c-1.example:8") == [("a", 2), ("b", 1), ("c-1.example", 8)]
    assert parse_hosts(" n1:4 , n2:4 ") == [("n1", 4), ("n2", 4)]


@pytest.mark.parametrize("text, message", [
    ("a:0", "--hosts entry 'a:0' is not host[:slots] with slots >= 1"),
    ("a:00", "--hosts entry 'a:00' is not host[:slots] with slots >= 1"),
    ("a:x", "--hosts entry 'a:x' is not host[:slots] with slots >= 1"),
    ("a,,b", "--hosts entry '' is not host[:slots] with slots >= 1"),
    ("a;rm -rf x:1", "--hosts entry 'a;rm -rf x:1' is not host[:slots] with slots >= 1"),
    ("node[1-2]:2", "--hosts entry 'node[1-2]:2' is not host[:slots] with slots >= 1"),
    ("a:1,a:2", "--hosts: host 'a' is listed twice"),
    ("a:", "--hosts entry 'a:' is not host[:slots] with slots >= 1"),
    # Digits of other scripts pass str.isdigit(), and some then int(): only ASCII digits are counts.
    ("a:\u00b2", "--hosts entry 'a:\u00b2' is not host[:slots] with slots >= 1"),
    ("a:\u0662", "--hosts entry 'a:\u0662' is not host[:slots] with slots >= 1"),
])
def test_bad_host_lists(text, message):
    with pytest.raises(HostError) as e:
        parse_hosts(text)
    assert str(e.value) == message


def test_hostfile_formats_comments_and_blank_lines():
    text = """
# two GPU nodes
gpu01 slots=4
gpu02 slots=4 max_slots=8   # max_slots is not used
cpu01:2
cpu02
"""
    hosts = parse_hostfile(text, "hosts.txt")
    assert hosts == [("gpu01", 4), ("gpu02", 4), ("cpu01", 2), ("cpu02", 1)]
    assert format_hosts(hosts) == "gpu01:4,gpu02:4,cpu01:2,cpu02:1"


@pytest.mark.parametrize("text, message", [
    ("a slots=0\n", "hosts.txt line 1: slots must be >= 1, got 0"),
    ("a slots=two\n", "hosts.txt line 1: slots='two' is not a number"),
    ("a\nb 4\n", "hosts.txt line 2: '4' is not key=value (expected 'host slots=N')"),
    ("a:x\n", "hosts.txt line 1: 'a:x' is not host:slots"),
    ("a$(id) slots=1\n",
     "hosts.txt line 1: host name 'a$(id)' has characters other than letters, digits, '.', '-', '_'"),
    ("# nothing\n\n", "hosts.txt: no hosts in the file"),
    ("a slots=1\na slots=2\n", "hosts.txt: host 'a' is listed twice"),
    ("a slots=\u00b2\n", "hosts.txt line 1: slots='\u00b2' is not a number"),
    ("a slots=\u0662\n", "hosts.txt line 1: slots='\u0662' is not a number"),
    ("a:\u00b2\n", "hosts.txt line 1: 'a:\u00b2' is not host:slots"),
])
def test_bad_hostfiles(text, message):
    with pytest.raises(HostError) as e:
        parse_hostfile(text, "hosts.txt")
    assert str(e.value) == message


NODELISTS = [
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("a[1-2],b3", ["a1", "a2", "b3"]),
    ("x[008-011]", ["x008", "x009", "x010", "x011"]),
    ("n[9-11]", ["n9", "n10", "n11"]),
    ("a[01-3]", ["a01", "a02", "a03"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("gpu-a100-[1,3],login.example", ["gpu-a100-1", "gpu-a100-3", "login.example"]),
    ("single", ["single"]),
    ("a[0-0]", ["a0"]),
]


@pytest.mark.parametrize("nodelist, names", NODELISTS)
def test_expand_nodelist(nodelist, names):
    assert expand_nodelist(nodelist) == names


@pytest.mark.parametrize("nodelist, names", NODELISTS)
def test_expand_nodelist_agrees_with_scontrol(nodelist, names, tmp_path):
    # scontrol needs a configuration to start, though hostname expansion never contacts a controller.
    (tmp_path / "slurm.conf").write_text("ClusterName=x\nSlurmctldHost=localhost\nNodeName=localhost\n")
    res = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                         env={"SLURM_CONF": str(tmp_path / "slurm.conf"), "PATH": "/usr/bin:/bin"})
    assert res.stdout.split() == names


@pytest.mark.parametrize("nodelist, message", [
    ("a[2-1]", "node list 'a[2-1]': range '2-1' goes down"),
    ("a[1-3-5]", "node list 'a[1-3-5]': range '1-3-5' is not N or N-M"),
    ("a[]", "node list 'a[]': range '' is not N or N-M"),
    ("a[1", "node list 'a[1': '[' without ']'"),
    ("a]1", "node list 'a]1': ']' without '['"),
    ("a[[1]]", "node list 'a[[1]]': nested brackets"),
    ("a[x-y]", "node list 'a[x-y]': range 'x-y' is not N or N-M"),
    ("", "node list '' is empty"),
    ("a[1-\u00b2]", "node list 'a[1-\u00b2]': range '1-\u00b2' is not N or N-M"),
    ("a[\u0661]", "node list 'a[\u0661]': range '\u0661' is not N or N-M"),
    ("a[1-2]$(id)",
     "node list 'a[1-2]$(id)': host name 'a1$(id)' has characters other than letters, digits, '.', '-', '_'"),
])
def test_bad_nodelists(nodelist, message):
    with pytest.raises(HostError) as e:
        expand_nodelist(nodelist)
    assert str(e.value) == message


def test_tasks_per_node():
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert parse_tasks_per_node("4") == [4]
    with pytest.raises(HostError) as e:
        parse_tasks_per_node("2(x3")
    assert str(e.value) == "SLURM_TASKS_PER_NODE='2(x3': '2(x3' is not N or N(xM) with N >= 1"
    with pytest.raises(HostError):
        parse_tasks_per_node("\u0662")


def test_allocation_hosts_from_the_slurm_environment():
    env = {"SLURM_JOB_NODELIST": "node[01-02],big7", "SLURM_TASKS_PER_NODE": "4(x2),8"}
    assert allocation_hosts(env) == [("node01", 4), ("node02", 4), ("big7", 8)]
    # scontrol's expansion, when given, is used instead of the parser.
    assert allocation_hosts(env, lambda nl: ["x", "y", "z"]) == [("x", 4), ("y", 4), ("z", 8)]


@pytest.mark.parametrize("env, message", [
    ({}, "not inside a Slurm allocation: SLURM_JOB_NODELIST or SLURM_TASKS_PER_NODE is not set"),
    ({"SLURM_JOB_NODELIST": "a[1-3]", "SLURM_TASKS_PER_NODE": "2(x2)"},
     "SLURM_TASKS_PER_NODE='2(x2)' gives 2 nodes, SLURM_JOB_NODELIST='a[1-3]' has 3"),
])
def test_allocation_hosts_errors(env, message):
    with pytest.raises(HostError) as e:
        allocation_hosts(env)
    assert str(e.value) == message


@pytest.mark.parametrize("name, ok", [
    ("node01", True), ("gpu-1.cluster_a", True), ("10.0.0.1", True), ("::1", True), ("fe80::1", True),
    ("-oProxyCommand=x", False), ("a..b", False), ("a-", False), ("x" * 64, False), ("a\n", False),
    ("fe80::1%$(id)", False), ("a b", False), ("a;b", False), ("a`id`", False), ("a'b", False), ("", False),
])
def test_host_names_are_rfc_1123_names_or_ip_addresses(name, ok):
    assert valid_host(name) is ok


def test_names_from_scontrol_are_checked_too():
    env = {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "1(x2)"}
    with pytest.raises(HostError) as e:
        allocation_hosts(env, lambda _: ["n1", "n2;id"])
    assert str(e.value) == ("SLURM_JOB_NODELIST: host name 'n2;id' has characters other than letters, digits, "
                            "'.', '-', '_'")

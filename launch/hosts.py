"""Host lists for horovodrun `-H`: from `host:slots` lists, hostfiles and Slurm node lists.

Everything here is pure text processing; the one call out to Slurm
(`scontrol show hostnames`) is injected by the caller, so the fallback parser
and the allocation logic are tested without a cluster.
"""

import ipaddress
import re
from collections.abc import Callable, Mapping

# RFC 1123 labels (plus '_', which some clusters use), at most 253 characters.
# horovodrun pastes host names unquoted into ssh command lines, so nothing
# else may pass; a leading '-' would be read by ssh as an option.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_TASKS = re.compile(r"([0-9]+)(?:\(x([0-9]+)\))?")


class HostError(ValueError):
    """A host list, hostfile or node list that cannot be used; str(e) is a one-line message."""


Hosts = list[tuple[str, int]]


def _count(text: str) -> int | None:
    """`text` as a count of ASCII digits, or None.

    Not str.isdigit() and int() alone: they take other scripts' digits and
    superscripts too ('²' passes isdigit() and then fails int()).
    """
    return int(text) if re.fullmatch(r"[0-9]+", text) else None


def valid_host(name: str) -> bool:
    """A host name (RFC 1123) or an IPv4/IPv6 address: nothing a shell would read as more than one word."""
    if re.fullmatch(r"[0-9A-Fa-f:.]+", name):  # no IPv6 zone (`%eth0`): ipaddress lets anything through there
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            pass
    return len(name) <= 253 and _HOST.fullmatch(name) is not None


def _check_name(name: str, what: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.:\-]+", name):
        raise HostError(f"{what}: host name {name!r} has characters other than letters, digits, '.', '-', '_'")
    if not valid_host(name):
        raise HostError(f"{what}: {name!r} is not a host name (dot-separated labels of letters, digits, '-', '_', "
                        "not starting or ending with '-') or an IP address")
    return name


def parse_hosts(hosts: str) -> Hosts:
    """`h1:2,h2` to [("h1", 2), ("h2", 1)]; each host may appear once."""
    parsed: Hosts = []
    for item in hosts.split(","):
        item = item.strip()
        name, colon, slots_text = item.partition(":")
        slots = _count(slots_text) if colon else 1
        if not valid_host(name) or not slots:
            raise HostError(f"--hosts entry {item!r} is not host[:slots] with slots >= 1")
        parsed.append((name, slots))
    return _unique(parsed, "--hosts")


def parse_hostfile(text: str, path: str = "hostfile") -> Hosts:
    """Open MPI/Horovod hostfile lines, `host slots=N` (or `host:N`, or `host` for 1 slot).

    Blank lines and `#` comments are skipped; other `key=value` fields
    (max_slots) are ignored, as horovodrun has no use for them.
    """
    parsed: Hosts = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path} line {number}"
        first, *fields = line.split()
        name, colon, slots_text = first.partition(":")
        slots = _count(slots_text) if colon else None
        if colon and slots is None:
            raise HostError(f"{where}: {first!r} is not host:slots")
        for field in fields:
            key, eq, value = field.partition("=")
            if not eq:
                raise HostError(f"{where}: {field!r} is not key=value (expected 'host slots=N')")
            if key == "slots":
                slots = _count(value)
                if slots is None:
                    raise HostError(f"{where}: slots={value!r} is not a number")
        if slots is not None and slots < 1:
            raise HostError(f"{where}: slots must be >= 1, got {slots}")
        parsed.append((_check_name(name, where), 1 if slots is None else slots))
    if not parsed:
        raise HostError(f"{path}: no hosts in the file")
    return _unique(parsed, path)


def _unique(hosts: Hosts, what: str) -> Hosts:
    seen = set()
    for name, _ in hosts:
        if name in seen:
            raise HostError(f"{what}: host {name!r} is listed twice")
        seen.add(name)
    return hosts


def format_hosts(hosts: Hosts) -> str:
    """[("a", 2), ("b", 2)] to horovodrun's `a:2,b:2`."""
    return ",".join(f"{name}:{slots}" for name, slots in hosts)


def _split_top_level(text: str) -> list[str]:
    """Splits on commas outside brackets: `a[1,3],b` to [`a[1,3]`, `b`]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise HostError(f"node list {text!r}: nested brackets")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise HostError(f"node list {text!r}: ']' without '['")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise HostError(f"node list {text!r}: '[' without ']'")
    parts.append(text[start:])
    return [p for p in (s.strip() for s in parts) if p]


def _expand_range(spec: str, nodelist: str) -> list[str]:
    """`01-03,7` to ["01", "02", "03", "7"]: the width of the lower bound sets the zero padding."""
    out = []
    for item in spec.split(","):
        lo, dash, hi = item.partition("-")
        if _count(lo) is None or (dash and _count(hi) is None):
            raise HostError(f"node list {nodelist!r}: range {item!r} is not N or N-M")
        if not dash:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise HostError(f"node list {nodelist!r}: range {item!r} goes down")
        out += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed node list to host names, in Slurm's order.

    `node[01-04,07]` -> node01..node04, node07; `a[1-2],b3` -> a1, a2, b3;
    several bracket groups in one name expand as a product:
    `r[1-2]n[1-2]` -> r1n1, r1n2, r2n1, r2n2.
    """
    names: list[str] = []
    for part in _split_top_level(nodelist):
        expanded = [""]
        for m in re.finditer(r"([^\[\]]*)(?:\[([^\]]*)\])?", part):
            literal, spec = m.groups()
            if spec is not None:
                expanded = [e + literal + n for e in expanded for n in _expand_range(spec, nodelist)]
            elif literal:
                expanded = [e + literal for e in expanded]
        names += [_check_name(n, f"node list {nodelist!r}") for n in expanded]
    if not names:
        raise HostError(f"node list {nodelist!r} is empty")
    return names


def parse_tasks_per_node(text: str) -> list[int]:
    """SLURM_TASKS_PER_NODE (`2(x3),1`) to [2, 2, 2, 1]."""
    counts = []
    for item in text.split(","):
        m = _TASKS.fullmatch(item.strip())
        if not m or int(m.group(1)) < 1:
            raise HostError(f"SLURM_TASKS_PER_NODE={text!r}: {item!r} is not N or N(xM) with N >= 1")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def allocation_hosts(env: Mapping[str, str], hostnames: Callable[[str], list[str]] | None = None) -> Hosts:
    """The hosts of the Slurm allocation this process runs in, with its tasks per node as slots.

    `hostnames` expands a node list (the caller passes `scontrol show
    hostnames` where Slurm is installed); None uses expand_nodelist.
    """
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    tasks = env.get("SLURM_TASKS_PER_NODE")
    if not nodelist or not tasks:
        raise HostError("not inside a Slurm allocation: SLURM_JOB_NODELIST or SLURM_TASKS_PER_NODE is not set")
    # scontrol's expansion is checked too: it copies characters that no host name has.
    names = [_check_name(n, "SLURM_JOB_NODELIST") for n in (hostnames or expand_nodelist)(nodelist)]
    counts = parse_tasks_per_node(tasks)
    if len(counts) != len(names):
        raise HostError(f"SLURM_TASKS_PER_NODE={tasks!r} gives {len(counts)} nodes, "
                        f"SLURM_JOB_NODELIST={nodelist!r} has {len(names)}")
    return _unique(list(zip(names, counts)), "SLURM_JOB_NODELIST")

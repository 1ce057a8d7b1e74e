"""The launcher's options, in one table that every use reads.

Each `Option` is registered on argparse (`add_options`), written back to argv
for the launcher inside a Slurm job (`to_argv`), and mapped to horovodrun's
flags (`horovodrun_args`) or, when srun starts the ranks, to Horovod's
environment (`horovod_env`). An option added here therefore reaches
`python -m launch run`, `python -m launch slurm`, the sbatch script and the
workers at once; tests/test_slurm_script.py checks the round trip.

Every option's `name` is a field of launch.command.LaunchOptions. Options that
only one command has (`run`: --np, the hosts, --tensorboard; `slurm`: nodes,
time, partition ...) are defined by that command, not here.
"""

import argparse
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ELASTIC = "elastic (Gloo): workers may leave and join while training goes on"


@dataclass(frozen=True)
class Option:
    """One launcher option.

    Attributes:
      name: its argparse dest and its launch.command.LaunchOptions field.
      flag: the command-line flag.
      help: the --help text.
      type: converts the flag's value; None for a switch, which takes no
        value and sets `const`. Switches that share a name exclude each other
        (`--gloo | --mpi`).
      default: the value when the flag is not given.
      const: the value a switch sets.
      metavar: the value's name in --help.
      group: the --help section (None: the main list).
      forward: `launch slurm` takes it too and writes it into the launcher
        line of the sbatch script; False: only `launch run` has it.
      path: a file name, made absolute for the job (whose working directory
        may differ from the submitter's).
      horovodrun: horovodrun's flag for it; None: not passed to horovodrun.
      env: the HOROVOD_* variable that carries it when srun starts the ranks.
      env_scale: the value is multiplied by this for `env` (MB -> bytes).
      shell: "nic" or "path": horovodrun pastes the value unquoted into shell
        lines (ssh to remote hosts, the discovery script), so `unsafe_value`
        allows only this kind's characters; None: the value reaches no shell.
    """

    name: str
    flag: str
    help: str
    type: Callable[[str], Any] | None = None
    default: Any = None
    const: Any = True
    metavar: str | None = None
    group: str | None = None
    forward: bool = True
    path: bool = False
    horovodrun: str | None = None
    env: str | None = None
    env_scale: int = 1
    shell: str | None = None


# Our Horovod patch: the background thread starts a cycle when a tensor is enqueued instead of
# sleeping out the cycle time. Gloo only: under MPI the rank that waits for the others would poll a core.
WAKE_ENV = "HOROVOD_WAKE_ON_ENQUEUE"
# Horovod's cycle time where --cycle-time-ms is not given, by whether the cycle wakes on enqueue.
# Woken, a cycle that ends without an enqueue is a negotiation round of every rank for nothing, so
# cycles can be long: 50 ms was faster than 5 at np=2. Sleeping out its cycle (MPI), every collective
# waits half a cycle: 5 ms, itself faster than Horovod's own 1 ms (docs/benchmarks.md).
CYCLE_MS = {True: 50.0, False: 5.0}

OPTIONS = (
    Option("runner", "--srun", "start the ranks with srun (MPI through PMIx) instead of horovodrun; "
           "needs a Slurm allocation", default="horovodrun", const="srun"),
    Option("srun_mpi", "--srun-mpi", "srun --mpi plugin (default pmix)", type=str, default="pmix", metavar="PLUGIN"),
    Option("controller", "--gloo", "Gloo controller (default with horovodrun)", const="gloo"),
    Option("controller", "--mpi", "MPI controller (default with srun)", const="mpi"),
    Option("network_interface", "--network-interface", "interfaces for worker traffic, e.g. eth0 (lo: one host)",
           type=str, metavar="NIC", horovodrun="--network-interface", shell="nic"),
    Option("timeline", "--timeline", "write a Horovod timeline to this file", type=str, metavar="FILE", path=True,
           horovodrun="--timeline-filename", env="HOROVOD_TIMELINE", shell="path"),
    Option("autotune", "--autotune", "let Horovod autotune fusion and cycle time", default=False,
           horovodrun="--autotune", env="HOROVOD_AUTOTUNE"),
    Option("fusion_threshold_mb", "--fusion-threshold-mb", "Horovod tensor fusion buffer, in MB", type=int,
           metavar="MB", horovodrun="--fusion-threshold-mb", env="HOROVOD_FUSION_THRESHOLD", env_scale=1024 * 1024),
    # Not Horovod's 1 ms: CYCLE_MS above, by controller, measured faster at np=2 on a CPU host (docs/benchmarks.md).
    Option("cycle_time_ms", "--cycle-time-ms", "Horovod background cycle time (default 50 ms under Gloo, whose "
           "cycle also starts on enqueue, 5 ms under MPI; Horovod's own is 1 ms)",
           type=float, metavar="MS", horovodrun="--cycle-time-ms", env="HOROVOD_CYCLE_TIME"),
    Option("ssh_port", "--ssh-port", "ssh port of the other hosts (horovodrun reaches them over ssh)", type=int,
           metavar="PORT", forward=False, horovodrun="--ssh-port"),
    Option("ssh_identity_file", "--ssh-identity-file", "private key for ssh to the other hosts", type=str,
           metavar="KEY", forward=False, horovodrun="--ssh-identity-file", shell="path"),
    Option("ssh_strict_host_keys", "--ssh-strict-host-keys", "ssh to the other hosts only if their key is in "
           "known_hosts (horovodrun's ssh accepts any key by default)", default=False, forward=False),
    Option("stall_warning_sec", "--stall-warning-sec", "log ranks missing from a collective after this long "
           "(default 60)", type=int, default=60, metavar="SEC", horovodrun="--stall-check-warning-time-seconds",
           env="HOROVOD_STALL_CHECK_TIME_SECONDS"),
    Option("stall_shutdown_sec", "--stall-shutdown-sec", "end the job when a collective waits this long; 0 never "
           "(default 600)", type=int, default=600, metavar="SEC", horovodrun="--stall-check-shutdown-time-seconds",
           env="HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"),
    Option("signal_grace_sec", "--signal-grace-sec", "seconds the workers get to checkpoint after a stop signal "
           "before they are killed; with `launch slurm` also how long before the time limit Slurm warns "
           "(default 120)", type=int, default=120, metavar="SEC"),
    Option("verbose", "--verbose", "show every line of the workers' output (TensorFlow start-up banners included)",
           default=False),
    Option("elastic", "--elastic", "Horovod elastic mode; --np is the starting size", default=False,
           group=ELASTIC, forward=False),
    Option("min_np", "--min-np", "fewest workers to keep training with (default --np)", type=int, metavar="N",
           group=ELASTIC, forward=False),
    Option("max_np", "--max-np", "most workers to run (default --np)", type=int, metavar="N", group=ELASTIC,
           forward=False),
    Option("host_discovery_script", "--host-discovery-script", "executable printing one host:slots line per "
           "available host", type=str, metavar="FILE", group=ELASTIC, forward=False, shell="path"),
    Option("reset_limit", "--reset-limit", "end the job after this many resizes", type=int, metavar="R",
           group=ELASTIC, forward=False),
)


# Allow-lists, not deny-lists: whatever is left out (quotes, `;`, `$`, backticks,
# whitespace, newlines, globs) cannot reach the shell that horovodrun builds.
_SHELL_WORDS = {
    "nic": (re.compile(r"[A-Za-z0-9_.:-]+(,[A-Za-z0-9_.:-]+)*"),
            "interface names: letters, digits, '_', '.', ':', '-', separated by commas"),
    "path": (re.compile(r"[\w./+@%=,:-]+"),
             "a path of letters, digits and _ . / + @ % = , : - (no spaces, quotes or shell characters)"),
}


def unsafe_value(values: Any) -> str | None:
    """A one-line refusal for the first option of `values` that could inject into a shell, or None."""
    for o in OPTIONS:
        value = getattr(values, o.name, None)
        if o.shell and value is not None:
            pattern, allowed = _SHELL_WORDS[o.shell]
            if not pattern.fullmatch(value) or value.startswith("-"):
                return f"{o.flag} {value!r}: not allowed; expected {allowed}"
    return None


def defaults() -> dict[str, Any]:
    """Each option's value when its flag is not given, by name."""
    return {o.name: o.default for o in OPTIONS}


def add_config_options(p: argparse.ArgumentParser) -> None:
    """--config and --set, which every command takes."""
    p.add_argument("--config", required=True, help="YAML experiment file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")


def add_options(p: argparse.ArgumentParser, forwarded_only: bool = False) -> None:
    """Registers the table's options on `p`, in table order; only the forwarded ones for `launch slurm`."""
    groups: dict[str | None, Any] = {None: p}
    exclusive: dict[str, Any] = {}
    for o in OPTIONS:
        if forwarded_only and not o.forward:
            continue
        if o.group not in groups:
            groups[o.group] = p.add_argument_group(o.group)
        where = groups[o.group]
        if o.type is None:
            if sum(x.name == o.name for x in OPTIONS) > 1:
                if o.name not in exclusive:
                    exclusive[o.name] = where.add_mutually_exclusive_group()
                where = exclusive[o.name]
            where.add_argument(o.flag, dest=o.name, action="store_const", const=o.const, default=o.default,
                               help=o.help)
        else:
            where.add_argument(o.flag, dest=o.name, type=o.type, default=o.default, metavar=o.metavar, help=o.help)


def text(value: Any) -> str:
    """A value as a command-line word; floats without a needless `.0`, and without losing digits."""
    if isinstance(value, float) and float(f"{value:g}") == value:
        return f"{value:g}"
    return str(value)


def _given(o: Option, value: Any) -> bool:
    return value == o.const if o.type is None else value is not None


def to_argv(values: Any) -> list[str]:
    """The forwarded options of `values` (a parsed namespace) as launcher arguments, in table order.

    Every set value is written, defaults included, so that a job requeued
    after the defaults changed still runs with the values it was submitted with.
    """
    argv = []
    for o in (o for o in OPTIONS if o.forward):
        value = getattr(values, o.name)
        if not _given(o, value):
            continue
        if o.type is None:
            argv.append(o.flag)
        else:
            argv += [o.flag, os.path.abspath(value) if o.path else text(value)]
    return argv


def horovodrun_args(values: Any) -> list[str]:
    """horovodrun's flags for the options of `values` (LaunchOptions) that map to one."""
    argv = []
    for o in OPTIONS:
        value = getattr(values, o.name)
        if o.horovodrun and _given(o, value):
            argv += [o.horovodrun] if o.type is None else [o.horovodrun, text(value)]
    return argv


def horovod_env(values: Any) -> dict[str, str]:
    """Horovod's environment variables for the options of `values` (LaunchOptions) that map to one."""
    env = {}
    for o in OPTIONS:
        value = getattr(values, o.name)
        if o.env and _given(o, value):
            env[o.env] = "1" if o.type is None else text(value * o.env_scale)
    return env


def launch_values(args: argparse.Namespace) -> dict[str, Any]:
    """The table's options of a parsed `launch run` command line, as LaunchOptions fields."""
    return {o.name: getattr(args, o.name) for o in OPTIONS}

"""The sbatch script for a training run, as a pure function of the options.

`build_script(opts)` returns the script text; launch.slurm_cli checks the
cluster, writes nothing but the log folder, and submits it. Inside the
allocation the script runs `python -m launch --slurm-allocation ...`, which
takes the ranks and hosts from the allocation.

Values that come from a config or the command line never reach the shell
unquoted: `#SBATCH` lines (read by sbatch, not by the shell) take names from a
safe character set and double-quoted paths without quotes, backslashes or
line breaks, and every shell word is quoted with shlex.quote.
"""

import os
import re
import shlex
from dataclasses import dataclass

from launch.command import MAX_GRACE_SEC, LaunchError

# sbatch reads `#SBATCH` lines itself (no shell): it splits them on blanks and
# strips double quotes. Names are limited to characters that need no quoting
# (a job name also ends up in file names, so no '/'); paths are double-quoted
# and may hold anything but quotes, backslashes and control characters.
_NAME = re.compile(r"[A-Za-z0-9_.+\-]{1,128}")
_PARTITIONS = re.compile(r"[A-Za-z0-9_.+\-]+(,[A-Za-z0-9_.+\-]+)*")
_PATH_BAD = re.compile(r'["\\\x00-\x1f\x7f]')
# ASCII digits only: `\d` and int() take other scripts' digits, which sbatch does not.
_TIME = re.compile(r"(?:([0-9]+)-)?([0-9]+)(?::([0-9]+))?(?::([0-9]+))?")


@dataclass(frozen=True)
class SlurmOptions:
    """What `python -m launch slurm` was asked for.

    Attributes:
      config: the experiment YAML, as the job will open it (absolute, or
        relative to workdir).
      overrides: `key=value` strings passed on as `--set`.
      run_dir: the run directory of the config (absolute); Slurm's output and
        error files go to run_dir/slurm/.
      workdir: the job's working directory (the repository checkout).
      python: the interpreter that runs the launcher inside the job.
      nodes: nodes to allocate.
      ntasks_per_node: ranks per node (None: gpus_per_node, or 1).
      gpus_per_node: GPUs per node; one rank per GPU.
      cpus_per_task: cores per rank.
      time: time limit, in one of Slurm's formats (`MM`, `HH:MM:SS`, `D-HH:MM`).
      partition, account, qos: passed to sbatch when set.
      job_name: Slurm job name.
      setup: shell lines run first in the job (`module load ...`); written
        verbatim, they are the user's own shell.
      venv: a virtual environment activated before the launcher starts.
      signal_grace_sec: Slurm sends SIGUSR1 to the launcher this long before
        the time limit; the workers checkpoint and the job requeues itself.
      requeue: let Slurm requeue the job (preemption, node failure,
        `scontrol requeue`, or the launcher at the time limit).
      launcher_args: extra `python -m launch` options for inside the
        allocation: the forwarded options of launch.options, from `to_argv`.
    """

    config: str
    run_dir: str
    workdir: str
    python: str
    overrides: tuple[str, ...] = ()
    nodes: int = 1
    ntasks_per_node: int | None = None
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    time: str = "01:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    job_name: str = "train"
    setup: tuple[str, ...] = ()
    venv: str | None = None
    signal_grace_sec: int = 120
    requeue: bool = True
    launcher_args: tuple[str, ...] = ()


def time_limit_seconds(text: str) -> int:
    """Slurm's time formats to seconds: `M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`."""
    m = _TIME.fullmatch(text.strip())
    if not m:
        raise LaunchError(f"--time {text!r} is not a Slurm time (MM, HH:MM:SS, D-HH:MM:SS)")
    days, a, b, c = m.groups()
    if days is None:
        if c is not None:
            h, mi, s = int(a), int(b), int(c)
        else:
            h, mi, s = 0, int(a), int(b or 0)
    else:
        h, mi, s = int(a), int(b or 0), int(c or 0)
    total = int(days or 0) * 86400 + h * 3600 + mi * 60 + s
    if total <= 0:
        raise LaunchError(f"--time {text!r} must be longer than 0")
    return total


def tasks_per_node(opts: SlurmOptions) -> int:
    if opts.gpus_per_node and opts.ntasks_per_node not in (None, opts.gpus_per_node):
        raise LaunchError(
            f"--ntasks-per-node {opts.ntasks_per_node} differs from --gpus-per-node {opts.gpus_per_node} "
            "(one rank per GPU)"
        )
    return opts.ntasks_per_node or opts.gpus_per_node or 1


def _sbatch_name(flag: str, value: str) -> str:
    pattern = _PARTITIONS if flag == "--partition" else _NAME
    # fullmatch, not match with `$`: `$` also matches before a trailing newline.
    if not pattern.fullmatch(value):
        raise LaunchError(f"{flag} {value!r}: only letters, digits and _.+- are allowed")
    return value


def _slurm_path(what: str, path: str) -> str:
    """A path for an #SBATCH line, double-quoted; `%` is doubled so that sbatch does not expand it."""
    if _PATH_BAD.search(path):
        raise LaunchError(f"{what} {path!r}: a path for Slurm may not hold quotes, backslashes or control characters")
    return path.replace("%", "%%")


def validate(opts: SlurmOptions) -> None:
    """One-line LaunchError for any option that cannot work."""
    if opts.nodes < 1:
        raise LaunchError(f"--nodes must be at least 1, got {opts.nodes}")
    if opts.ntasks_per_node is not None and opts.ntasks_per_node < 1:
        raise LaunchError(f"--ntasks-per-node must be at least 1, got {opts.ntasks_per_node}")
    if opts.gpus_per_node < 0:
        raise LaunchError(f"--gpus-per-node must be >= 0, got {opts.gpus_per_node}")
    if opts.cpus_per_task < 1:
        raise LaunchError(f"--cpus-per-task must be at least 1, got {opts.cpus_per_task}")
    tasks_per_node(opts)
    limit = time_limit_seconds(opts.time)
    if not 0 < opts.signal_grace_sec <= MAX_GRACE_SEC:
        raise LaunchError(f"--signal-grace-sec must be in 1..{MAX_GRACE_SEC}, got {opts.signal_grace_sec}")
    if opts.signal_grace_sec >= limit:
        raise LaunchError(f"--signal-grace-sec {opts.signal_grace_sec} must be shorter than --time {opts.time!r}")
    for line in opts.setup:
        if "\n" in line or "\r" in line:
            raise LaunchError(f"--setup {line!r}: one line per --setup")
    for value in (opts.config, opts.workdir, opts.python, opts.venv or "", *opts.overrides, *opts.launcher_args):
        if "\n" in value or "\r" in value or "\0" in value:
            raise LaunchError(f"{value!r}: line breaks are not allowed in a job's arguments")


def build_script(opts: SlurmOptions) -> str:
    """The sbatch script text."""
    validate(opts)
    log_dir = opts.run_dir.rstrip("/") + "/slurm"
    name = _sbatch_name("--job-name", opts.job_name)
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --nodes={opts.nodes}",
        f"#SBATCH --ntasks-per-node={tasks_per_node(opts)}",
    ]
    if opts.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={opts.gpus_per_node}")
    lines += [f"#SBATCH --cpus-per-task={opts.cpus_per_task}", f"#SBATCH --time={opts.time.strip()}"]
    for flag, value in (("partition", opts.partition), ("account", opts.account), ("qos", opts.qos)):
        if value:
            lines.append(f"#SBATCH --{flag}={_sbatch_name('--' + flag, value)}")
    lines += [
        f'#SBATCH --chdir="{_slurm_path("working directory", opts.workdir)}"',
        # %x-%j: job name and id, one pair of files per job; append, so that a
        # requeued job adds to the log of its earlier runs instead of truncating it.
        f'#SBATCH --output="{_slurm_path("run_dir", log_dir)}/%x-%j.out"',
        f'#SBATCH --error="{_slurm_path("run_dir", log_dir)}/%x-%j.err"',
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue" if opts.requeue else "#SBATCH --no-requeue",
        # B: the signal goes to the batch shell only, which is the launcher
        # after `exec`; it stops the workers at a checkpoint and requeues.
        f"#SBATCH --signal=B:USR1@{opts.signal_grace_sec}",
        "set -euo pipefail",
        'echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST at $(date -Is)"',
    ]
    lines += list(opts.setup)
    if opts.venv:
        lines.append(f"source {shlex.quote(opts.venv.rstrip('/') + '/bin/activate')}")
    launcher = [opts.python, "-m", "launch", "--slurm-allocation", *opts.launcher_args, "--config", opts.config]
    for item in opts.overrides:
        launcher += ["--set", item]
    if opts.requeue:
        launcher.append("--requeue-on-timeout")
    # exec: the launcher becomes the batch shell, so it receives Slurm's B: signal.
    lines.append("exec " + shlex.join(launcher))
    return "\n".join(lines) + "\n"


SQUEUE_FORMAT = "%i|%T|%o"  # job id, state, and the command: a batch job's script


def queued_job(squeue_output: str, run_dir: str) -> tuple[str, str, str] | None:
    """(id, state, script) of a job in `squeue -h -o SQUEUE_FORMAT` whose script `launch slurm` wrote for run_dir.

    squeue lists jobs that are pending, running or ending, not finished ones.
    """
    folder = os.path.join(run_dir, "slurm", "")
    for line in squeue_output.splitlines():
        job = line.split("|", 2)  # the script path, last, may hold a '|'
        if len(job) == 3 and job[2].startswith(folder):
            return job[0], job[1], job[2]
    return None


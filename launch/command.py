"""The horovodrun command line and environment, as a pure function of the options.

Nothing here runs anything or reads the machine: `build_command(opts, env)`
returns `(argv, env)` for the executor in launch.cli, and unit tests check it
as data. Which option becomes which horovodrun flag or HOROVOD_* variable is
written in the option table, launch.options.
"""

import math
import re
import signal
from dataclasses import dataclass, replace
from typing import NamedTuple

from launch.hosts import HostError, format_hosts, parse_hosts
from launch.options import CYCLE_MS, WAKE_ENV, defaults, horovod_env, horovodrun_args, unsafe_value

RUNNERS = ("horovodrun", "srun")
# horovodrun's time between the SIGTERM it passes to a worker and the SIGKILL
# (read by safe_shell_exec as patched in scripts/horovod-*.patch; 5 s unpatched).
GRACE_ENV = "HOROVOD_GRACEFUL_TERMINATION_TIME_S"
# horovodrun's ssh option StrictHostKeyChecking (`no` unpatched, which ssh_config cannot override).
STRICT_HOST_KEYS_ENV = "HOROVOD_SSH_STRICT_HOST_KEY_CHECKING"
_DEFAULT = defaults()  # one source for the defaults: the option table
# The longest --signal-grace-sec: sbatch's --signal limit (launch slurm passes the grace to it),
# and far below what the launcher's timer takes.
MAX_GRACE_SEC = 65535
# The largest --fusion-threshold-mb: Horovod reads the buffer size in bytes into an int64, and a
# fusion buffer is allocated per device; 64 GiB is more than any device holds.
MAX_FUSION_MB = 65536


class LaunchError(ValueError):
    """Launcher options that cannot work; str(e) is a one-line message."""


@dataclass(frozen=True)
class LaunchOptions:
    """What the user asked for on the launcher's command line.

    Attributes:
      np: number of worker processes (ranks).
      config: the experiment YAML given to every worker.
      overrides: `key=value` strings passed on as `--set`.
      hosts: horovodrun `-H` list, `host1:slots,host2:slots` (hostfiles and
        Slurm node lists are turned into one by launch.hosts).
      controller: "gloo" or "mpi"; None: gloo under horovodrun, mpi under srun.
      runner: "horovodrun", or "srun" inside a Slurm allocation: srun starts
        the ranks as MPI processes (through PMIx) without horovodrun or ssh.
      srun_mpi: srun's `--mpi` plugin type.
      timeline: write a Horovod timeline (Chrome trace) to this file.
      autotune: let Horovod tune fusion buffer and cycle time.
      fusion_threshold_mb: Horovod tensor fusion buffer size.
      cycle_time_ms: how often Horovod's background thread coordinates the
        ranks when no tensor wakes it; None: launch.options.CYCLE_MS.
      stall_warning_sec: Horovod logs which ranks are missing from a collective
        after this long.
      stall_shutdown_sec: ... and shuts the job down after this long (0: never),
        so ranks that fell out of step end the job instead of hanging it.
      ssh_port: ssh port of the other hosts (horovodrun starts remote ranks
        over ssh).
      ssh_identity_file: private key for that ssh.
      ssh_strict_host_keys: that ssh reaches only hosts whose key is in
        known_hosts, instead of accepting any key (horovodrun's default).
      elastic: Horovod elastic mode (Gloo): workers may leave and join; the
        host list comes from host_discovery_script.
      min_np: elastic: fewest workers to keep training with (default np).
      max_np: elastic: most workers to run (default np).
      host_discovery_script: elastic: an executable printing one `host:slots`
        line per available host; horovodrun runs it every second.
      reset_limit: elastic: end the job after this many resizes (None: no limit).
      network_interface: network interfaces for the workers' traffic, e.g.
        `eth0` or `lo`. Elastic jobs without it wait until two hosts are up,
        because horovodrun finds the common interfaces by testing between hosts.
      verbose: show every line of the workers' output, TensorFlow's start-up
        banners included.
      signal_grace_sec: after a stop signal, the workers get this long to
        reach a step boundary and write their checkpoint before they are
        killed (horovodrun's wait before its SIGKILL).
      python: interpreter that runs the workers.
      horovodrun: the horovodrun executable.
      srun: the srun executable.

    The fields that have a flag of their own are launch.options.OPTIONS, which
    also holds their defaults.
    """

    np: int
    config: str
    overrides: tuple[str, ...] = ()
    hosts: str | None = None
    controller: str | None = _DEFAULT["controller"]
    runner: str = _DEFAULT["runner"]
    srun_mpi: str = _DEFAULT["srun_mpi"]
    timeline: str | None = _DEFAULT["timeline"]
    autotune: bool = _DEFAULT["autotune"]
    fusion_threshold_mb: int | None = _DEFAULT["fusion_threshold_mb"]
    cycle_time_ms: float | None = _DEFAULT["cycle_time_ms"]
    stall_warning_sec: int = _DEFAULT["stall_warning_sec"]
    stall_shutdown_sec: int = _DEFAULT["stall_shutdown_sec"]
    ssh_port: int | None = _DEFAULT["ssh_port"]
    ssh_identity_file: str | None = _DEFAULT["ssh_identity_file"]
    ssh_strict_host_keys: bool = _DEFAULT["ssh_strict_host_keys"]
    elastic: bool = _DEFAULT["elastic"]
    min_np: int | None = _DEFAULT["min_np"]
    max_np: int | None = _DEFAULT["max_np"]
    host_discovery_script: str | None = _DEFAULT["host_discovery_script"]
    reset_limit: int | None = _DEFAULT["reset_limit"]
    network_interface: str | None = _DEFAULT["network_interface"]
    verbose: bool = _DEFAULT["verbose"]
    signal_grace_sec: int = _DEFAULT["signal_grace_sec"]
    python: str = "python"
    horovodrun: str = "horovodrun"
    srun: str = "srun"


def check_options(opts: LaunchOptions) -> str:
    """The controller the job runs with; raises LaunchError for options that cannot work."""
    if opts.np < 1:
        raise LaunchError(f"--np must be at least 1, got {opts.np}")
    refusal = unsafe_value(opts)
    if refusal:
        raise LaunchError(refusal)
    if opts.runner not in RUNNERS:
        raise LaunchError(f"runner must be one of {', '.join(RUNNERS)}, got {opts.runner!r}")
    controller = opts.controller or ("mpi" if opts.runner == "srun" else "gloo")
    if controller not in ("gloo", "mpi"):
        raise LaunchError(f"controller must be gloo or mpi, got {controller!r}")
    if opts.runner == "srun" and controller != "mpi":
        raise LaunchError("--gloo needs horovodrun's rendezvous; srun starts MPI ranks (use --mpi)")
    if opts.stall_warning_sec < 1:
        raise LaunchError(f"--stall-warning-sec must be >= 1, got {opts.stall_warning_sec}")
    if opts.stall_shutdown_sec and opts.stall_shutdown_sec <= opts.stall_warning_sec:
        raise LaunchError(
            f"--stall-shutdown-sec {opts.stall_shutdown_sec} must exceed --stall-warning-sec {opts.stall_warning_sec}"
        )
    if not 1 <= opts.signal_grace_sec <= MAX_GRACE_SEC:
        raise LaunchError(f"--signal-grace-sec must be in 1..{MAX_GRACE_SEC}, got {opts.signal_grace_sec}")
    if opts.cycle_time_ms is not None and not (math.isfinite(opts.cycle_time_ms) and opts.cycle_time_ms > 0):
        raise LaunchError(f"--cycle-time-ms must be a number > 0, got {opts.cycle_time_ms}")
    if opts.fusion_threshold_mb is not None and not 0 <= opts.fusion_threshold_mb <= MAX_FUSION_MB:
        raise LaunchError(f"--fusion-threshold-mb must be in 0..{MAX_FUSION_MB}, got {opts.fusion_threshold_mb}")
    return controller


# What Open MPI's singleton MPI_Init (a process that called MPI_Init without
# mpirun: e.g. hvd.init() in a notebook, a test process, a script run by
# srun --mpi=pmix) puts in its environment, and its children inherit. They
# describe that other job: an mpirun started with them joins it, finds its
# PMIx server gone, and exits 1 without a message.
_ENCLOSING_MPI_JOB = re.compile(
    r"^(PMIX_.*|OMPI_MCA_ess|OMPI_MCA_pmix|OMPI_MCA_orte_(launch|ess_num_procs|precondition_transports)"
    r"|OMPI_APP_CTX_NUM_PROCS|ORTE_SCHIZO_DETECTION)$")


def without_enclosing_mpi_job(env: dict[str, str]) -> dict[str, str]:
    """`env` less the variables of an MPI job this process runs inside: the job started here is a new one."""
    return {k: v for k, v in env.items() if not _ENCLOSING_MPI_JOB.match(k)}


def build_command(opts: LaunchOptions, base_env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The horovodrun (or srun) argv and the environment to run it with."""
    controller = check_options(opts)
    env = dict(base_env)
    if controller == "gloo":
        env.setdefault(WAKE_ENV, "1")
    if opts.cycle_time_ms is None:
        opts = replace(opts, cycle_time_ms=CYCLE_MS[env.get(WAKE_ENV) == "1"])
    env.setdefault("PYTHONUNBUFFERED", "1")  # rank output interleaves line by line
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter, once per rank
    if opts.runner == "srun":
        if opts.elastic:
            raise LaunchError("--elastic needs horovodrun; srun cannot add or remove ranks")
        return _srun_command(opts, env), env

    argv = [opts.horovodrun, "-np", str(opts.np), f"--{controller}"]
    env = without_enclosing_mpi_job(env)
    env[GRACE_ENV] = str(opts.signal_grace_sec)
    if opts.ssh_strict_host_keys:
        env[STRICT_HOST_KEYS_ENV] = "yes"
    if opts.elastic:
        argv += elastic_args(opts, controller)
    elif opts.min_np is not None or opts.max_np is not None or opts.host_discovery_script or opts.reset_limit:
        raise LaunchError("--min-np, --max-np, --host-discovery-script and --reset-limit need --elastic")
    else:
        argv += ["-H", _host_list(opts)]
    # The table's flags (tuning, ssh, stall check), in its order.
    argv += horovodrun_args(opts)
    argv += _worker_argv(opts)
    if controller == "mpi":
        # Open MPI refuses to start as root (containers, CI) without these.
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        if _local_only(opts):
            # Ranks on one host need only shared memory; the tcp btl (and others
            # such as ofi) would listen on every address whatever their
            # interface settings. Replaces horovodrun's `-mca btl ^openib` (patch).
            env.setdefault("OMPI_MCA_btl", "self,vader")
    return argv, env


class StopPlan(NamedTuple):
    """How the launcher stops the workers at a checkpoint (SIGTERM, Slurm's SIGUSR1) through the runner.

    Attributes:
      signal: what the runner gets first.
      kill_after: seconds after which the runner gets SIGTERM, which ends the
        job; None: the runner keeps the grace itself.
    """

    signal: int
    kill_after: float | None


PASS_SIGTERM = StopPlan(signal.SIGTERM, None)


def stop_plan(opts: LaunchOptions) -> StopPlan:
    """horovodrun (Gloo) passes SIGTERM on and kills after its grace (GRACE_ENV); srun passes it on.

    mpirun instead answers SIGTERM with its own kill: the ranks get SIGTERM
    1 s later and SIGKILL 1 s after that (Open MPI's odls_base_sigkill_timeout,
    which also delays the SIGTERM itself). It passes SIGUSR2 straight on to
    every rank, which trainer.preemption takes as a stop: the launcher sends
    that, and SIGTERM only once the grace is over.
    """
    if opts.runner == "horovodrun" and check_options(opts) == "mpi":
        return StopPlan(signal.SIGUSR2, float(opts.signal_grace_sec))
    return PASS_SIGTERM


def _local_only(opts: LaunchOptions) -> bool:
    """Whether every rank runs on this host by name (the default `localhost:NP` included)."""
    if opts.elastic:
        return False
    names = [h for h, _ in parse_hosts(opts.hosts)] if opts.hosts else ["localhost"]
    return all(h in ("localhost", "127.0.0.1", "::1") for h in names)


def _host_list(opts: LaunchOptions) -> str:
    """horovodrun's -H: the --hosts list, checked against --np, or all ranks on this host."""
    if not opts.hosts:
        return f"localhost:{opts.np}"
    try:
        hosts = parse_hosts(opts.hosts)
    except HostError as e:
        raise LaunchError(str(e)) from None
    slots = sum(n for _, n in hosts)
    if slots < opts.np:
        raise LaunchError(f"--hosts {opts.hosts!r} has {slots} slots for --np {opts.np}")
    return format_hosts(hosts)


def tensorboard_command(python: str | None, logdir: str, port: int = 6006, host: str = "127.0.0.1") -> list[str]:
    """TensorBoard over a run's events, bound to loopback unless `host` says otherwise.

    `python` runs it as a module (the launcher's own server); None gives the
    `tensorboard` command that the launchers print for people to run.
    Loopback keeps the server (which has no authentication) off the cluster
    network; users reach it through an SSH tunnel.
    """
    if not 0 < port < 65536:
        raise LaunchError(f"--tensorboard {port}: not a TCP port (1-65535)")
    exe = ["tensorboard"] if python is None else [python, "-m", "tensorboard.main"]
    return [*exe, "--logdir", logdir, "--host", host, "--port", str(port)]


def _worker_argv(opts: LaunchOptions) -> list[str]:
    argv = [opts.python, "-m", "trainer.train", "--config", opts.config]
    for item in opts.overrides:
        argv += ["--set", item]
    return argv


def _srun_command(opts: LaunchOptions, env: dict[str, str]) -> list[str]:
    """srun starts every rank itself; the horovodrun options become Horovod's environment variables."""
    if opts.hosts:
        raise LaunchError("--hosts does not apply to srun, which runs on the hosts of the allocation")
    env["HOROVOD_CONTROLLER"] = env["HOROVOD_CPU_OPERATIONS"] = "mpi"
    env.update(horovod_env(opts))
    # --kill-on-bad-exit: one failed rank ends the step, as horovodrun does,
    # instead of leaving the others blocked in a collective; --label prefixes
    # each output line with its rank.
    return [opts.srun, f"--mpi={opts.srun_mpi}", "--ntasks", str(opts.np), "--kill-on-bad-exit=1", "--label",
            *_worker_argv(opts)]


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def world_sizes(opts: LaunchOptions) -> range:
    """Every number of workers the job may run with."""
    if not opts.elastic:
        return range(opts.np, opts.np + 1)
    return range(_or(opts.min_np, opts.np), _or(opts.max_np, opts.np) + 1)


def elastic_args(opts: LaunchOptions, controller: str) -> list[str]:
    """horovodrun's elastic options; raises LaunchError for a combination that cannot work."""
    if controller != "gloo":
        raise LaunchError("--elastic runs on Gloo only; drop --mpi")
    if not opts.host_discovery_script:
        raise LaunchError("--elastic needs --host-discovery-script (an executable printing host:slots lines)")
    if opts.hosts:
        raise LaunchError("--elastic takes its hosts from --host-discovery-script, not --hosts/--hostfile")
    min_np, max_np = _or(opts.min_np, opts.np), _or(opts.max_np, opts.np)
    if min_np < 1:
        raise LaunchError(f"--min-np must be at least 1, got {min_np}")
    if not min_np <= opts.np <= max_np:
        raise LaunchError(f"--np {opts.np} must lie between --min-np {min_np} and --max-np {max_np}")
    if opts.reset_limit is not None and opts.reset_limit < 1:
        raise LaunchError(f"--reset-limit must be at least 1, got {opts.reset_limit}")
    argv = ["--min-np", str(min_np), "--max-np", str(max_np), "--host-discovery-script", opts.host_discovery_script]
    if opts.reset_limit is not None:
        argv += ["--reset-limit", str(opts.reset_limit)]
    return argv

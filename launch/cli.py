"""`python -m launch run`: check the config, build the horovodrun command, run it.

    python -m launch [run] --np 2 --config configs/digits.yaml [--set train.epochs=5]
        [--hosts h1:2,h2:2 | --hostfile FILE | --slurm-allocation] [--requeue-on-timeout]
        [--srun [--srun-mpi pmix]] [--gloo | --mpi] [--network-interface NIC] [--timeline FILE]
        [--autotune] [--fusion-threshold-mb M] [--cycle-time-ms T] [--ssh-port P] [--ssh-identity-file KEY]
        [--stall-warning-sec S] [--stall-shutdown-sec S] [--verbose]
        [--elastic --min-np N --max-np M --host-discovery-script FILE [--reset-limit R]]
        [--dry-run] [--tensorboard PORT [--tensorboard-host HOST]]

`run` may be left out (launch.main). The options after `--requeue-on-timeout`
are the table of launch.options. Exits 2 for bad options, config, data, a
checkpoint of another model or a run_dir in use by another job (before any
worker starts), else with the exit code of the first worker that failed
(docs/training.md), or horovodrun's. The launcher holds the run folder's claim
(trainer.run_claim) for the whole job, and passes its token to the workers,
which know it as theirs.
"""

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from typing import NamedTuple

from data_pipeline.arguments import ArgumentParser
from data_pipeline.metadata import DataError
from data_pipeline.textfile import TextFileError, read_utf8
from launch.command import (
    LaunchError,
    LaunchOptions,
    StopPlan,
    build_command,
    stop_plan,
    tensorboard_command,
    world_sizes,
)
from launch.hosts import HostError, allocation_hosts, expand_nodelist, format_hosts, parse_hostfile
from launch.job import execute
from launch.options import add_config_options, add_options, launch_values
from trainer.checkpoint import CheckpointError, run_finished
from trainer.config import ConfigError, check_environment, check_run_dir, load_config, validate, validate_world
from trainer.data_spec import check_model_build, check_start
from trainer.exit_codes import EXIT_BAD_INPUT
from trainer.run_claim import TOKEN_ENV, RunClaimError, acquire

DESCRIPTION = "Start data-parallel workers with horovodrun (or srun inside a Slurm allocation)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--np", type=int, help="number of worker processes (default with --slurm-allocation: its tasks)")
    add_config_options(p)
    hosts = p.add_mutually_exclusive_group()
    hosts.add_argument("--hosts", help="host:slots list, e.g. node1:4,node2:4 (default localhost:NP)")
    hosts.add_argument("--hostfile", help="file of 'host slots=N' lines")
    hosts.add_argument("--slurm-allocation", action="store_true",
                       help="run on the nodes and tasks per node of the Slurm job this runs in")
    p.add_argument("--requeue-on-timeout", action="store_true",
                   help="on SIGUSR1 (Slurm's warning before the time limit) stop the workers at a checkpoint, "
                        "then requeue this Slurm job")
    add_options(p)
    p.add_argument("--dry-run", action="store_true", help="print the command and environment, run nothing")
    p.add_argument("--tensorboard", type=int, metavar="PORT",
                   help="also run TensorBoard on this host over the run's events while the job runs")
    p.add_argument("--tensorboard-host", default="127.0.0.1",
                   help="address TensorBoard binds to (default 127.0.0.1: reach it through an SSH tunnel)")


def parse_args(argv) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m launch run", description=DESCRIPTION)
    add_arguments(p)
    return p.parse_args(argv)


def scontrol_hostnames(nodelist: str) -> list[str]:
    """Slurm's own expansion of a node list; the pure parser where scontrol is missing or fails."""
    if shutil.which("scontrol"):
        res = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=False)
        names = res.stdout.split()
        if res.returncode == 0 and names:
            return names
        reason = (res.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"launch: scontrol show hostnames failed ({reason}); expanding {nodelist!r} here", file=sys.stderr)
    return expand_nodelist(nodelist)


def resolve_hosts(args: argparse.Namespace) -> tuple[int, str | None]:
    """--np and the -H list, from the options, a hostfile or the Slurm allocation."""
    if args.runner == "srun" and not args.slurm_allocation:
        raise LaunchError("--srun needs --slurm-allocation (run it inside a Slurm job)")
    if args.hostfile:
        try:
            text = read_utf8(args.hostfile)
        except TextFileError as e:
            raise LaunchError(f"--hostfile {args.hostfile!r}: {e}") from None
        hosts = parse_hostfile(text, args.hostfile)
    elif args.slurm_allocation:
        hosts = allocation_hosts(os.environ, scontrol_hostnames)
    else:
        if args.np is None:
            raise LaunchError("--np is required (or --hostfile / --slurm-allocation to take it from the hosts)")
        return args.np, args.hosts
    np = args.np if args.np is not None else sum(n for _, n in hosts)
    return np, format_hosts(hosts)


def options_from_args(args: argparse.Namespace, np: int, hosts: str | None) -> LaunchOptions:
    bindir = os.path.dirname(sys.executable)
    horovodrun = os.path.join(bindir, "horovodrun")
    return LaunchOptions(
        np=np, config=args.config, overrides=tuple(args.overrides),
        # srun places the ranks itself, on the allocation's hosts.
        hosts=None if args.runner == "srun" else hosts,
        python=sys.executable,
        horovodrun=horovodrun if os.path.exists(horovodrun) else (shutil.which("horovodrun") or "horovodrun"),
        **launch_values(args),
    )


class Job(NamedTuple):
    """What `run` starts: the workers' command, the TensorBoard command, the Slurm job to requeue.

    Attributes:
      argv, env: horovodrun's (or srun's) command line and environment.
      board: the TensorBoard server to run alongside (with --tensorboard), or
        else the `tensorboard` command printed for people to run.
      requeue_job: the Slurm job id to requeue at the time limit, or None.
      options: the launch options the command was built from.
      stop: how the launcher stops the workers at a checkpoint.
      run_dir: the config's run_dir, which the launcher claims.
      epochs: the config's train.epochs, which a finished run has trained.
    """

    argv: list[str]
    env: dict[str, str]
    board: list[str]
    requeue_job: str | None
    options: LaunchOptions
    stop: StopPlan
    run_dir: str
    epochs: int


def prepare(args: argparse.Namespace) -> Job:
    """Builds the job; for anything that cannot work, before any worker starts, an error of one line.

    LaunchError, HostError or ConfigError for the options and the config,
    DataError for the data, CheckpointError for a run folder whose newest
    checkpoint does not fit the configured model.
    """
    np, hosts = resolve_hosts(args)
    script = args.host_discovery_script
    if script and not (os.path.isfile(script) and os.access(script, os.X_OK)):
        raise LaunchError(f"--host-discovery-script {script!r} is not an executable file")
    opts = options_from_args(args, np, hosts)
    cmd, env = build_command(opts, dict(os.environ))
    # Rank 0 writes the timeline, on this host when all ranks are local (checked past build_command's
    # shell check). Horovod would only log that it cannot open the file, and train on without one.
    local = hosts is None and not args.elastic
    if args.timeline and local and not os.path.isdir(os.path.dirname(os.path.abspath(args.timeline))):
        raise LaunchError(f"--timeline {args.timeline!r}: its folder does not exist")
    # Check the config here, once, before any worker starts; elastic jobs
    # keep the global batch, so it must divide by every size they may reach.
    cfg = load_config(args.config, args.overrides)
    validate(cfg)
    check_environment(cfg)
    for n in world_sizes(opts):
        validate_world(cfg, n)
    check_run_dir(cfg.run_dir)
    # The config against its data, and the checkpoint a resume would restore: what the
    # workers would refuse after loading TensorFlow, refused here with the same line.
    check_model_build(cfg, check_start(cfg))
    logdir = os.path.join(cfg.run_dir, "tensorboard")
    if args.tensorboard is None:  # no server: the command to start one, for people to run
        board = tensorboard_command(None, logdir, host=args.tensorboard_host)
    else:
        board = tensorboard_command(sys.executable, logdir, args.tensorboard, args.tensorboard_host)
    requeue_job = None
    if args.requeue_on_timeout:
        requeue_job = os.environ.get("SLURM_JOB_ID")
        if not requeue_job:
            raise LaunchError("--requeue-on-timeout needs SLURM_JOB_ID (run it inside a Slurm job)")
        if not shutil.which("scontrol"):
            raise LaunchError("--requeue-on-timeout needs scontrol, which is not on PATH")
    return Job(cmd, env, board, requeue_job, opts, stop_plan(opts), cfg.run_dir, cfg.train.epochs)


def report_bad_input(error: Exception) -> int:
    """EXIT_BAD_INPUT, after the error's one line, named by its kind (`launch: data error: ...`)."""
    kind = "data error" if isinstance(error, DataError) else \
        "checkpoint error" if isinstance(error, CheckpointError) else "error"
    print(f"launch: {kind}: {error}", file=sys.stderr)
    return EXIT_BAD_INPUT


def check_runner(argv: list[str]) -> None:
    """The runner must exist before anything starts (else a FileNotFoundError traceback from Popen)."""
    if not shutil.which(argv[0]):
        where = "next to this python nor on PATH" if argv[0].endswith("horovodrun") else "on PATH"
        raise LaunchError(f"{os.path.basename(argv[0])} is not installed here: not {where}")


def run(args: argparse.Namespace) -> int:
    try:
        job = prepare(args)
        if not args.dry_run:  # a dry run only prints: it may be run where horovodrun is not
            check_runner(job.argv)
            claim = acquire(job.run_dir)  # the last check, the first write
    except (DataError, CheckpointError, ConfigError, LaunchError, HostError, RunClaimError) as e:
        return report_bad_input(e)
    if args.dry_run:
        for key in sorted(job.env):
            if os.environ.get(key) != job.env[key]:
                print(f"export {key}={shlex.quote(job.env[key])}")
        print(shlex.join(job.argv))
        if args.tensorboard is not None:
            print(shlex.join(job.board))
        return 0
    with claim:
        env = {**job.env, TOKEN_ENV: claim.token}  # the workers' run_dir check finds this claim their own
        print(f"launch: {shlex.join(job.argv)}", file=sys.stderr, flush=True)
        board = None
        if args.tensorboard is None:
            print(f"launch: watch with: {shlex.join(job.board)}", file=sys.stderr, flush=True)
        else:
            board = job.board
            print(f"launch: TensorBoard: {shlex.join(job.board)}", file=sys.stderr, flush=True)
        return execute(job.argv, env, job.requeue_job, board, verbose=job.options.verbose, stop=job.stop,
                       elastic=job.options.elastic, finished=lambda: run_finished(job.run_dir, job.epochs))


def main(argv=None) -> int:
    """`launch run` alone; launch.main is the entry point that also knows `launch slurm`."""
    return run(parse_args(sys.argv[1:] if argv is None else list(argv)))

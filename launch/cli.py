"""`python -m launch`: check the config, build the horovodrun command, run it.

    python -m launch --np 2 --config configs/digits.yaml [--set train.epochs=5]
        [--hosts h1:2,h2:2 | --hostfile FILE | --slurm-allocation] [--gloo | --mpi]
        [--srun] [--requeue-on-timeout] [--ssh-port P] [--ssh-identity-file KEY]
        [--timeline FILE] [--autotune] [--fusion-threshold-mb M] [--cycle-time-ms T]
        [--stall-warning-sec S] [--stall-shutdown-sec S] [--network-interface NIC] [--dry-run]
        [--tensorboard PORT [--tensorboard-host HOST]]
        [--elastic --min-np N --max-np M --host-discovery-script FILE [--reset-limit R]]
    python -m launch slurm --config FILE ...      (see launch.slurm_cli)

Exits with horovodrun's exit code, or 2 for bad options or config.
"""

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys

from launch import console
from launch.command import LaunchError, LaunchOptions, build_command, tensorboard_command, world_sizes
from launch.hosts import HostError, allocation_hosts, expand_nodelist, format_hosts, parse_hostfile
from trainer.config import ConfigError, load_config, check_environment, validate, validate_world


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch", description="Start data-parallel workers with horovodrun.",
                                epilog="python -m launch slurm --help: write and submit an sbatch script")
    p.add_argument("--np", type=int, help="number of worker processes (default with --slurm-allocation: its tasks)")
    p.add_argument("--config", required=True, help="YAML experiment file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    hosts = p.add_mutually_exclusive_group()
    hosts.add_argument("--hosts", help="host:slots list, e.g. node1:4,node2:4 (default localhost:NP)")
    hosts.add_argument("--hostfile", help="file of 'host slots=N' lines")
    hosts.add_argument("--slurm-allocation", action="store_true",
                       help="run on the nodes and tasks per node of the Slurm job this runs in")
    p.add_argument("--srun", dest="runner", action="store_const", const="srun", default="horovodrun",
                   help="start the ranks with srun (MPI through PMIx) instead of horovodrun; needs --slurm-allocation")
    p.add_argument("--srun-mpi", default="pmix", help="srun --mpi plugin (default pmix)")
    p.add_argument("--requeue-on-timeout", action="store_true",
                   help="on SIGUSR1 (Slurm's warning before the time limit) stop the workers at a checkpoint, "
                        "then requeue this Slurm job")
    p.add_argument("--ssh-port", type=int, help="ssh port of the other hosts (horovodrun reaches them over ssh)")
    p.add_argument("--ssh-identity-file", help="private key for ssh to the other hosts")
    add_horovod_options(p)
    el = p.add_argument_group("elastic (Gloo): workers may leave and join while training goes on")
    el.add_argument("--elastic", action="store_true", help="Horovod elastic mode; --np is the starting size")
    el.add_argument("--min-np", type=int, help="fewest workers to keep training with (default --np)")
    el.add_argument("--max-np", type=int, help="most workers to run (default --np)")
    el.add_argument("--host-discovery-script", help="executable printing one host:slots line per available host")
    el.add_argument("--reset-limit", type=int, help="end the job after this many resizes")
    p.add_argument("--dry-run", action="store_true", help="print the command and environment, run nothing")
    p.add_argument("--verbose", action="store_true", help="show the workers' output unfiltered (see launch.console)")
    p.add_argument("--tensorboard", type=int, metavar="PORT",
                   help="also run TensorBoard on this host over the run's events while the job runs")
    p.add_argument("--tensorboard-host", default="127.0.0.1",
                   help="address TensorBoard binds to (default 127.0.0.1: reach it through an SSH tunnel)")
    return p.parse_args(argv)


def add_horovod_options(p: argparse.ArgumentParser) -> None:
    """Options that also pass through `python -m launch slurm` to the launcher inside the job."""
    ctl = p.add_mutually_exclusive_group()
    ctl.add_argument("--gloo", dest="controller", action="store_const", const="gloo",
                     help="Gloo controller (default with horovodrun)")
    ctl.add_argument("--mpi", dest="controller", action="store_const", const="mpi", help="MPI controller")
    p.add_argument("--timeline", help="write a Horovod timeline to this file")
    p.add_argument("--autotune", action="store_true", help="let Horovod autotune fusion and cycle time")
    p.add_argument("--fusion-threshold-mb", type=int, help="Horovod tensor fusion buffer, in MB")
    p.add_argument("--cycle-time-ms", type=float, help="Horovod background cycle time (default 1 ms)")
    p.add_argument("--stall-warning-sec", type=int, default=60,
                   help="log ranks missing from a collective after this long (default 60)")
    p.add_argument("--stall-shutdown-sec", type=int, default=600,
                   help="end the job when a collective waits this long; 0 never (default 600)")
    p.add_argument("--network-interface", help="interfaces for worker traffic, e.g. eth0 (lo: one host)")


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
            with open(args.hostfile, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise LaunchError(f"--hostfile {args.hostfile!r}: {e.strerror}") from None
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
        controller=args.controller, runner=args.runner, srun_mpi=args.srun_mpi, timeline=args.timeline,
        autotune=args.autotune, fusion_threshold_mb=args.fusion_threshold_mb, cycle_time_ms=args.cycle_time_ms,
        stall_warning_sec=args.stall_warning_sec, stall_shutdown_sec=args.stall_shutdown_sec,
        ssh_port=args.ssh_port, ssh_identity_file=args.ssh_identity_file, elastic=args.elastic, min_np=args.min_np, max_np=args.max_np,
        host_discovery_script=args.host_discovery_script, reset_limit=args.reset_limit,
        network_interface=args.network_interface, python=sys.executable,
        horovodrun=horovodrun if os.path.exists(horovodrun) else (shutil.which("horovodrun") or "horovodrun"),
    )


def execute(argv: list[str], env: dict[str, str], requeue_job: str | None = None,
            board: list[str] | None = None, verbose: bool = True) -> int:
    """Runs horovodrun (or srun), passing SIGINT/SIGTERM on to it, and returns its exit code.

    SIGUSR1 (what Slurm sends before the time limit, see launch.slurm) stops
    the workers with SIGTERM, which makes them checkpoint; with `requeue_job`
    that Slurm job is then requeued, and resumes from the checkpoint.
    `board`, a TensorBoard command, runs alongside and is stopped when the job ends.
    Unless `verbose`, the job's output goes through launch.console.
    """
    server = subprocess.Popen(board) if board else None
    try:
        return _run_job(argv, env, requeue_job, verbose)
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _run_job(argv: list[str], env: dict[str, str], requeue_job: str | None, verbose: bool = True) -> int:
    proc, pumps = console.start(argv, env, verbose)
    timed_out = []

    def forward(signum, _frame):
        proc.send_signal(signum)

    def time_limit(_signum, _frame):
        if not timed_out:
            print("launch: time limit near: stopping the workers at a checkpoint", file=sys.stderr, flush=True)
        timed_out.append(True)
        proc.send_signal(signal.SIGTERM)

    handlers = {signal.SIGINT: forward, signal.SIGTERM: forward, signal.SIGUSR1: time_limit}
    previous = {s: signal.signal(s, h) for s, h in handlers.items()}
    try:
        code = proc.wait()
        console.finish(pumps)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    code = 128 - code if code < 0 else code
    if timed_out and requeue_job and code != 0:
        res = subprocess.run(["scontrol", "requeue", requeue_job], capture_output=True, text=True, check=False)
        if res.returncode == 0:
            print(f"launch: requeued Slurm job {requeue_job}; it resumes from the checkpoint", file=sys.stderr, flush=True)
        else:
            print(f"launch: error: scontrol requeue {requeue_job} failed: {res.stderr.strip()}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["slurm"]:
        from launch.slurm_cli import main as slurm_main

        return slurm_main(argv[1:])
    args = parse_args(argv)
    try:
        np, hosts = resolve_hosts(args)
        script = args.host_discovery_script
        if script and not (os.path.isfile(script) and os.access(script, os.X_OK)):
            raise LaunchError(f"--host-discovery-script {script!r} is not an executable file")
        opts = options_from_args(args, np, hosts)
        cmd, env = build_command(opts, dict(os.environ))
        # Check the config here, once, before any worker starts; elastic jobs
        # keep the global batch, so it must divide by every size they may reach.
        cfg = load_config(args.config, args.overrides)
        validate(cfg)
        check_environment(cfg)
        for n in world_sizes(opts):
            validate_world(cfg, n)
        logdir = os.path.join(cfg.run_dir, "tensorboard")
        port = 6006 if args.tensorboard is None else args.tensorboard
        board = tensorboard_command(sys.executable, logdir, port, args.tensorboard_host)
        requeue_job = None
        if args.requeue_on_timeout:
            requeue_job = os.environ.get("SLURM_JOB_ID")
            if not requeue_job:
                raise LaunchError("--requeue-on-timeout needs SLURM_JOB_ID (run it inside a Slurm job)")
    except (ConfigError, LaunchError, HostError) as e:
        print(f"launch: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for key in sorted(env):
            if os.environ.get(key) != env[key]:
                print(f"export {key}={shlex.quote(env[key])}")
        print(shlex.join(cmd))
        if args.tensorboard is not None:
            print(shlex.join(board))
        return 0
    print(f"launch: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    if args.tensorboard is None:
        print(f"launch: watch with: {shlex.join(['tensorboard', *board[3:]])}", file=sys.stderr, flush=True)
        return execute(cmd, env, requeue_job, verbose=args.verbose)
    print(f"launch: TensorBoard: {shlex.join(board)}", file=sys.stderr, flush=True)
    return execute(cmd, env, requeue_job, board, verbose=args.verbose)

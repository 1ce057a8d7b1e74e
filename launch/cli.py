"""`python -m launch`: check the config, build the horovodrun command, run it.

    python -m launch --np 2 --config configs/digits.yaml [--set train.epochs=5]
        [--hosts h1:2,h2:2 | --hostfile FILE] [--gloo | --mpi]
        [--timeline FILE] [--autotune] [--fusion-threshold-mb M] [--cycle-time-ms T]
        [--stall-warning-sec S] [--stall-shutdown-sec S] [--dry-run]
        [--tensorboard PORT [--tensorboard-host HOST]]

Exits with horovodrun's exit code, or 2 for bad options or config.
"""

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys

from launch.command import LaunchError, LaunchOptions, build_command, tensorboard_command
from trainer.config import ConfigError, load_config, validate, validate_world


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch", description="Start data-parallel workers with horovodrun.")
    p.add_argument("--np", type=int, required=True, help="number of worker processes")
    p.add_argument("--config", required=True, help="YAML experiment file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    hosts = p.add_mutually_exclusive_group()
    hosts.add_argument("--hosts", help="host:slots list, e.g. node1:4,node2:4 (default localhost:NP)")
    hosts.add_argument("--hostfile", help="file of 'host slots=N' lines")
    ctl = p.add_mutually_exclusive_group()
    ctl.add_argument("--gloo", dest="controller", action="store_const", const="gloo", help="Gloo controller (default)")
    ctl.add_argument("--mpi", dest="controller", action="store_const", const="mpi", help="MPI controller")
    p.add_argument("--timeline", help="write a Horovod timeline to this file")
    p.add_argument("--autotune", action="store_true", help="let Horovod autotune fusion and cycle time")
    p.add_argument("--fusion-threshold-mb", type=int, help="Horovod tensor fusion buffer, in MB")
    p.add_argument("--cycle-time-ms", type=float, help="Horovod background cycle time (default 1 ms)")
    p.add_argument("--stall-warning-sec", type=int, default=60,
                   help="log ranks missing from a collective after this long (default 60)")
    p.add_argument("--stall-shutdown-sec", type=int, default=600,
                   help="end the job when a collective waits this long; 0 never (default 600)")
    p.add_argument("--dry-run", action="store_true", help="print the command and environment, run nothing")
    p.add_argument("--tensorboard", type=int, metavar="PORT",
                   help="also run TensorBoard on this host over the run's events while the job runs")
    p.add_argument("--tensorboard-host", default="127.0.0.1",
                   help="address TensorBoard binds to (default 127.0.0.1: reach it through an SSH tunnel)")
    p.set_defaults(controller="gloo")
    return p.parse_args(argv)


def options_from_args(args: argparse.Namespace) -> LaunchOptions:
    bindir = os.path.dirname(sys.executable)
    horovodrun = os.path.join(bindir, "horovodrun")
    return LaunchOptions(
        np=args.np, config=args.config, overrides=tuple(args.overrides), hosts=args.hosts,
        hostfile=args.hostfile, controller=args.controller, timeline=args.timeline, autotune=args.autotune,
        fusion_threshold_mb=args.fusion_threshold_mb, cycle_time_ms=args.cycle_time_ms, stall_warning_sec=args.stall_warning_sec,
        stall_shutdown_sec=args.stall_shutdown_sec, python=sys.executable,
        horovodrun=horovodrun if os.path.exists(horovodrun) else (shutil.which("horovodrun") or "horovodrun"),
    )


def execute(argv: list[str], env: dict[str, str], board: list[str] | None = None) -> int:
    """Runs horovodrun, passing SIGINT/SIGTERM on to it, and returns its exit code.

    `board`, a TensorBoard command, runs alongside and is stopped when the job ends.
    """
    server = subprocess.Popen(board) if board else None
    try:
        return _run_job(argv, env)
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _run_job(argv: list[str], env: dict[str, str]) -> int:
    proc = subprocess.Popen(argv, env=env)

    def forward(signum, _frame):
        proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 - code if code < 0 else code


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.hostfile and not os.path.isfile(args.hostfile):
            raise LaunchError(f"--hostfile {args.hostfile!r} does not exist")
        # Check the config here, once, before any worker starts.
        cfg = load_config(args.config, args.overrides)
        validate(cfg)
        validate_world(cfg, args.np)
        cmd, env = build_command(options_from_args(args), dict(os.environ))
        logdir = os.path.join(cfg.run_dir, "tensorboard")
        port = 6006 if args.tensorboard is None else args.tensorboard
        board = tensorboard_command(sys.executable, logdir, port, args.tensorboard_host)
    except (ConfigError, LaunchError) as e:
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
        return execute(cmd, env)
    print(f"launch: TensorBoard: {shlex.join(board)}", file=sys.stderr, flush=True)
    return execute(cmd, env, board)

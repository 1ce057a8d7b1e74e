"""`python -m launch`: check the config, build the horovodrun command, run it.

    python -m launch --np 2 --config configs/digits.yaml [--set train.epochs=5]
        [--hosts h1:2,h2:2 | --hostfile FILE] [--gloo | --mpi]
        [--timeline FILE] [--autotune] [--fusion-threshold-mb M] [--cycle-time-ms T]
        [--stall-warning-sec S] [--stall-shutdown-sec S] [--network-interface NIC] [--dry-run]
        [--elastic --min-np N --max-np M --host-discovery-script FILE [--reset-limit R]]

Exits with horovodrun's exit code, or 2 for bad options or config.
"""

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys

from launch.command import LaunchError, LaunchOptions, build_command, world_sizes
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
    p.add_argument("--network-interface", help="interfaces for worker traffic, e.g. eth0 (lo: one host)")
    el = p.add_argument_group("elastic (Gloo): workers may leave and join while training goes on")
    el.add_argument("--elastic", action="store_true", help="Horovod elastic mode; --np is the starting size")
    el.add_argument("--min-np", type=int, help="fewest workers to keep training with (default --np)")
    el.add_argument("--max-np", type=int, help="most workers to run (default --np)")
    el.add_argument("--host-discovery-script", help="executable printing one host:slots line per available host")
    el.add_argument("--reset-limit", type=int, help="end the job after this many resizes")
    p.add_argument("--dry-run", action="store_true", help="print the command and environment, run nothing")
    p.set_defaults(controller="gloo")
    return p.parse_args(argv)


def options_from_args(args: argparse.Namespace) -> LaunchOptions:
    bindir = os.path.dirname(sys.executable)
    horovodrun = os.path.join(bindir, "horovodrun")
    return LaunchOptions(
        np=args.np, config=args.config, overrides=tuple(args.overrides), hosts=args.hosts,
        hostfile=args.hostfile, controller=args.controller, timeline=args.timeline, autotune=args.autotune,
        fusion_threshold_mb=args.fusion_threshold_mb, cycle_time_ms=args.cycle_time_ms, stall_warning_sec=args.stall_warning_sec,
        stall_shutdown_sec=args.stall_shutdown_sec, elastic=args.elastic, min_np=args.min_np, max_np=args.max_np,
        host_discovery_script=args.host_discovery_script, reset_limit=args.reset_limit,
        network_interface=args.network_interface, python=sys.executable,
        horovodrun=horovodrun if os.path.exists(horovodrun) else (shutil.which("horovodrun") or "horovodrun"),
    )


def execute(argv: list[str], env: dict[str, str]) -> int:
    """Runs horovodrun, passing SIGINT/SIGTERM on to it, and returns its exit code."""
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
        script = args.host_discovery_script
        if script and not (os.path.isfile(script) and os.access(script, os.X_OK)):
            raise LaunchError(f"--host-discovery-script {script!r} is not an executable file")
        opts = options_from_args(args)
        cmd, env = build_command(opts, dict(os.environ))
        # Check the config here, once, before any worker starts; elastic jobs
        # keep the global batch, so it must divide by every size they may reach.
        cfg = load_config(args.config, args.overrides)
        validate(cfg)
        for n in world_sizes(opts):
            validate_world(cfg, n)
    except (ConfigError, LaunchError) as e:
        print(f"launch: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for key in sorted(env):
            if os.environ.get(key) != env[key]:
                print(f"export {key}={shlex.quote(env[key])}")
        print(shlex.join(cmd))
        return 0
    print(f"launch: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    return execute(cmd, env)

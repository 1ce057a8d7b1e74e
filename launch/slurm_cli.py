"""`python -m launch slurm`: write the sbatch script for a run and submit it.

    python -m launch slurm --config configs/digits.yaml [--set key=value ...]
        [--nodes N] [--ntasks-per-node T | --gpus-per-node G] [--cpus-per-task C]
        [--time HH:MM:SS] [--partition P] [--account A] [--qos Q] [--job-name NAME]
        [--setup 'module load ...' ...] [--venv DIR] [--signal-grace-sec S] [--no-requeue]
        [--srun [--srun-mpi pmix]] [--gloo | --mpi] [Horovod options] [--verbose]
        [--tensorboard-host H] [--no-data-check] [--dry-run]

`--dry-run` prints the script. Otherwise it is saved as run_dir/slurm/NAME.sbatch
and submitted with sbatch; the job id, the log path and the TensorBoard
command to watch the run are printed. Exits 2 for bad options, a bad config,
a run_dir in use (claimed by a live job, or with a job of `launch slurm` in the
queue), or a submission that sbatch refuses. The job's own launcher claims
run_dir when it starts (trainer.run_claim).

The options of the launcher inside the job are the forwarded ones of the table
in launch.options; they are written into the script with `to_argv`.
"""

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys

from data_pipeline.arguments import ArgumentParser
from data_pipeline.metadata import DataError
from launch.cli import report_bad_input
from launch.command import LaunchError, tensorboard_command
from launch.options import add_config_options, add_options, to_argv, unsafe_value
from launch.slurm import SQUEUE_FORMAT, SlurmOptions, build_script, queued_job, tasks_per_node
from launch.slurm import validate as validate_slurm
from trainer.checkpoint import CheckpointError
from trainer.config import ConfigError, check_environment, load_config, validate, validate_world
from trainer.data_spec import check_model_build, check_start
from trainer.run_claim import RunClaimError
from trainer.run_claim import check as check_claim

DESCRIPTION = "Write an sbatch script that runs `python -m launch run` in the allocation, and submit it."


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_options(p)
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--ntasks-per-node", type=int, help="ranks per node (default: --gpus-per-node, or 1)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node, one rank each")
    p.add_argument("--cpus-per-task", type=int, default=1, help="cores per rank (default 1)")
    p.add_argument("--time", default="01:00:00", help="time limit (default 01:00:00)")
    p.add_argument("--partition", help="Slurm partition")
    p.add_argument("--account", help="Slurm account")
    p.add_argument("--qos", help="Slurm QoS")
    p.add_argument("--job-name", help="job name (default: the config file's name)")
    p.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="shell line run first in the job, e.g. 'module load cuda' (repeatable)")
    p.add_argument("--venv", help="virtual environment activated in the job")
    p.add_argument("--python", help="interpreter in the job (default: this one, or `python` of --venv)")
    p.add_argument("--no-requeue", dest="requeue", action="store_false",
                   help="neither requeue at the time limit nor let Slurm requeue the job")
    # The launcher's options that the job's launcher gets too; among them
    # --signal-grace-sec, which also sets how early Slurm warns (see launch.slurm).
    add_options(p, forwarded_only=True)
    p.add_argument("--tensorboard-host", default="127.0.0.1",
                   help="address in the printed TensorBoard command (default loopback)")
    p.add_argument("--no-data-check", dest="data_check", action="store_false",
                   help="do not look for data.dir on this host (it exists only on the compute nodes); "
                        "the workers check it at start")
    p.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")


def parse_args(argv) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m launch slurm", description=DESCRIPTION)
    add_arguments(p)
    return p.parse_args(argv)


def default_job_name(config: str) -> str:
    stem = os.path.splitext(os.path.basename(config))[0]
    return re.sub(r"[^A-Za-z0-9_.+\-]", "_", stem)[:128] or "train"


def options_from_args(args: argparse.Namespace, run_dir: str) -> SlurmOptions:
    python = args.python or ("python" if args.venv else sys.executable)
    return SlurmOptions(
        config=os.path.abspath(args.config), overrides=tuple(args.overrides), run_dir=os.path.abspath(run_dir),
        workdir=os.getcwd(), python=python, nodes=args.nodes, ntasks_per_node=args.ntasks_per_node,
        gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task, time=args.time,
        partition=args.partition, account=args.account, qos=args.qos,
        job_name=args.job_name if args.job_name is not None else default_job_name(args.config),
        setup=tuple(args.setup), venv=os.path.abspath(args.venv) if args.venv else None,
        signal_grace_sec=args.signal_grace_sec, requeue=args.requeue, launcher_args=tuple(to_argv(args)),
    )


def check_partition(partition: str) -> None:
    if not shutil.which("scontrol"):
        raise LaunchError(f"--partition {partition!r}: scontrol is not on PATH, so the partition cannot be checked")
    res = subprocess.run(["scontrol", "-o", "show", "partition"], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise LaunchError(f"scontrol show partition failed: {res.stderr.strip()}")
    known = re.findall(r"PartitionName=(\S+)", res.stdout)
    for name in partition.split(","):
        if name not in known:
            raise LaunchError(f"--partition {name!r} is not a partition of this cluster ({', '.join(known) or 'none'})")


def check_run_dir_free(run_dir: str, shown: str) -> None:
    """No second job for a run folder that a live job holds (its claim), or that has a job in the queue.

    A queued job does not hold the claim yet: its launcher takes it when the job starts.
    """
    check_claim(shown)
    if not shutil.which("squeue"):
        return
    res = subprocess.run(["squeue", "-h", "--me", "-o", SQUEUE_FORMAT], capture_output=True, text=True, check=False)
    job = queued_job(res.stdout, run_dir) if res.returncode == 0 else None
    if job:
        raise LaunchError(f"run_dir {shown!r} is in use by Slurm job {job[0]} ({job[1]}), submitted with "
                          f"{job[2]}; cancel it first (scancel {job[0]}), or use another run_dir")


def submit(script_path: str) -> str:
    res = subprocess.run(["sbatch", "--parsable", script_path], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
        raise LaunchError(f"sbatch refused the job: {lines[-1] if lines else 'exit code ' + str(res.returncode)}")
    return res.stdout.strip().split(";")[0]


def run(args: argparse.Namespace) -> int:
    try:
        refusal = unsafe_value(args)  # the job's launcher would refuse it only after the job got its nodes
        if refusal:
            raise LaunchError(refusal)
        cfg = load_config(args.config, args.overrides)
        validate(cfg)
        if args.data_check:
            check_environment(cfg)
            # reads the data's metadata.json, as the workers will; builds model.builder's model
            check_model_build(cfg, check_start(cfg))
        opts = options_from_args(args, cfg.run_dir)
        validate_slurm(opts)
        validate_world(cfg, opts.nodes * tasks_per_node(opts))
        script = build_script(opts)
        if args.dry_run:
            print(script, end="")
            return 0
        check_run_dir_free(opts.run_dir, cfg.run_dir)
        if not shutil.which("sbatch"):
            raise LaunchError("sbatch is not installed here (run this on a Slurm login node, or use --dry-run)")
        if opts.partition:
            check_partition(opts.partition)
        log_dir = os.path.join(opts.run_dir, "slurm")
        os.umask(0o027)  # as the trainer: the run directory is for owner and group only
        # Slurm does not create the folder of --output; without it the job fails before it starts.
        script_path = os.path.join(log_dir, f"{opts.job_name}.sbatch")
        try:
            os.makedirs(log_dir, mode=0o750, exist_ok=True)
            with open(script_path, "w", encoding="utf-8") as f:
                f.write(script)
        except OSError as e:
            raise LaunchError(f"run_dir {cfg.run_dir!r}: cannot write {e.filename or script_path!r}: "
                              f"{e.strerror or e}") from None
        job_id = submit(script_path)
    except (DataError, CheckpointError, ConfigError, LaunchError, RunClaimError) as e:
        return report_bad_input(e)
    print(f"submitted Slurm job {job_id} ({script_path})")
    print(f"log: {os.path.join(log_dir, f'{opts.job_name}-{job_id}.out')} (stderr: .err)")
    board = tensorboard_command(None, os.path.join(opts.run_dir, "tensorboard"), host=args.tensorboard_host)
    print(f"watch: {shlex.join(board)}")
    return 0


def main(argv=None) -> int:
    """`launch slurm` alone; launch.main is the entry point that also knows `launch run`."""
    return run(parse_args(sys.argv[1:] if argv is None else list(argv)))

"""`python -m launch`: one entry point for the launcher's commands.

    python -m launch run --np 2 --config FILE ...   start the workers (horovodrun, or srun in a Slurm job)
    python -m launch slurm --config FILE ...        write the sbatch script for a run and submit it
    python -m launch plan --config FILE --nodes N ...  predict step time and efficiency on a cluster
    python -m launch --np 2 --config FILE ...       `run`: the form `make run` and sbatch scripts use

This module only dispatches: launch.cli is `run`, launch.slurm_cli is `slurm`
and launch.plan is `plan`; `run` and `slurm` do not import each other, and the
options they share are launch.options.
"""

import argparse
import sys

from data_pipeline.arguments import ArgumentParser
from launch import cli, plan, slurm_cli

COMMANDS = ("run", "slurm", "plan")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m launch", description="Data-parallel training with Horovod: start it here, or on Slurm.",
        epilog="Without a command, the options are run's: python -m launch --np 2 --config configs/digits.yaml")
    sub = p.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)
    run = sub.add_parser("run", help="start the workers with horovodrun (or srun inside a Slurm allocation)",
                         description=cli.DESCRIPTION)
    cli.add_arguments(run)
    run.set_defaults(func=cli.run)
    slurm = sub.add_parser("slurm", help="write an sbatch script for the run and submit it",
                           description=slurm_cli.DESCRIPTION)
    slurm_cli.add_arguments(slurm)
    slurm.set_defaults(func=slurm_cli.run)
    planner = sub.add_parser("plan", help="predict the step time, images/s and scaling efficiency on a cluster, "
                             "and what to set", description=plan.DESCRIPTION)
    plan.add_arguments(planner)
    planner.set_defaults(func=plan.run)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    # A first word that is no command (`--np`, `--config`, ...) starts the options of `run`,
    # which keeps every command line written before the subcommands working, sbatch scripts included.
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    return build_parser().parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else [str(a) for a in argv])
    return args.func(args)

"""Starts data-parallel workers: `python -m launch run ...` here, `python -m launch slurm ...` on Slurm.

launch.main dispatches to launch.cli (run) and launch.slurm_cli (slurm); both
read their shared options from launch.options and build commands with the pure
builders launch.command and launch.slurm.
"""

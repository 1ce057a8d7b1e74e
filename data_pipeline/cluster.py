"""The converter's process group: one process, or the ranks of an MPI job.

Under `mpirun` or `srun` the converter splits shards between ranks. MPI is
only imported when the environment says the process was started by an MPI
launcher (or when asked), so a plain run never touches it.
"""

import os
from dataclasses import dataclass
from typing import Any

from data_pipeline.metadata import DataError

# Set by Open MPI's mpirun, by PMI-2 (srun --mpi=pmi2, MPICH, Intel MPI) and by PMIx (srun --mpi=pmix).
_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")
_LOCAL_SIZE_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE")


def _size_var(var: str) -> int:
    value = os.environ.get(var, "").strip() or "1"
    if not (value.isascii() and value.isdigit()):  # int() fails on some isdigit() text, such as '²'
        raise DataError(f"{var}={os.environ[var]!r} is not a number of ranks")
    return int(value)


def launched_by_mpi() -> bool:
    return any(_size_var(v) > 1 for v in _SIZE_VARS) or "PMIX_RANK" in os.environ


def local_size() -> int:
    """Ranks on this host, to share its cores between them."""
    for var in _LOCAL_SIZE_VARS:
        value = os.environ.get(var, "")
        if value.isascii() and value.isdigit() and int(value) > 0:
            return int(value)
    return 1


@dataclass
class Group:
    """rank/size plus the three collectives the converter needs; trivial for one process."""

    rank: int = 0
    size: int = 1
    comm: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def bcast(self, value):
        return self.comm.bcast(value, root=0) if self.comm else value

    def gather(self, value) -> list | None:
        return self.comm.gather(value, root=0) if self.comm else [value]

    def barrier(self) -> None:
        if self.comm:
            self.comm.Barrier()


def make_group(mode: str) -> Group:
    """mode: "auto" (MPI when launched by mpirun/srun), "yes" or "no"."""
    if mode == "no" or (mode == "auto" and not launched_by_mpi()):
        return Group()
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise DataError(f"--mpi {mode}: mpi4py cannot be imported ({e})") from None
    comm = MPI.COMM_WORLD
    return Group(comm.Get_rank(), comm.Get_size(), comm if comm.Get_size() > 1 else None)

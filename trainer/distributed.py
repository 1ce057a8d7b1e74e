"""The distributed context: built once per process and passed down.

The order follows Horovod's own examples: init, pin the device (GPU by local
rank) or the thread pools (CPU), and only then let TensorFlow build anything.
"""

import hashlib
import logging
import os
from dataclasses import dataclass, replace

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf

from trainer import cpu_binding

log = logging.getLogger(__name__)


def collective_failed(error: tf.errors.OpError) -> bool:
    """Whether a TensorFlow op error was raised by a Horovod collective (a rank died or left, or Horovod shut down).

    A lost peer surfaces in many error classes (UnknownError, InternalError
    ...), always from an op named after Horovod or with Horovod's words.
    """
    return "Horovod" in (error.message or "")


def threads_per_rank(local_size: int, cpus: int | None = None) -> int:
    """Cores of this machine divided between the ranks that run on it."""
    cpus = cpus if cpus is not None else len(os.sched_getaffinity(0))
    return max(1, cpus // max(1, local_size))


def bind_local_ranks(cpu_host: bool) -> str | None:
    """On CPU hosts, each local rank's threads on its own share of the cores its host's ranks share (cpu_binding).

    A collective: every rank calls it. GPU ranks take part without binding:
    where their CPU threads belong depends on the GPU's socket, which the
    launcher knows (srun --cpu-bind, mpirun --bind-to). Returns every rank's
    cores, read back from the kernel (`0: 0-3; 1: 4-7`), or None where nothing was bound.
    """
    placements = hvd.allgather_object(cpu_binding.placement(cpu_host), name="bind_cores.placements")
    if not cpu_binding.any_share(placements):
        return None
    mine = cpu_binding.share(placements, hvd.rank())
    if mine:
        cpu_binding.bind_process(mine)
    cores = cpu_binding.format_cores(cpu_binding.process_cores())
    everyone = hvd.allgather_object(cores, name="bind_cores.result")
    return "; ".join(f"{r}: {c}" for r, c in enumerate(everyone))


def gpu_for_local_rank(gpus: list, local_rank: int):
    """One GPU per process, chosen by local rank, as in Horovod's examples.

    With more local ranks than GPUs (a misconfigured job) ranks share GPUs
    round-robin rather than all landing on GPU 0.
    """
    return gpus[local_rank % len(gpus)]


@dataclass(frozen=True)
class DistContext:
    """Rank, local rank, world size, and collectives on host values."""

    rank: int
    local_rank: int
    size: int
    local_size: int
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    gpu: str | None = None
    elastic: bool = False
    cores_per_rank: str | None = None  # where runtime.bind_cores bound the ranks (log_binding)

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    @classmethod
    def initialize(cls, intra_op_threads: int = 0, inter_op_threads: int = 0,
                   bind_cores: str = "none") -> "DistContext":
        """Initialises Horovod and pins this process's device or CPU threads.

        Must run before TensorFlow creates its runtime: device visibility and
        thread pools cannot be changed after that. bind_cores "auto": see bind_local_ranks.
        """
        hvd.init()
        gpus = tf.config.list_physical_devices("GPU")
        gpu = None
        if gpus:
            mine = gpu_for_local_rank(gpus, hvd.local_rank())
            tf.config.set_visible_devices(mine, "GPU")
            tf.config.experimental.set_memory_growth(mine, True)
            gpu = mine.name
        else:
            # N ranks on one host would each default to all its cores; give each its share.
            share = threads_per_rank(hvd.local_size())
            intra_op_threads = intra_op_threads or share
            inter_op_threads = inter_op_threads or share
            tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
            tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
        # horovodrun --min-np/--max-np starts workers with this set.
        elastic = os.environ.get("HOROVOD_ELASTIC") == "1"
        # The same on every rank (config, world size, elastic), as the collectives in it need.
        bound = bind_local_ranks(gpu is None) if bind_cores == "auto" and hvd.size() > 1 and not elastic else None
        return cls(
            rank=hvd.rank(),
            local_rank=hvd.local_rank(),
            size=hvd.size(),
            local_size=hvd.local_size(),
            intra_op_threads=intra_op_threads,
            inter_op_threads=inter_op_threads,
            gpu=gpu,
            elastic=elastic,
            cores_per_rank=bound,
        )

    def log_binding(self, logger: logging.Logger) -> None:
        """Logs where runtime.bind_cores put every rank (once logging is set up), if it bound them."""
        if self.cores_per_rank:
            logger.info("CPU cores per rank (runtime.bind_cores=auto): %s", self.cores_per_rank)

    @property
    def input_threads(self) -> int:
        """Threads for this rank's input pipeline: the same share of the cores as its TensorFlow threads.

        intra_op_threads is 0 on GPU hosts, where TensorFlow keeps its defaults.
        """
        return self.intra_op_threads or threads_per_rank(self.local_size)

    def refreshed(self) -> "DistContext":
        """This context after an elastic reset: rank and sizes change, devices and threads do not."""
        return replace(self, rank=hvd.rank(), local_rank=hvd.local_rank(), size=hvd.size(),
                       local_size=hvd.local_size())

    # Collectives below are eager and walk their inputs in a fixed order: every
    # rank must issue the same collectives, with the same names, in the same order.

    def broadcast_variables(self, variables, name: str) -> None:
        """Overwrites `variables` on every rank with rank 0's values."""
        for i, v in enumerate(variables):
            v.assign(hvd.broadcast(v.value, root_rank=0, name=f"{name}.{i}"))

    def average_scalars(self, values: dict[str, float], name: str) -> dict[str, float]:
        """Mean over ranks of a dict of numbers; every rank must pass the same keys."""
        return self._reduce_scalars(values, name, hvd.Average)

    def sum_scalars(self, values: dict[str, float], name: str) -> dict[str, float]:
        """Sum over ranks of a dict of numbers (float64: counts stay exact); same keys on every rank."""
        return self._reduce_scalars(values, name, hvd.Sum)

    def max_scalars(self, values: dict[str, float], name: str) -> dict[str, float]:
        """Maximum over ranks of a dict of numbers; same keys on every rank."""
        return self._reduce_scalars(values, name, hvd.Max)

    def sum_array(self, values: np.ndarray, name: str) -> np.ndarray:
        """Element-wise float64 sum over ranks of an array of the same shape on every rank."""
        return hvd.allreduce(tf.constant(values, tf.float64), op=hvd.Sum, name=name).numpy()

    @staticmethod
    def _reduce_scalars(values: dict[str, float], name: str, op) -> dict[str, float]:
        keys = sorted(values)
        local = tf.constant([float(values[k]) for k in keys], dtype=tf.float64)
        reduced = hvd.allreduce(local, op=op, name=name).numpy()
        return {k: float(x) for k, x in zip(keys, reduced)}

    def broadcast_object(self, obj, name: str):
        """Rank 0's picklable `obj` on every rank (small values only)."""
        return hvd.broadcast_object(obj, root_rank=0, name=name)

    def allgather_object(self, obj, name: str) -> list:
        return hvd.allgather_object(obj, name=name)


def weights_digest(variables) -> str:
    """A short hash of variable values, to compare replicas across ranks."""
    h = hashlib.sha256()
    for v in variables:
        h.update(np.ascontiguousarray(np.asarray(v.numpy())).tobytes())
    return h.hexdigest()[:16]

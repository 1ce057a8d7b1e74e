"""The allreduce cost model: what a step costs when gradients cross a network. Pure Python.

Horovod's allreduce between hosts is a flat ring over all p = nodes x GPUs
ranks (ordered by host), so one allreduce of S bytes takes

    T(S) = fixed + 2(p-1)·a + 2(p-1)/p · S/B

with a the link's latency and B its bandwidth (bytes/s): the ring passes
2(p-1) messages in turn, and each node's NIC carries one ring link out,
2(p-1)/p·S bytes. `fixed` is Horovod's own time per allreduce, assumed to be
half a cycle time (the gradients are ready at any moment of a cycle) plus one
negotiation among the ranks (a gather and a broadcast, 2·ceil(log2 p)·a); the
`network` benchmark fits the real constant.

The trainer's step (trainer/step.py, `_allreduce`) does one grouped allreduce
after the backward passes of all its micro-batches: the gradients (float32,
as the variables are under mixed precision too), the float state (BatchNorm
moving statistics) and two float32 scalars (loss, stop flag). Nothing
overlaps it: a step is compute + communication. With
`allreduce.fp16_compression` the gradients go as float16 in a grouped
allreduce of their own; Horovod fuses only tensors of one dtype, so that is
two allreduces at least. Fusion packs whole ready tensors of one dtype into
allreduces of at most the fusion threshold (horovod/common/controller.cc,
FuseResponses), so S bytes become about ceil(S/threshold) allreduces run one
after another, each with its fixed and latency terms.
"""

import math
from dataclasses import dataclass, field

from launch.units import parse_bandwidth, parse_duration  # noqa: F401 (part of this interface)

MIB = 1024 * 1024
# Horovod's own fusion threshold when none is set: 128 MiB (horovod/common/operations.cc,
# BackgroundThreadLoop: `SetTensorFusionThresholdBytes(128 * 1024 * 1024)`; its docs still say 64 MB).
HOROVOD_FUSION_THRESHOLD = 128 * MIB
SCALAR_BYTES = 8  # the loss and the stop flag, two float32 scalars in every step's allreduce
TARGET_EFFICIENCY = 0.9
MAX_ACCUMULATION = 4096

@dataclass(frozen=True)
class AllreduceTerms:
    """The terms of T = fixed + 2(p-1)·a + 2(p-1)/p·S/B, in seconds, summed over `count` allreduces."""

    fixed: float
    latency: float
    bandwidth: float
    count: int = 1

    @property
    def total(self) -> float:
        return self.fixed + self.latency + self.bandwidth


def allreduce_terms(nbytes: float, ranks: int, latency_s: float, bandwidth_Bps: float, fixed_s: float = 0.0,
                    count: int = 1) -> AllreduceTerms:
    """`count` ring allreduces one after another that carry `nbytes` in all; all zero for one rank."""
    if ranks <= 1:
        return AllreduceTerms(0.0, 0.0, 0.0, 0)
    return AllreduceTerms(count * fixed_s, count * 2 * (ranks - 1) * latency_s,
                          2 * (ranks - 1) / ranks * nbytes / bandwidth_Bps, count)


def ring_allreduce_seconds(nbytes: float, ranks: int, latency_s: float, bandwidth_Bps: float,
                           fixed_s: float = 0.0) -> float:
    """fixed_s + 2(p-1)·latency + 2(p-1)/p · nbytes/bandwidth; 0 for one rank."""
    return allreduce_terms(nbytes, ranks, latency_s, bandwidth_Bps, fixed_s).total


def horovod_fixed_seconds(cycle_time_s: float, ranks: int, latency_s: float) -> float:
    """The assumed per-allreduce constant: half a cycle's wait plus a negotiation (gather + broadcast)."""
    if ranks <= 1:
        return 0.0
    return cycle_time_s / 2 + 2 * math.ceil(math.log2(ranks)) * latency_s


def fusion_chunks(nbytes: float, threshold_bytes: float, tensors: int = 1) -> int:
    """Allreduces a message of `nbytes` in `tensors` tensors becomes: ceil(S/threshold); threshold 0: one per tensor."""
    if nbytes <= 0:
        return 0
    if threshold_bytes <= 0:
        return max(tensors, 1)
    return max(math.ceil(nbytes / threshold_bytes), 1)


def step_seconds(compute_s: float, comm_s: float) -> float:
    """A step of the trainer: its compute, then its allreduce; they do not overlap."""
    return compute_s + comm_s


@dataclass(frozen=True)
class ModelBytes:
    """What a model puts in every step's allreduce (trainer/step.py).

    Attributes:
      trainable_params: numbers in the trainable variables (one gradient each).
      trainable_bytes: their bytes as the variables hold them (float32).
      state_bytes: the non-trainable float variables' bytes (BatchNorm moving statistics).
      trainable_tensors, state_tensors: how many variables of each kind.
    """

    trainable_params: int
    trainable_bytes: int
    state_bytes: int
    trainable_tensors: int = 1
    state_tensors: int = 0

    def gradient_bytes(self, fp16: bool) -> int:
        return self.trainable_params * 2 if fp16 else self.trainable_bytes

    def message_bytes(self, fp16: bool) -> int:
        """Bytes each rank allreduces per step: gradients, state and the two scalars."""
        return self.gradient_bytes(fp16) + self.state_bytes + SCALAR_BYTES


@dataclass(frozen=True)
class Cluster:
    """The machines and their network: nodes x GPUs per node, one link per node."""

    nodes: int
    gpus_per_node: int
    bandwidth_Bps: float
    latency_s: float

    @property
    def ranks(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Settings:
    """The trainer's and Horovod's knobs that change a step's cost.

    Attributes:
      fp16: allreduce.fp16_compression.
      accumulation_steps: train.accumulation_steps (micro-batches per step, one allreduce).
      fusion_threshold_bytes: Horovod's fusion threshold (launch --fusion-threshold-mb); 0 disables fusion.
      cycle_time_s: Horovod's cycle time (launch --cycle-time-ms).
      fixed_s: the per-allreduce constant; None: horovod_fixed_seconds of the cycle time.
    """

    fp16: bool = False
    accumulation_steps: int = 1
    fusion_threshold_bytes: float = HOROVOD_FUSION_THRESHOLD
    cycle_time_s: float = 0.005
    fixed_s: float | None = None


@dataclass(frozen=True)
class Prediction:
    """One step of data-parallel training on a cluster, as the model predicts it (seconds, bytes, images).

    `network` is False on one node: nothing crosses a network, and the
    transfer between the GPUs of the node (NVLink, PCIe, shared memory) is
    not modelled, so comm_s is 0 there. `compute_s` is the whole step's
    (all its micro-batches); `efficiency` is the step's throughput against
    `ranks` GPUs each training alone: compute / (compute + comm).
    """

    ranks: int
    network: bool
    gradient_bytes: int
    message_bytes: int
    allreduces: int
    fixed_s: float
    terms: AllreduceTerms
    compute_s: float
    comm_s: float
    step_s: float
    global_batch: int
    images_per_sec: float
    efficiency: float
    settings: Settings = field(default_factory=Settings)


def communication(model: ModelBytes, cluster: Cluster, settings: Settings) -> tuple[AllreduceTerms, float]:
    """(the terms of a step's allreduces summed, the fixed constant of one) over the network."""
    p = cluster.ranks
    fixed = settings.fixed_s if settings.fixed_s is not None else \
        horovod_fixed_seconds(settings.cycle_time_s, p, cluster.latency_s)
    grads = model.gradient_bytes(settings.fp16)
    extra = model.state_bytes + SCALAR_BYTES
    threshold = settings.fusion_threshold_bytes
    if settings.fp16:  # two dtypes: two grouped allreduces, fused apart
        count = fusion_chunks(grads, threshold, model.trainable_tensors) + \
            fusion_chunks(extra, threshold, model.state_tensors + 2)
    else:
        count = fusion_chunks(grads + extra, threshold, model.trainable_tensors + model.state_tensors + 2)
    return allreduce_terms(grads + extra, p, cluster.latency_s, cluster.bandwidth_Bps, fixed, count), fixed


def predict(model: ModelBytes, compute_s: float, cluster: Cluster, per_replica_batch: int,
            settings: Settings = Settings()) -> Prediction:
    """A step on `cluster`; `compute_s` is one GPU's forward and backward pass of one micro-batch of
    `per_replica_batch` images, so a step computes for accumulation_steps x compute_s."""
    k = settings.accumulation_steps
    network = cluster.nodes > 1
    terms, fixed = communication(model, cluster, settings)
    if not network:
        terms = AllreduceTerms(0.0, 0.0, 0.0, terms.count)
    compute = k * compute_s
    step = step_seconds(compute, terms.total)
    batch = per_replica_batch * k * cluster.ranks
    return Prediction(
        ranks=cluster.ranks, network=network, gradient_bytes=model.gradient_bytes(settings.fp16),
        message_bytes=model.message_bytes(settings.fp16), allreduces=terms.count, fixed_s=fixed, terms=terms,
        compute_s=compute, comm_s=terms.total, step_s=step, global_batch=batch, images_per_sec=batch / step,
        efficiency=compute / step, settings=settings)


@dataclass(frozen=True)
class Recommendation:
    """What one knob buys: its setting and the step predicted with it (None: nothing to change)."""

    knob: str
    setting: str
    prediction: Prediction | None
    note: str


def smallest_accumulation(model: ModelBytes, compute_s: float, cluster: Cluster, per_replica_batch: int,
                          settings: Settings, target: float = TARGET_EFFICIENCY) -> int | None:
    """The smallest accumulation_steps k >= the current one whose predicted efficiency reaches `target`."""
    def efficiency(k: int) -> float:
        s = Settings(settings.fp16, k, settings.fusion_threshold_bytes, settings.cycle_time_s, settings.fixed_s)
        return predict(model, compute_s, cluster, per_replica_batch, s).efficiency

    k = settings.accumulation_steps
    if efficiency(k) >= target:
        return k
    comm = predict(model, compute_s, cluster, per_replica_batch, settings).comm_s
    # k·c / (k·c + comm) >= target  <=>  k >= target/(1-target) · comm/c; then step to the exact k.
    k = min(max(k, math.ceil(target / (1 - target) * comm / compute_s)), MAX_ACCUMULATION)
    while k < MAX_ACCUMULATION and efficiency(k) < target:
        k += 1
    while k > settings.accumulation_steps and efficiency(k - 1) >= target:
        k -= 1
    return k if efficiency(k) >= target else None


def _with(settings: Settings, **changes) -> Settings:
    return Settings(**{**settings.__dict__, **changes})


def recommend(model: ModelBytes, compute_s: float, cluster: Cluster, per_replica_batch: int,
              settings: Settings = Settings()) -> list[Recommendation]:
    """fp16 compression, the accumulation that reaches 90% efficiency (with and without fp16), the fusion threshold."""
    args = (model, compute_s, cluster, per_replica_batch)
    recs = []
    if settings.fp16:
        recs.append(Recommendation("fp16 compression", "allreduce.fp16_compression=true", None, "already on"))
    else:
        recs.append(Recommendation("fp16 compression", "--set allreduce.fp16_compression=true",
                                   predict(*args, _with(settings, fp16=True)), "gradient bytes halved"))
    for fp16 in (settings.fp16, True) if not settings.fp16 else (True,):
        base = _with(settings, fp16=fp16)
        k = smallest_accumulation(*args, base)
        sets = f"--set train.accumulation_steps={k}" + (" --set allreduce.fp16_compression=true"
                                                        if fp16 and not settings.fp16 else "")
        name = "accumulation" + (" + fp16" if fp16 and not settings.fp16 else "")
        if k is None:
            recs.append(Recommendation(name, "", None, f"{TARGET_EFFICIENCY:.0%} not reached with "
                                       f"{MAX_ACCUMULATION} micro-batches per step"))
        elif k == settings.accumulation_steps and fp16 == settings.fp16:
            recs.append(Recommendation(name, "", None, f"not needed: {TARGET_EFFICIENCY:.0%} reached already"))
        else:
            p = predict(*args, _with(base, accumulation_steps=k))
            recs.append(Recommendation(name, sets, p, f"{p.global_batch:,} images per step, the same memory "
                                       "per micro-batch; the learning rate scales with it"))
    recs.append(_fusion(model, cluster, settings, args))
    return recs


def _fusion(model: ModelBytes, cluster: Cluster, settings: Settings, args: tuple) -> Recommendation:
    now = predict(*args, settings)
    least = 2 if settings.fp16 else 1  # one allreduce per dtype cannot be fused further
    if now.allreduces <= least:
        return Recommendation("fusion threshold", "", None,
                              f"not needed: {least} allreduce{'s' if least > 1 else ''} per step already")
    mb = math.ceil(max(model.gradient_bytes(settings.fp16) + (0 if settings.fp16 else model.state_bytes
                                                              + SCALAR_BYTES), 1) / MIB)
    return Recommendation("fusion threshold", f"--fusion-threshold-mb {mb}",
                          predict(*args, _with(settings, fusion_threshold_bytes=mb * MIB)),
                          f"{least} allreduce{'s' if least > 1 else ''} per step instead of {now.allreduces}")

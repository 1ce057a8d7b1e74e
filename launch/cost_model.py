"""The allreduce cost model: what a step costs when gradients cross a network. Pure Python.

Horovod's allreduce between hosts is a flat ring over all p = nodes x GPUs
ranks (ordered by host), so one allreduce of S bytes takes

    T(S) = fixed + 2(p-1)·a + 2(p-1)/p · S/B

with a the link's latency and B its bandwidth (bytes/s): the ring passes
2(p-1) messages in turn, and each node's NIC carries one ring link out,
2(p-1)/p·S bytes. `fixed` is Horovod's own time: a negotiation (gather and broadcast, 2·ceil(log2 p)·a),
plus half a cycle where Horovod sleeps out its cycle (MPI); under Gloo the launcher wakes it on enqueue
(our patch's HOROVOD_WAKE_ON_ENQUEUE). The `network` benchmark fits the real constant.

The trainer's step (trainer/step.py, `_allreduce`) does one grouped allreduce
after the backward passes of all its micro-batches: the gradients (float32,
as the variables are under mixed precision too), the float state (BatchNorm
moving statistics) and two float32 scalars (loss, stop flag). Nothing
overlaps it: a step is compute + communication. With
`allreduce.fp16_compression` the gradients go as float16 in a grouped
allreduce of their own, and Horovod fuses only tensors of one dtype. Fusion
packs whole tensors into allreduces of at most the fusion threshold, which
run one after another in the cycle: each adds its ring latency, the cycle's
fixed time is paid once.
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
                    count: int = 1, per_allreduce_s: float = 0.0) -> AllreduceTerms:
    """`count` ring allreduces carrying `nbytes` in all, run one after another in one Horovod cycle: its
    `fixed_s` once (the background loop negotiates all ready tensors once per cycle, then runs that cycle's
    fused allreduces in turn: horovod/common/operations.cc, RunLoopOnce), and per allreduce its ring
    latency and `per_allreduce_s`. All zero for one rank."""
    if ranks <= 1:
        return AllreduceTerms(0.0, 0.0, 0.0, 0)
    return AllreduceTerms(fixed_s + count * per_allreduce_s, count * 2 * (ranks - 1) * latency_s,
                          2 * (ranks - 1) / ranks * nbytes / bandwidth_Bps, count)


def ring_allreduce_seconds(nbytes: float, ranks: int, latency_s: float, bandwidth_Bps: float,
                           fixed_s: float = 0.0) -> float:
    """fixed_s + 2(p-1)·latency + 2(p-1)/p · nbytes/bandwidth; 0 for one rank."""
    return allreduce_terms(nbytes, ranks, latency_s, bandwidth_Bps, fixed_s).total


def horovod_fixed_seconds(cycle_time_s: float, ranks: int, latency_s: float, wake_on_enqueue: bool = True) -> float:
    """The assumed constant of a cycle: a negotiation (gather + broadcast), and half a cycle's wait without wake."""
    if ranks <= 1:
        return 0.0
    return (0.0 if wake_on_enqueue else cycle_time_s / 2) + 2 * math.ceil(math.log2(ranks)) * latency_s


def fusion_chunks(nbytes: float, threshold_bytes: float, tensors: int | None = None) -> int:
    """Allreduces a message of `nbytes` becomes when its tensors' sizes are not known: ceil(S/threshold),
    at most one per tensor (a tensor is never split); threshold 0: one per tensor."""
    if nbytes <= 0:
        return 0
    if threshold_bytes <= 0:
        return max(tensors or 1, 1)
    chunks = max(math.ceil(nbytes / threshold_bytes), 1)
    return min(chunks, tensors) if tensors else chunks


def fused_allreduces(tensor_bytes, threshold_bytes: float) -> int:
    """Allreduces Horovod fuses tensors of one dtype into, in their order: each takes the next tensors while
    they fit in the threshold, and at least one (horovod/common/controller.cc, FuseResponses)."""
    count, size = 0, None
    for nbytes in tensor_bytes:
        if size is not None and size + nbytes <= threshold_bytes:
            size += nbytes
        else:
            count, size = count + 1, nbytes
    return count


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
      trainable_tensor_bytes, state_tensor_bytes: each variable's bytes, in
        the order of the allreduce; empty: fusion is estimated from the totals.
    """

    trainable_params: int
    trainable_bytes: int
    state_bytes: int
    trainable_tensors: int = 1
    state_tensors: int = 0
    trainable_tensor_bytes: tuple[int, ...] = ()
    state_tensor_bytes: tuple[int, ...] = ()

    def allreduces(self, fp16: bool, threshold_bytes: float) -> int:
        """How many allreduces Horovod's fusion makes of a step's message."""
        scalars = (SCALAR_BYTES // 2,) * 2
        if not self.trainable_tensor_bytes:
            grads, extra = self.gradient_bytes(fp16), self.state_bytes + SCALAR_BYTES
            if fp16:  # two dtypes: two grouped allreduces, fused apart
                return fusion_chunks(grads, threshold_bytes, self.trainable_tensors) + \
                    fusion_chunks(extra, threshold_bytes, self.state_tensors + 2)
            return fusion_chunks(grads + extra, threshold_bytes, self.trainable_tensors + self.state_tensors + 2)
        extra = (*self.state_tensor_bytes, *scalars)
        if fp16:
            grads = tuple(b // 2 for b in self.trainable_tensor_bytes)
            return fused_allreduces(grads, threshold_bytes) + fused_allreduces(extra, threshold_bytes)
        return fused_allreduces((*self.trainable_tensor_bytes, *extra), threshold_bytes)

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
      wake_on_enqueue: the cycle starts when the gradients are ready (Gloo); False: half a cycle's wait (MPI).
      fixed_s: the constant of a step's cycle (paid once); None: horovod_fixed_seconds of the cycle time.
      per_allreduce_s: the constant of each allreduce of the cycle (0: only its ring latency).
    """

    fp16: bool = False
    accumulation_steps: int = 1
    fusion_threshold_bytes: float = HOROVOD_FUSION_THRESHOLD
    cycle_time_s: float = 0.005
    wake_on_enqueue: bool = True
    fixed_s: float | None = None
    per_allreduce_s: float = 0.0


@dataclass(frozen=True)
class Prediction:
    """A step as the model predicts it. `network` is False on one node, where the transfer between its GPUs
    is not modelled (comm_s 0). `compute_s` is the whole step's (all its micro-batches); `efficiency`, the
    throughput against `ranks` GPUs each training alone: compute / (compute + comm)."""

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
    """(the terms of a step's allreduces summed, the fixed constant of its cycle) over the network."""
    fixed = settings.fixed_s if settings.fixed_s is not None else \
        horovod_fixed_seconds(settings.cycle_time_s, cluster.ranks, cluster.latency_s, settings.wake_on_enqueue)
    count = model.allreduces(settings.fp16, settings.fusion_threshold_bytes)
    terms = allreduce_terms(model.message_bytes(settings.fp16), cluster.ranks, cluster.latency_s,
                            cluster.bandwidth_Bps, fixed, count, settings.per_allreduce_s)
    return terms, fixed


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
        return predict(model, compute_s, cluster, per_replica_batch, _with(settings, accumulation_steps=k)).efficiency

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
    """fp16 compression, the accumulation that reaches 90% efficiency (alone and with fp16), the fusion threshold.

    Nothing on one node, where the model sees no network to save.
    """
    args = (model, compute_s, cluster, per_replica_batch)
    if cluster.nodes == 1:
        return [Recommendation("network", "", None, "one node: no network, nothing to set for it")]
    if settings.fp16:
        recs = [Recommendation("fp16 compression", "", None, "already on (allreduce.fp16_compression)")]
    else:
        recs = [Recommendation("fp16 compression", "--set allreduce.fp16_compression=true",
                               predict(*args, _with(settings, fp16=True)), "gradient bytes halved")]
    if predict(*args, settings).efficiency >= TARGET_EFFICIENCY:
        recs.append(Recommendation("accumulation", "", None, f"not needed: {TARGET_EFFICIENCY:.0%} reached already"))
    else:
        recs.append(_accumulation("accumulation", args, settings, ""))
        if not settings.fp16:
            recs.append(_accumulation("accumulation + fp16", args, _with(settings, fp16=True),
                                      " --set allreduce.fp16_compression=true"))
    recs.append(_fusion(model, cluster, settings, args))
    return recs


def _accumulation(name: str, args: tuple, settings: Settings, also: str) -> Recommendation:
    k = smallest_accumulation(*args, settings)
    if k is None:
        return Recommendation(name, "", None, f"{TARGET_EFFICIENCY:.0%} not reached with {MAX_ACCUMULATION} "
                              "micro-batches per step")
    if k == settings.accumulation_steps:  # only with fp16 (else the target was met, and not asked for)
        return Recommendation(name, "", None, f"not needed: fp16 compression alone reaches {TARGET_EFFICIENCY:.0%}")
    p = predict(*args, _with(settings, accumulation_steps=k))
    return Recommendation(name, f"--set train.accumulation_steps={k}{also}", p,
                          f"{p.global_batch:,} images per step, the same memory per micro-batch; "
                          "the learning rate scales with it")


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

"""What `python -m launch plan` prints: the table people read, or one JSON object for programs."""

import dataclasses
import os
import subprocess
from dataclasses import dataclass

from launch import cost_model as cm


@dataclass(frozen=True)
class Facts:
    """What the plan was made from: the config, its model's counted sizes, the batch, the compute time, the cluster."""

    config: str
    model: str
    input_shape: tuple[int, int, int]
    num_classes: int
    shape_from_data: bool
    sizes: dict
    per_replica_batch: int
    compute_s: float
    measured: bool
    cluster: cm.Cluster


def run_quietly(argv: list[str]) -> subprocess.CompletedProcess:
    """A child run with TensorFlow's start-up logs left out, its output captured."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(argv, capture_output=True, text=True, env=env, check=False)


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.1f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:,.1f} kB"


def _fixed_what(settings) -> str:
    return "Horovod's negotiation" if settings.wake_on_enqueue else "Horovod's cycle wait and negotiation"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.2f} ms"


def _images(per_sec: float) -> str:
    return f"{per_sec:,.0f}" if per_sec >= 100 else f"{per_sec:.3g}"


def _rate(bytes_per_s: float) -> str:
    bits = bytes_per_s * 8
    for unit, scale in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:g} {unit}"
    return f"{bits:g} bit/s"


def _header(f: Facts, p: cm.Prediction) -> list[str]:
    c, s = f.cluster, f.sizes
    shape = "x".join(map(str, f.input_shape))
    where = "" if f.shape_from_data else " (from model.*: the data is not here)"
    k = p.settings.accumulation_steps
    return [
        f"plan: {f.config} on {c.nodes} nodes x {c.gpus_per_node} GPUs = {p.ranks} ranks, "
        f"{_rate(c.bandwidth_Bps)} per node, latency {c.latency_s * 1e6:g} us",
        f"model {f.model}, input {shape}, {f.num_classes} classes{where}",
        f"  {s['trainable_params']:,} trainable parameters: {_mb(p.gradient_bytes)} of "
        f"{'float16' if p.settings.fp16 else 'float32'} gradients ({s['trainable_tensors']} tensors)",
        f"  {s['state_params']:,} float state values (BatchNorm statistics): {_mb(s['state_bytes'])}; "
        f"{cm.SCALAR_BYTES} bytes of scalars",
        f"  allreduced per step: {p.message_bytes:,} bytes = {_mb(p.message_bytes)}, in {p.allreduces} "
        f"allreduce{'s' if p.allreduces != 1 else ''} (fusion threshold "
        f"{p.settings.fusion_threshold_bytes / cm.MIB:g} MiB)",
        f"batch: {f.per_replica_batch} images per GPU x {p.ranks} ranks x accumulation {k} = "
        f"{p.global_batch} per step; fp16 compression {'on' if p.settings.fp16 else 'off'}",
    ]


def _body(f: Facts, p: cm.Prediction) -> list[str]:
    t, k = p.terms, p.settings.accumulation_steps
    how = "measured here at np=1" if f.measured else "given"
    lines = [f"compute per step  {p.compute_s:9.4f} s   ({k} x {f.compute_s:.4f} s, {how})"]
    if p.network:
        lines += [
            f"communication     {p.comm_s:9.4f} s   = fixed {_ms(p.fixed_s)}" + (
                f" + {t.count} x {_ms(p.settings.per_allreduce_s)} = {_ms(t.fixed)}"
                if p.settings.per_allreduce_s else "") + f"  ({_fixed_what(p.settings)})",
            f"{'':31}+ 2(p-1)·a = {t.count} x 2 x {p.ranks - 1} x {f.cluster.latency_s * 1e6:g} us = "
            f"{_ms(t.latency)}",
            f"{'':31}+ 2(p-1)/p·S/B = 2 x {p.ranks - 1}/{p.ranks} x {_mb(p.message_bytes)} / "
            f"{_rate(f.cluster.bandwidth_Bps)} = {_ms(t.bandwidth)}",
        ]
    else:
        lines.append("communication        0 s        one node: no network; the transfer between its GPUs "
                     "(NVLink, PCIe) is not modelled")
    lines += [
        f"step              {p.step_s:9.4f} s   = compute + communication (the allreduce follows the backward pass)",
        f"images/s          {_images(p.images_per_sec):>9}",
        f"efficiency        {p.efficiency:9.1%}   against {p.ranks} GPUs each training alone",
    ]
    return lines


def _advice(recs: list[cm.Recommendation]) -> list[str]:
    lines = [f"recommendations (target {cm.TARGET_EFFICIENCY:.0%} efficiency):"]
    for r in recs:
        if r.prediction is None:
            lines.append(f"  {r.knob:<20} {r.note}")
            continue
        p = r.prediction
        lines.append(f"  {r.knob:<20} {r.setting}")
        lines.append(f"  {'':<20}   efficiency {p.efficiency:.1%}, step {p.step_s:.4f} s, "
                     f"{_images(p.images_per_sec)} images/s: {r.note}")
    return lines


def table(f: Facts, p: cm.Prediction, recs: list[cm.Recommendation]) -> str:
    return "\n".join([*_header(f, p), "", *_body(f, p), "", *_advice(recs)])


def _prediction(p: cm.Prediction) -> dict:
    out = dataclasses.asdict(p)
    out["terms"] = {**out["terms"], "total": p.terms.total}
    return out


def as_json(f: Facts, p: cm.Prediction, recs: list[cm.Recommendation]) -> dict:
    """Every number of the table, for programs (the `network` benchmark)."""
    c = f.cluster
    return {
        "config": f.config, "model": f.model, "input_shape": list(f.input_shape), "num_classes": f.num_classes,
        "shape_from_data": f.shape_from_data, **f.sizes,
        "nodes": c.nodes, "gpus_per_node": c.gpus_per_node, "ranks": c.ranks,
        "bandwidth_bytes_per_sec": c.bandwidth_Bps, "latency_sec": c.latency_s,
        "per_replica_batch": f.per_replica_batch, "compute_per_micro_batch_sec": f.compute_s,
        "compute_measured": f.measured, "prediction": _prediction(p),
        "recommendations": [{"knob": r.knob, "setting": r.setting, "note": r.note,
                             "prediction": None if r.prediction is None else _prediction(r.prediction)}
                            for r in recs],
    }

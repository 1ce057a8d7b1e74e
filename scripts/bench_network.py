"""`make bench ARGS="--only network"`: Horovod and the trainer over emulated links, against the cost model.

Nodes are network namespaces (scripts/emulated_nodes.py) whose egress a tc
token bucket shapes to a rate; Gloo runs between them over TCP, started by
horovodrun over ssh as on a cluster. Needs root. Three parts:

  link        the round trip of one byte between two nodes (TCP ping-pong):
              netem is not in this kernel, so the latency is the link's own.
  allreduce   scripts/allreduce_probe.py, 4 KiB to 256 MiB, at each rate,
              p=2 nodes and p=4 (four nodes, and two nodes x two ranks). The
              ring model T(S) = c + 2(p-1)/p·S/B is fitted by least relative
              squares: B against the tc setting, c (Horovod's per-call
              constant: cycle wait, negotiation, 2(p-1) latencies), and the
              relative error of each point under the fit and under the model
              with B = the tc rate and c from the smallest message.
  trainer     python -m launch --hosts node1:1,node2:1 (one rank a node) at
              each rate, for ResNet-20 (1.1 MB of gradients) and ResNet-50 at
              64 px (102 MB), whose communication/compute ratios span about
              0.05 to 12; each against `python -m launch plan --json` given
              the np=1 step time measured alongside, the tc rate and the
              measured latency. The knobs (fp16 compression, accumulation,
              fusion threshold, cycle time) side by side at one
              communication-bound point, each with its prediction.

Every point holds measured and predicted values and `*_error` = |predicted -
measured| / measured. Results go to bench/results.json under "network".
"""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import ROOT, bench_env, stats, trainer_summary
from emulated_nodes import EmulatedNodes, allreduce_times, ranks_of

PY = sys.executable
SIZES = [4096 * 4 ** i for i in range(9)]  # 4 KiB .. 256 MiB
MAX_CALL_SECONDS = 6.0  # sizes whose bandwidth term alone exceeds this are left out at that rate
CYCLE_MS = 5  # the launcher's cycle where Horovod sleeps it out (MPI; launch.options.CYCLE_MS), as the probe does
SWEEPS = (("node1:1,node2:1", 50e6), ("node1:1,node2:1", 200e6), ("node1:1,node2:1", 1e9),
          ("node1:1,node2:1,node3:1,node4:1", 200e6), ("node1:2,node2:2", 200e6))
MODELS = {
    "resnet20": ("configs/bench_resnet20.yaml", ("data.global_batch_size={n}",), 64, (50e6, 200e6, 1e9)),
    "resnet50_64px": ("configs/bench_resnet50.yaml", ("data.global_batch_size={n}", "model.image_size=64"), 16,
                      (200e6, 1e9)),
}
KNOB_POINT = ("resnet50_64px", 1e9)
# name: (config --set, launcher options, images a step against the default's). Every knob keeps the
# model's micro-batch (data.global_batch_size); accumulation_4 runs four of them a step.
KNOBS = {
    "default": ((), (), 1),
    "fp16_compression": (("allreduce.fp16_compression=true",), (), 1),
    "accumulation_4": (("train.accumulation_steps=4",), (), 4),
    "fusion_16mb": ((), ("--fusion-threshold-mb", "16"), 1),
    "cycle_1ms": ((), ("--cycle-time-ms", "1"), 1),
}
PING = """
import socket, statistics, sys, time
if sys.argv[1] == "serve":
    s = socket.socket(); s.bind((sys.argv[2], 5999)); s.listen(1); print("ready", flush=True)
    c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while (b := c.recv(1)): c.sendall(b)
else:
    c = socket.create_connection((sys.argv[2], 5999)); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for _ in range(500):
        t = time.perf_counter(); c.sendall(b"x"); c.recv(1); rtts.append(time.perf_counter() - t)
    print(statistics.median(rtts))
"""


def round_trip(nodes: EmulatedNodes) -> float:
    """Median TCP round trip of one byte from node1 to node2, in seconds."""
    server = subprocess.Popen(nodes.in_node("node2", [PY, "-c", PING, "serve", nodes.addr["node2"]]),
                              stdout=subprocess.PIPE, text=True)
    try:
        server.stdout.readline()
        res = nodes.run("node1", [PY, "-c", PING, "ping", nodes.addr["node2"]], timeout=60)
        return float(res.stdout.strip())
    finally:
        server.kill()
        server.wait()


def fit_ring(points: list[dict], ranks: int) -> dict:
    """T = c + k·S by least squares on the relative error (weights 1/T²); B = 2(p-1)/p / k, in bits/s."""
    w = [1 / p["seconds"] ** 2 for p in points]
    sw = sum(w)
    sx = sum(wi * p["bytes"] for wi, p in zip(w, points))
    sy = sum(wi * p["seconds"] for wi, p in zip(w, points))
    sxx = sum(wi * p["bytes"] ** 2 for wi, p in zip(w, points))
    sxy = sum(wi * p["bytes"] * p["seconds"] for wi, p in zip(w, points))
    k = (sw * sxy - sx * sy) / (sw * sxx - sx * sx)
    c = (sy - k * sx) / sw
    return {"fixed_s": c, "bandwidth_bps": 8 * 2 * (ranks - 1) / ranks / k}


def sweep(nodes: EmulatedNodes, hosts: str, rate: float) -> dict:
    from launch.cost_model import ring_allreduce_seconds

    ranks = ranks_of(hosts)
    sizes = [s for s in SIZES if 2 * (ranks - 1) / ranks * s * 8 / rate <= MAX_CALL_SECONDS]
    nodes.shape(rate)
    points = allreduce_times(nodes, hosts, sizes, budget_seconds=2.0, extra=("--cycle-time-ms", str(CYCLE_MS)))
    fit = fit_ring(points, ranks)
    for p in points:
        p["bandwidth_term_seconds"] = 2 * (ranks - 1) / ranks * p["bytes"] * 8 / rate
        p["fitted_seconds"] = fit["fixed_s"] + 2 * (ranks - 1) / ranks * p["bytes"] * 8 / fit["bandwidth_bps"]
        p["fit_error"] = abs(p["fitted_seconds"] - p["seconds"]) / p["seconds"]
        # The model as `launch plan` uses it: the tc rate as B, the fitted per-call constant as its fixed term.
        p["predicted_seconds"] = ring_allreduce_seconds(p["bytes"], ranks, 0.0, rate / 8, fit["fixed_s"])
        p["predicted_error"] = abs(p["predicted_seconds"] - p["seconds"]) / p["seconds"]
    # Where the bandwidth term is at least twice the constant, the link, not the cycle's phase, sets the time.
    bound = [p for p in points if p["bandwidth_term_seconds"] >= 2 * fit["fixed_s"]]
    result = {"hosts": hosts, "ranks": ranks, "tc_rate_bps": rate, **fit,
              "bandwidth_vs_tc": fit["bandwidth_bps"] / rate,
              "max_fit_error": max(p["fit_error"] for p in points),
              "max_predicted_error": max(p["predicted_error"] for p in points),
              "max_predicted_error_bandwidth_bound": max((p["predicted_error"] for p in bound), default=None),
              "points": points}
    print(f"allreduce {hosts} at {rate / 1e6:.0f} Mbit/s: fitted B {fit['bandwidth_bps'] / 1e6:.1f} Mbit/s "
          f"({result['bandwidth_vs_tc']:.3f} of tc), c {fit['fixed_s'] * 1e3:.2f} ms, fit error <= "
          f"{result['max_fit_error']:.3f}, model at the tc rate <= {result['max_predicted_error']:.3f} "
          f"(<= {result['max_predicted_error_bandwidth_bound'] or 0:.3f} where the link sets the time)", flush=True)
    return result


def two_node_summary(nodes: EmulatedNodes, config: str, sets: tuple[str, ...], options: tuple[str, ...]) -> dict:
    """This trainer with one rank on node1 and one on node2 (started over ssh): its summary.json."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = [PY, "-m", "launch", "--np", "2", "--hosts", "node1:1,node2:1", *options, "--config", config,
                "--set", f"run_dir={tmp}/run", "--set", "runtime.intra_op_threads=1",
                "--set", "runtime.inter_op_threads=1", *(a for kv in sets for a in ("--set", kv))]
        res = nodes.run("node1", argv, env=bench_env(), cwd=ROOT, timeout=1800)
        if res.returncode:
            raise RuntimeError(f"trainer on 2 nodes {' '.join(sets)} failed: {res.stderr[-2000:]}")
        return json.loads(Path(tmp, "run", "summary.json").read_text())


def plan(config: str, sets: tuple[str, ...], options: tuple[str, ...], step_time: float, rate: float,
         latency: float) -> dict:
    """`python -m launch plan --json` for 2 nodes x 1 GPU, the tc rate, the measured latency and step time."""
    argv = [PY, "-m", "launch", "plan", "--config", config, "--nodes", "2", "--gpus-per-node", "1",
            "--bandwidth", f"{int(rate)}bit", "--latency", f"{latency * 1e6:.1f}us", "--step-time", f"{step_time}",
            "--json", *options, *(a for kv in sets for a in ("--set", kv))]
    res = subprocess.run(argv, cwd=ROOT, env=bench_env(), capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"launch plan failed: {res.stderr.strip()}")
    return json.loads(res.stdout)


def step_seconds(summary: dict) -> float:
    return summary["global_batch_size"] / summary["images_per_sec"]


def run_sets(name: str, ranks: int, sets: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The --set list of model `name` at `ranks` ranks (its per-replica micro-batch each), then `sets`.

    data.global_batch_size is the micro-batch over all ranks: a knob that
    accumulates keeps it and sets train.accumulation_steps alone.
    """
    _, batch_sets, batch, _ = MODELS[name]
    return (*(s.format(n=ranks * batch) for s in batch_sets), *sets)


def trainer_point(nodes: EmulatedNodes, name: str, rate: float, latency: float, step1: float,
                  sets: tuple[str, ...] = (), options: tuple[str, ...] = (), factor: int = 1) -> dict:
    """One 2-node run at `rate` against `launch plan`'s prediction from the np=1 step time `step1`.

    `factor`: micro-batches a step (train.accumulation_steps in `sets`);
    `launch plan` takes the compute time of one micro-batch.
    """
    config = MODELS[name][0]
    sets2 = run_sets(name, 2, sets)
    nodes.shape(rate)
    summary = two_node_summary(nodes, config, sets2, options)
    step2 = step_seconds(summary)
    predicted = plan(config, sets2, options, step1 / factor, rate, latency)["prediction"]
    point = {"model": name, "tc_rate_bps": rate, "sets": list(sets2), "options": list(options),
             "step_seconds_np1": step1, "step_seconds": step2, "predicted_step_seconds": predicted["step_s"],
             "step_error": abs(predicted["step_s"] - step2) / step2,
             "comm_compute_ratio": predicted["comm_s"] / predicted["compute_s"],
             "efficiency": step1 / step2, "predicted_efficiency": predicted["efficiency"],
             "efficiency_error": abs(predicted["efficiency"] - step1 / step2) / (step1 / step2),
             "images_per_sec": summary["images_per_sec"], "predicted_images_per_sec": predicted["images_per_sec"],
             "predicted_bandwidth_term_seconds": predicted["terms"]["bandwidth"]}
    print(f"trainer {name} {' '.join(sets)} {' '.join(options)} at {rate / 1e6:.0f} Mbit/s: step "
          f"{step2:.3f} s (predicted {predicted['step_s']:.3f}, error {point['step_error']:.3f}), efficiency "
          f"{point['efficiency']:.3f} (predicted {point['predicted_efficiency']:.3f}), comm/compute "
          f"{point['comm_compute_ratio']:.2f}", flush=True)
    return point


def np1_step(name: str, sets: tuple[str, ...] = ()) -> float:
    """Seconds per step of model `name` at np=1, with `sets` (a knob's)."""
    return step_seconds(trainer_summary(1, MODELS[name][0], run_sets(name, 1, sets)))


def trainer_repetition(nodes: EmulatedNodes, latency: float) -> tuple[list[dict], dict]:
    """Every model at every rate, then the knobs at KNOB_POINT, each after its own np=1 step time."""
    points = []
    for name, (_, _, _, rates) in MODELS.items():
        step1 = np1_step(name)
        points += [trainer_point(nodes, name, rate, latency, step1) for rate in rates]
    return points, knob_repetition(nodes, latency)


def knob_repetition(nodes: EmulatedNodes, latency: float) -> dict:
    """Each knob at KNOB_POINT, one after another, each after its own np=1 step time."""
    name, rate = KNOB_POINT
    knobs = {}
    for knob, (sets, options, factor) in KNOBS.items():
        step1 = np1_step(name, sets)
        knobs[knob] = trainer_point(nodes, name, rate, latency, step1, sets, options, factor)
    return knobs


def with_fitted_link(point: dict, fitted_bps: float) -> None:
    """The prediction again with the link's bandwidth as the allreduce sweep fitted it instead of the tc rate.

    It separates what the link model misses (TCP/IP headers count against
    the bucket: the fitted B is 0.91-0.99 of the rate) from what the 2-rank
    step costs over the np=1 step on these two shared cores.
    """
    extra = point["predicted_bandwidth_term_seconds"] * (point["tc_rate_bps"] / fitted_bps - 1)
    point["predicted_step_seconds_fitted_link"] = point["predicted_step_seconds"] + extra
    point["step_error_fitted_link"] = abs(point["predicted_step_seconds_fitted_link"] - point["step_seconds"]) \
        / point["step_seconds"]


def summarise(repetitions: list[tuple[list[dict], dict]]) -> tuple[list[dict], dict]:
    """Per point and knob: the repetitions' medians of step, efficiency and their errors."""
    keys = ("step_seconds", "predicted_step_seconds", "step_error", "efficiency", "predicted_efficiency",
            "efficiency_error", "comm_compute_ratio", "step_seconds_np1", "predicted_step_seconds_fitted_link",
            "step_error_fitted_link")

    def merged(runs: list[dict]) -> dict:
        return {**{k: runs[0][k] for k in ("model", "tc_rate_bps", "sets", "options")},
                **{k: stats([r[k] for r in runs]) for k in keys}}

    points = [merged([rep[0][i] for rep in repetitions]) for i in range(len(repetitions[0][0]))]
    knobs = {k: merged([rep[1][k] for rep in repetitions]) for k in repetitions[0][1]}
    base = [rep[1]["default"]["step_seconds"] for rep in repetitions]
    for k, v in knobs.items():
        # Images per second against the default's, per repetition (side by side).
        factor = KNOBS[k][2]
        v["speedup_vs_default"] = stats([factor * b / rep[1][k]["step_seconds"] for b, rep in zip(base, repetitions)])
        pred = [rep[1]["default"]["predicted_step_seconds"] * factor / rep[1][k]["predicted_step_seconds"]
                for rep in repetitions]
        v["predicted_speedup_vs_default"] = stats(pred)
    return points, knobs


def network(repeats: int, work: str) -> dict:
    """The whole section: link latency, allreduce sweeps, trainer points and knobs."""
    started = time.monotonic()
    with EmulatedNodes(Path(work) / "nodes", ("node1", "node2", "node3", "node4")) as nodes:
        latency = link_latency(nodes)
        sweeps = [sweep(nodes, hosts, rate) for hosts, rate in SWEEPS]
        repetitions = [trainer_repetition(nodes, latency) for _ in range(repeats)]
    return results(latency, sweeps, repetitions, repeats, started)


def network_knobs(repeats: int, work: str) -> dict:
    """The knobs alone (`--only network_knobs`): link latency, the 2-node sweep at their rate, the knobs."""
    started = time.monotonic()
    with EmulatedNodes(Path(work) / "nodes", ("node1", "node2")) as nodes:
        latency = link_latency(nodes)
        sweeps = [sweep(nodes, SWEEPS[0][0], KNOB_POINT[1])]
        repetitions = [([], knob_repetition(nodes, latency)) for _ in range(repeats)]
    return results(latency, sweeps, repetitions, repeats, started)


def link_latency(nodes: EmulatedNodes) -> float:
    """One-way latency of the unshaped link: half the median TCP round trip of one byte."""
    nodes.shape(None)
    latency = round_trip(nodes) / 2
    print(f"link: one-way latency {latency * 1e6:.1f} us (half the median TCP round trip)", flush=True)
    return latency


def results(latency: float, sweeps: list[dict], repetitions: list[tuple[list[dict], dict]], repeats: int,
            started: float) -> dict:
    """The section's entry in bench/results.json: every point, each with its prediction from the fitted link too."""
    fitted = {s["tc_rate_bps"]: s["bandwidth_bps"] for s in sweeps if s["hosts"] == SWEEPS[0][0]}
    for rep_points, rep_knobs in repetitions:
        for point in [*rep_points, *rep_knobs.values()]:
            with_fitted_link(point, fitted[point["tc_rate_bps"]])
    points, knobs = summarise(repetitions)
    every = [*points, *knobs.values()]
    return {"latency_s": latency, "cycle_time_ms": CYCLE_MS, "allreduce": sweeps, "trainer": points, "knobs": knobs,
            "max_step_error": max(p["step_error"]["median"] for p in every),
            "max_step_error_fitted_link": max(p["step_error_fitted_link"]["median"] for p in every),
            "repeats": repeats, "seconds": time.monotonic() - started,
            "runs": [{"points": p, "knobs": k} for p, k in repetitions]}

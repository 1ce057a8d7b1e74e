"""`python -m launch plan`: what a config's training will cost on a cluster, and what to set.

    python -m launch plan --config FILE --nodes N --gpus-per-node G --bandwidth 25Gbit --latency 20us
        (--step-time SECONDS | --measure [--measure-steps S]) [--set key=value ...]
        [--fusion-threshold-mb MB] [--cycle-time-ms MS] [--controller gloo|mpi] [--fixed-ms MS]
        [--per-allreduce-ms MS] [--json]

The config is loaded and checked as the launcher checks it; the bytes every
step allreduces are counted on the config's model, built in a child process
on the CPU (trainer.data_spec.model_size). The step's compute time is given
(`--step-time`: one GPU's forward and backward pass of one micro-batch of
data.global_batch_size / (N x G) images, without communication) or measured
here (`--measure`: the trainer at np=1 on that batch, a few steps). The
prediction and the terms of its formula come from launch.cost_model
(docs/scaling.md). Exits 2, with one line, for bad input.
"""

import argparse
import dataclasses
import json
import os
import re
import sys
import tempfile

from data_pipeline.arguments import ArgumentParser
from data_pipeline.metadata import DataError
from launch import cost_model as cm
from launch import plan_report
from launch.cli import report_bad_input
from launch.command import LaunchError
from launch.options import CYCLE_MS, add_config_options
from trainer.config import ConfigError, ExperimentConfig, load_config, validate, validate_world
from trainer.data_spec import DataSpec, model_size, resolve_data

DESCRIPTION = ("Predict the communication, step time, images/s and scaling efficiency of a config on "
               "N nodes x G GPUs over a given network, and the settings that would raise them.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_options(p)
    p.add_argument("--nodes", type=int, required=True, metavar="N", help="nodes (hosts), one network link each")
    p.add_argument("--gpus-per-node", type=int, required=True, metavar="G", help="GPUs per node, one rank each")
    p.add_argument("--bandwidth", required=True, metavar="RATE",
                   help="each node's link rate: 25Gbit, 100mbit, 10Gbps, 1.25GB/s")
    p.add_argument("--latency", required=True, metavar="TIME", help="the link's latency per message: 20us, 1.5ms, 0")
    compute = p.add_mutually_exclusive_group(required=True)
    compute.add_argument("--step-time", metavar="SECONDS",
                         help="one GPU's compute per micro-batch (data.global_batch_size / (N x G) images), "
                              "in seconds (or with a unit: 120ms)")
    compute.add_argument("--measure", action="store_true",
                         help="measure the step time here: the trainer at np=1 on that batch (needs the data)")
    p.add_argument("--measure-steps", type=int, default=10, metavar="S", help="steps per measured epoch (10)")
    p.add_argument("--fusion-threshold-mb", type=int, default=cm.HOROVOD_FUSION_THRESHOLD // cm.MIB, metavar="MB",
                   help="Horovod's fusion threshold, as `launch --fusion-threshold-mb` (default: Horovod's 128)")
    p.add_argument("--cycle-time-ms", type=float, metavar="MS",
                   help="Horovod's cycle time, as `launch --cycle-time-ms` (default: the launcher's, by controller)")
    p.add_argument("--controller", choices=("gloo", "mpi"), default="gloo",
                   help="Horovod's controller, as `launch --gloo/--mpi` (srun: mpi): under gloo the cycle starts "
                        "when the gradients are ready, under mpi a step waits half a cycle (default gloo)")
    p.add_argument("--fixed-ms", type=float, metavar="MS",
                   help="Horovod's constant time per step's cycle (default: a negotiation, plus half a cycle "
                        "under mpi)")
    p.add_argument("--per-allreduce-ms", type=float, default=0.0, metavar="MS",
                   help="a constant time of each fused allreduce besides its ring latency (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = cm.parse_duration(text)
    if not 0 < value < float("inf"):
        raise ValueError(f"{text!r}: must be a positive, finite time")
    return value


def _parse(flag: str, parse, text: str):
    try:
        return parse(text)
    except ValueError as e:
        raise LaunchError(f"{flag}: {e}") from None


def cycle_time_ms(args: argparse.Namespace) -> float:
    """--cycle-time-ms, or the launcher's default for --controller."""
    return CYCLE_MS[args.controller == "gloo"] if args.cycle_time_ms is None else args.cycle_time_ms


def _check_numbers(args: argparse.Namespace) -> tuple[cm.Cluster, float | None]:
    """The cluster and the given step time, from the options; LaunchError for any bad one."""
    for flag, value, least in (("--nodes", args.nodes, 1), ("--gpus-per-node", args.gpus_per_node, 1),
                               ("--measure-steps", args.measure_steps, 1),
                               ("--fusion-threshold-mb", args.fusion_threshold_mb, 0),
                               ("--cycle-time-ms", cycle_time_ms(args), 0),
                               ("--fixed-ms", 0 if args.fixed_ms is None else args.fixed_ms, 0),
                               ("--per-allreduce-ms", args.per_allreduce_ms, 0)):
        if not value >= least or value == float("inf"):
            raise LaunchError(f"{flag} {value}: must be at least {least}" + (" and finite" if least == 0 else ""))
    cluster = cm.Cluster(args.nodes, args.gpus_per_node, _parse("--bandwidth", cm.parse_bandwidth, args.bandwidth),
                         _parse("--latency", cm.parse_duration, args.latency))
    step_time = None if args.step_time is None else _parse("--step-time", _seconds, args.step_time)
    return cluster, step_time


def per_replica_batch(cfg: ExperimentConfig, ranks: int, shown: str) -> int:
    """data.global_batch_size / ranks, or ConfigError when the batch cannot be split over `ranks`."""
    gbs = cfg.data.global_batch_size
    if gbs < ranks:
        raise ConfigError(f"data.global_batch_size={gbs}: {shown} = {ranks} GPUs is more GPUs than the batch "
                          "allows (at least one image each)")
    validate_world(cfg, ranks)
    return gbs // ranks


def plan_data(cfg: ExperimentConfig) -> tuple[DataSpec, bool]:
    """(the model's input shape and classes, whether from the data): from the shards' metadata.json when they
    are here (or synthetic data), else from model.image_size, model.channels (3) and model.num_classes."""
    d, m = cfg.data, cfg.model
    if d.synthetic or os.path.isfile(os.path.join(d.dir, "metadata.json")):
        return resolve_data(cfg), True
    if not (m.image_size and m.num_classes):
        raise ConfigError(f"data.dir={d.dir!r}: has no metadata.json here; set model.image_size and "
                          "model.num_classes to plan without the data")
    return DataSpec((m.image_size, m.image_size, m.channels or 3), m.num_classes, 1, [], []), False


def measure(args: argparse.Namespace, batch: int) -> float:
    """Seconds per step of the trainer at np=1 on `batch` images (the median of the second epoch's steps)."""
    with tempfile.TemporaryDirectory(prefix="launch-plan-") as tmp:
        sets = [*args.overrides, f"run_dir={tmp}/run", f"data.global_batch_size={batch}", "train.epochs=2",
                "train.accumulation_steps=1", f"train.steps_per_epoch={args.measure_steps}", "train.resume=false",
                "train.export=false", "train.validate_every_epochs=0", "train.precise_bn=false"]
        argv = [sys.executable, "-m", "launch", "run", "--np", "1", "--config", args.config,
                *(a for kv in sets for a in ("--set", kv))]
        print(f"launch plan: measuring {args.measure_steps} steps of {batch} images at np=1 ...", file=sys.stderr)
        res = plan_report.run_quietly(argv)
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or [f"exit code {res.returncode}"])[-1]
            raise LaunchError(f"--measure: the trainer at np=1 failed: {re.sub(r'^launch: (.*?)error: ', '', last)}")
        with open(os.path.join(tmp, "run", "metrics.jsonl"), encoding="utf-8") as f:
            record = [json.loads(line) for line in f if line.strip()][-1]
    rank0 = (record.get("per_rank") or [{}])[0]
    return float(rank0.get("step_time_median_sec") or record["step_time_sec"])


def run(args: argparse.Namespace) -> int:
    try:
        cluster, compute_s = _check_numbers(args)
        cfg = load_config(args.config, args.overrides)
        validate(cfg)
        batch = per_replica_batch(cfg, cluster.ranks, f"{cluster.nodes} nodes x {cluster.gpus_per_node}")
        spec, from_data = plan_data(cfg)
        if args.measure and not from_data:
            raise LaunchError(f"--measure needs the config's data, and data.dir={cfg.data.dir!r} has no "
                              "metadata.json here (give --step-time instead)")
        sizes = model_size(cfg, spec)
        if compute_s is None:
            compute_s = measure(args, batch)
    except (ConfigError, DataError, LaunchError) as e:
        return report_bad_input(e)
    model = cm.ModelBytes(sizes["trainable_params"], sizes["trainable_bytes"], sizes["state_bytes"],
                          sizes["trainable_tensors"], sizes["state_tensors"],
                          tuple(sizes["trainable_tensor_bytes"]), tuple(sizes["state_tensor_bytes"]))
    settings = cm.Settings(
        fp16=cfg.allreduce.fp16_compression, accumulation_steps=cfg.train.accumulation_steps,
        fusion_threshold_bytes=args.fusion_threshold_mb * cm.MIB, cycle_time_s=cycle_time_ms(args) / 1000,
        wake_on_enqueue=args.controller == "gloo",
        fixed_s=None if args.fixed_ms is None else args.fixed_ms / 1000, per_allreduce_s=args.per_allreduce_ms / 1000)
    prediction = cm.predict(model, compute_s, cluster, batch, settings)
    recommendations = cm.recommend(model, compute_s, cluster, batch, settings)
    facts = plan_report.Facts(
        config=args.config, model=cfg.model.builder or cfg.model.name, input_shape=spec.input_shape,
        num_classes=spec.num_classes, shape_from_data=from_data, sizes=sizes, per_replica_batch=batch,
        compute_s=compute_s, measured=args.measure, cluster=cluster)
    if args.json:
        print(json.dumps(plan_report.as_json(facts, prediction, recommendations), default=_plain))
    else:
        print(plan_report.table(facts, prediction, recommendations))
    return 0


def _plain(value):
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else str(value)


def main(argv=None) -> int:
    """`launch plan` alone; launch.main is the entry point that also knows `launch run` and `launch slurm`."""
    p = ArgumentParser(prog="python -m launch plan", description=DESCRIPTION)
    add_arguments(p)
    return run(p.parse_args(sys.argv[1:] if argv is None else list(argv)))

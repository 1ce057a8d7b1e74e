"""`python -m launch plan`, run as a user runs it: bad input is one line and exit 2; a plan counts the real model.

The bytes it prints are checked against the model counted here with the
project's own builder, and its numbers against launch.cost_model's formula
worked out here.
"""

import json
import sys

import numpy as np
import pytest

from helpers import run

PLAN = ["-m", "launch", "plan"]
RESNET20 = ["--config", "configs/bench_resnet20.yaml"]  # synthetic data, global batch 64
NET = ["--bandwidth", "100Mbit", "--latency", "100us"]
TWO = ["--nodes", "2", "--gpus-per-node", "1"]

CASES = {
    "unknown unit": ([*RESNET20, *TWO, "--bandwidth", "25Gb", "--latency", "20us", "--step-time", "0.1"],
                     "launch: error: --bandwidth: bandwidth '25Gb': unknown unit 'Gb'"),
    "zero bandwidth": ([*RESNET20, *TWO, "--bandwidth", "0Gbit", "--latency", "20us", "--step-time", "0.1"],
                       "launch: error: --bandwidth: bandwidth '0Gbit': must be a positive"),
    "bad latency": ([*RESNET20, *TWO, "--bandwidth", "1Gbit", "--latency=-2us", "--step-time", "0.1"],
                    "launch: error: --latency: duration '-2us': is negative"),
    "zero step time": ([*RESNET20, *TWO, *NET, "--step-time", "0"],
                       "launch: error: --step-time: '0': must be a positive, finite time"),
    "no nodes": ([*RESNET20, "--nodes", "0", "--gpus-per-node", "1", *NET, "--step-time", "0.1"],
                 "launch: error: --nodes 0: must be at least 1"),
    "too many GPUs": ([*RESNET20, "--nodes", "16", "--gpus-per-node", "8", *NET, "--step-time", "0.1"],
                      "launch: error: data.global_batch_size=64: 16 nodes x 8 = 128 GPUs is more GPUs than the "
                      "batch allows"),
    "not divisible": ([*RESNET20, "--nodes", "3", "--gpus-per-node", "1", *NET, "--step-time", "0.1"],
                      "launch: error: data.global_batch_size=64: is not divisible by the world size 3"),
    "missing config": (["--config", "configs/nope.yaml", *TWO, *NET, "--step-time", "0.1"],
                       "launch: error: config file 'configs/nope.yaml': No such file or directory"),
    "both": ([*RESNET20, *TWO, *NET, "--step-time", "0.1", "--measure"],
             "python -m launch plan: error: argument --measure: not allowed with argument --step-time"),
    "neither": ([*RESNET20, *TWO, *NET], "python -m launch plan: error: one of the arguments --step-time "
                "--measure is required"),
    "no data, no classes": (["--config", "configs/imagenet_resnet50.yaml", "--set", "data.dir=/nonexistent",
                             *TWO, *NET, "--step-time", "0.1"],
                            "launch: error: data.dir='/nonexistent': has no metadata.json here; set "
                            "model.image_size and model.num_classes to plan without the data"),
    "measure without the data": (["--config", "configs/digits.yaml", "--set", "data.dir=/nonexistent", "--set",
                                  "model.image_size=8", "--set", "model.num_classes=10", *TWO, *NET, "--measure"],
                                 "launch: error: --measure needs the config's data, and data.dir='/nonexistent' "
                                 "has no metadata.json here (give --step-time instead)"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_exit_2(name):
    argv, line = CASES[name]
    res = run([sys.executable, *PLAN, *argv], timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith(line), (res.returncode, res.stderr)
    assert res.stdout == ""


def _counted_resnet20():
    """ResNet-20 as the trainer builds it for this config, counted here: (trainable, state values, tensors)."""
    from trainer.config import load_config
    from trainer.models import build_net

    cfg = load_config("configs/bench_resnet20.yaml")
    net = build_net(cfg.model, (32, 32, 3), 10)
    trainable = sum(int(np.prod(w.shape)) for w in net.trainable_weights)
    floats = [w for w in net.non_trainable_weights if w.dtype == "float32"]
    state = sum(int(np.prod(w.shape)) for w in floats)
    assert net.count_params() == trainable + state
    return trainable, state, len(net.trainable_weights) + len(floats)


def test_plan_counts_the_model_and_applies_the_formula(tmp_path):
    # Fusion off: one allreduce per tensor, so the count checks the tensors counted too.
    res = run([sys.executable, *PLAN, *RESNET20, "--nodes", "4", "--gpus-per-node", "2", *NET, "--step-time", "50ms",
               "--cycle-time-ms", "4", "--controller", "mpi", "--fusion-threshold-mb", "0",
               "--set", "train.accumulation_steps=2", "--json"],
              timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    trainable, state, tensors = _counted_resnet20()
    assert (out["trainable_params"], out["state_params"]) == (trainable, state)
    p = out["prediction"]
    s = 4 * trainable + 4 * state + 8
    assert p["message_bytes"] == s and p["gradient_bytes"] == 4 * trainable and p["allreduces"] == tensors + 2
    # 8 ranks, 12.5 MB/s, 100 us; fixed (MPI): 4 ms / 2 + 2 x log2(8) x 100 us; batch 64 / 8 = 8 images per rank.
    fixed = 0.002 + 6 * 1e-4
    comm = fixed + (tensors + 2) * 14 * 1e-4 + 14 / 8 * s / 12.5e6
    assert out["per_replica_batch"] == 8 and p["global_batch"] == 128
    assert p["comm_s"] == pytest.approx(comm) and p["step_s"] == pytest.approx(0.1 + comm)
    assert p["efficiency"] == pytest.approx(0.1 / (0.1 + comm))
    recs = {r["knob"]: r for r in out["recommendations"]}
    assert recs["fp16 compression"]["prediction"]["gradient_bytes"] == 2 * trainable
    k = recs["accumulation"]["prediction"]["settings"]["accumulation_steps"]
    assert recs["accumulation"]["prediction"]["efficiency"] >= 0.9 > (k - 1) * 0.05 / ((k - 1) * 0.05 + comm)


def test_plan_prints_a_table_from_the_model_alone_when_the_data_is_absent():
    res = run([sys.executable, *PLAN, "--config", "configs/digits.yaml", "--set", "data.dir=/nonexistent", "--set",
               "model.image_size=8", "--set", "model.channels=1", "--set", "model.num_classes=10", "--nodes", "2",
               "--gpus-per-node", "4", "--bandwidth", "10Gbit", "--latency", "20us", "--step-time", "0.01"],
              timeout=300)
    assert res.returncode == 0, res.stderr
    from trainer.config import load_config
    from trainer.models import build_net

    cfg = load_config("configs/digits.yaml")
    net = build_net(cfg.model, (8, 8, 1), 10)
    trainable = sum(int(np.prod(w.shape)) for w in net.trainable_weights)
    assert f"{trainable:,} trainable parameters" in res.stdout
    assert "(from model.*: the data is not here)" in res.stdout
    # Under Gloo (the default) the fixed term is the negotiation alone: 2 x log2(8) x 20 us, no cycle wait.
    for part in ("2(p-1)·a = 1 x 2 x 7 x 20 us = 0.28 ms", "fixed 0.12 ms  (Horovod's negotiation)", "efficiency",
                 "recommendations", "fp16 compression"):
        assert part in res.stdout, res.stdout


def test_measure_runs_the_trainer_at_np_1_on_the_per_gpu_batch():
    res = run([sys.executable, *PLAN, *RESNET20, *TWO, *NET, "--measure", "--measure-steps", "3", "--json"],
              timeout=300)
    assert res.returncode == 0, res.stderr
    assert "measuring 3 steps of 32 images at np=1" in res.stderr  # 64 images over 2 ranks
    out = json.loads(res.stdout)
    compute = out["compute_per_micro_batch_sec"]
    assert out["compute_measured"] and 1e-4 < compute < 60 and out["prediction"]["compute_s"] == compute

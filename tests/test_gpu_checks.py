"""The GPU smoke test's checks (scripts/gpu_checks.py) on recorded inputs: they cannot run here on a GPU.

The Gloo timeline is a fragment of a real one written on this machine (a 2-rank digits
job); the NCCL one has the same tensors with the activity a GPU build records on GPUs
(Horovod's NCCL_ALLREDUCE, horovod/common/common.h). The last test starts the real
horovodrun: without a GPU, even a GPU build must reduce the gradients on the CPU.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import gpu_checks
from helpers import ROOT, run

DATA = Path(__file__).parent / "data" / "gpu"

NVIDIA_SMI_L = """GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-6f1d0a8e-8d3c-2f61-1c3e-7a1b9b2f0c11)
GPU 1: NVIDIA A100-SXM4-80GB (UUID: GPU-0b8f2c4e-5d9a-44c1-9b0e-3f5d7e6a1c22)
GPU 2: NVIDIA A100-SXM4-80GB (UUID: GPU-9e2d4a6b-1c3f-4e5a-8b7c-0d1e2f3a4b33)
GPU 3: NVIDIA A100-SXM4-80GB (UUID: GPU-4c5b6a7d-8e9f-4a0b-9c1d-2e3f4a5b6c44)
"""


def probe(rank, local_rank, pinned, physical=4, logical=1, host="gpu-node-1", visible=None):
    return {"rank": rank, "local_rank": local_rank, "host": host, "physical_gpus": physical,
            "logical_gpus": logical, "pinned": pinned, "cuda_visible_devices": visible}


def horovodrun_output(reports):
    # horovodrun (Gloo) prefixes each worker line with [rank]<stdout>:
    return "\n".join(f"[{r['rank']}]<stdout>:{gpu_checks.PROBE_TAG}{json.dumps(r)}" for r in reversed(reports)) + \
        "\n[0]<stderr>:2026-12-02 10:00:00 I tensorflow noise\n"


def test_gpus_are_counted_from_nvidia_smi():
    assert gpu_checks.count_gpus(NVIDIA_SMI_L) == 4
    assert gpu_checks.count_gpus("No devices were found\n") == 0


def test_the_driver_must_run_the_cuda_version_horovod_was_built_with():
    assert gpu_checks.build_cuda_major("cuda13.0-1a2b3c4d5e6f\n") == 13
    assert gpu_checks.driver_problems("580.65.06\n580.65.06\n", 13) == []
    [problem] = gpu_checks.driver_problems("550.54.15\n550.54.15\n", 13)
    assert "550.54.15 is older than 580" in problem
    assert gpu_checks.driver_problems("550.54.15\n", 12) == []
    assert gpu_checks.driver_problems("", 13) == ["nvidia-smi reports no driver version"]
    with pytest.raises(ValueError, match="not a setup_gpu.sh build marker"):
        gpu_checks.build_cuda_major("tf2.21.0")


def test_each_rank_on_its_own_local_gpu_passes():
    reports = [probe(r, r % 4, f"/physical_device:GPU:{r % 4}", host=f"n{r // 4}") for r in range(8)]
    parsed = gpu_checks.parse_probes(horovodrun_output(reports))
    assert [r["rank"] for r in parsed] == list(range(8))
    assert gpu_checks.probe_problems(parsed, 8) == []


def test_one_gpu_per_rank_given_by_the_scheduler_passes():
    # Slurm's --gpu-bind or CUDA_VISIBLE_DEVICES per task: each rank sees one GPU, as GPU 0.
    reports = [probe(r, r, "/physical_device:GPU:0", physical=1, visible=str(r)) for r in range(4)]
    assert gpu_checks.probe_problems(reports, 4) == []


def test_a_rank_that_sees_several_gpus_fails():
    reports = [probe(0, 0, "/physical_device:GPU:0"), probe(1, 1, "/physical_device:GPU:1", logical=4)]
    assert gpu_checks.probe_problems(reports, 2) == [
        "rank 1 (local 1 on gpu-node-1) sees 4 GPUs, expected exactly 1"]


def test_a_rank_on_another_ranks_gpu_fails():
    wrong = [probe(0, 0, "/physical_device:GPU:0"), probe(1, 1, "/physical_device:GPU:0")]
    assert gpu_checks.probe_problems(wrong, 2) == [
        "rank 1 (local 1 on gpu-node-1) uses GPU 0, expected GPU 1 of the 4 it can see"]
    shared = [probe(r, r, "/physical_device:GPU:0", physical=1, visible="3") for r in range(2)]
    assert gpu_checks.probe_problems(shared, 2) == ["rank 1 (local 1 on gpu-node-1) shares GPU 3 with rank 0"]


def test_a_missing_rank_fails():
    [problem] = gpu_checks.probe_problems([probe(0, 0, "/physical_device:GPU:0")], 2)
    assert problem == "expected probe reports from ranks 0..1, got ranks [0]"


def test_gradients_through_nccl_pass():
    events = gpu_checks.load_timeline((DATA / "timeline-nccl.json").read_text())
    acts = gpu_checks.allreduce_activities(events)
    assert any("NCCL_ALLREDUCE" in a for a in acts.values())
    assert gpu_checks.timeline_problems(events) == []


def test_gradients_through_gloo_fail():
    events = gpu_checks.load_timeline((DATA / "timeline-gloo.json").read_text())
    [problem] = gpu_checks.timeline_problems(events)
    assert "reduced by GLOO_ALLREDUCE, not NCCL" in problem


def test_a_timeline_cut_short_is_read_to_its_last_event():
    text = (DATA / "timeline-nccl.json").read_text().rstrip().rstrip("]")
    whole = gpu_checks.load_timeline((DATA / "timeline-nccl.json").read_text())
    assert gpu_checks.load_timeline(text + ',\n{"ph": "B", "na') == whole


def test_throughput_is_per_gpu():
    assert gpu_checks.per_gpu_throughput({"images_per_sec": 4000.0, "world_size": 4}) == 1000.0


def test_check_build_needs_nccl():
    text = (DATA / "check-build-cpu.txt").read_text()
    assert gpu_checks.check_build_problems(text) == ["horovodrun --check-build does not list NCCL"]
    assert gpu_checks.check_build_problems(text.replace("[ ] NCCL", "[X] NCCL")) == []


def test_a_timeline_that_is_not_json_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "timeline.json"
    bad.write_text("not json")
    res = subprocess.run([sys.executable, "scripts/gpu_checks.py", "timeline", str(bad)], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.startswith(f"gpu_checks: cannot read timeline {bad}:") and res.stderr.count("\n") == 1


@pytest.mark.horovod
def test_without_a_gpu_the_gradients_go_through_gloo_not_nccl(digits_shards, tmp_path):
    # Run with .venv-gpu/bin/python by `make check-gpu-build`: a GPU build on a machine without a GPU.
    timeline = tmp_path / "timeline.json"
    res = run([sys.executable, "-m", "launch", "--np", "2", "--config", "configs/digits.yaml", "--gloo",
               "--timeline", timeline, "--set", f"run_dir={tmp_path / 'run'}", "--set", f"data.dir={digits_shards}",
               "--set", "train.epochs=1"], timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    acts = gpu_checks.allreduce_activities(gpu_checks.load_timeline(timeline.read_text()))
    grads = {t: a for t, a in acts.items() if gpu_checks.GRADIENT_NAME.search(t)}
    assert grads and all(set(a) == {"GLOO_ALLREDUCE"} for a in grads.values()), acts
    assert not any("NCCL_ALLREDUCE" in a for a in acts.values())
    [problem] = gpu_checks.timeline_problems(gpu_checks.load_timeline(timeline.read_text()))
    assert f"{len(grads)} of {len(grads)} gradient tensors were reduced by GLOO_ALLREDUCE, not NCCL" in problem


@pytest.mark.horovod
def test_the_probe_under_horovodrun_reports_every_rank():
    # The real probe, pinning as training does: here no rank sees a GPU, and the check says so.
    res = run(gpu_checks.probe_argv(2), timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    reports = gpu_checks.parse_probes(res.stdout)
    assert [(r["rank"], r["local_rank"], r["physical_gpus"], r["pinned"]) for r in reports] == \
        [(0, 0, 0, None), (1, 1, 0, None)]
    assert gpu_checks.probe_problems(reports, 2) == [
        f"rank {r} (local {r} on {reports[r]['host']}) sees 0 GPUs, expected exactly 1" for r in range(2)]

"""docs/scaling.md's extrapolation table: `python -m launch plan --json` for published GPU step times.

    python scripts/scaling_extrapolation.py > table.md

Each row is one `launch plan` run on configs/imagenet_resnet50.yaml (the model
swapped by --set model.name), 8 GPUs a node, one link a node, 20 us latency,
the per-GPU compute time from a published single-GPU throughput:

  ResNet-50, A100, AMP + XLA, batch 256: 2,375 images/s (NVIDIA
  DeepLearningExamples, TensorFlow/Classification/ConvNets/resnet50v1.5,
  "Training performance: NVIDIA DGX A100 (8x A100 40GB)").
  EfficientNet-B0, A100, AMP: 3,454 images/s (DeepLearningExamples,
  TensorFlow2/Classification/ConvNets/efficientnet_v1, DGX A100 80GB), taken
  here at batch 256 a GPU.
  Horovod's own published run (its README): 128 servers x 4 Pascal GPUs, 25
  Gbit/s RoCE, tf_cnn_benchmarks batch 64 a GPU: 90% for Inception V3 and
  ResNet-101. One P100 trains Inception V3 at 142 images/s (TensorFlow's
  2017 benchmarks page, DGX-1, batch 64); ResNet-101's figure is not
  published, so it is put between ResNet-50's 219 and ResNet-152's 91.8 by
  FLOPs (4.1, 7.8, 11.6 GFLOPs): 219 x 4.1 / 7.8 = 115 images/s.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_ROWS = (("ResNet50", 2375.0, 256), ("EfficientNetB0", 3454.0, 256))
NODES, RATES, GPUS = (8, 32, 128), ("10Gbit", "25Gbit", "100Gbit"), 8
HOROVOD_ROWS = (("InceptionV3", 142.0, 64, 299, "90%"), ("ResNet101", 115.0, 64, 224, "90%"))


def plan(model: str, nodes: int, gpus: int, rate: str, per_gpu: int, step: float, size: int, *extra: str) -> dict:
    argv = [sys.executable, "-m", "launch", "plan", "--config", "configs/imagenet_resnet50.yaml",
            "--set", f"model.name={model}", "--set", "model.num_classes=1000", "--set", f"model.image_size={size}",
            "--set", f"data.global_batch_size={per_gpu * nodes * gpus}", "--nodes", str(nodes),
            "--gpus-per-node", str(gpus), "--bandwidth", rate, "--latency", "20us", "--step-time", f"{step:.5f}",
            "--json", *extra]
    res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"launch plan {model} {nodes}x{gpus} {rate}: {res.stderr.strip()}")
    return json.loads(res.stdout)


def best(out: dict) -> str:
    """The recommendation that reaches 90% with the fewest images per step, or fp16's figure."""
    for rec in out["recommendations"]:
        if rec["prediction"] and rec["prediction"]["efficiency"] >= 0.9:
            return f"{rec['setting'].replace('--set ', '')} ({rec['prediction']['efficiency']:.0%})"
    return "-"


def main() -> int:
    print("| model (A100, batch 256 a GPU) | nodes x 8 GPUs | link | comm / step | efficiency | fp16 | "
          "to reach 90% |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for model, rate_img, per_gpu in GPU_ROWS:
        step = per_gpu / rate_img
        for nodes in NODES:
            for rate in RATES:
                out = plan(model, nodes, GPUS, rate, per_gpu, step, 224)
                p = out["prediction"]
                fp16 = next(r for r in out["recommendations"] if r["knob"] == "fp16 compression")["prediction"]
                print(f"| {model} ({step * 1e3:.0f} ms a step) | {nodes} x 8 | {rate} | {p['comm_s'] * 1e3:.0f} ms | "
                      f"{p['efficiency']:.0%} | {fp16['efficiency']:.0%} | {best(out)} |", flush=True)
    print("\n| model (P100, batch 64 a GPU) | nodes x GPUs | link | comm / step | this model | Horovod published |")
    print("| --- | --- | --- | --- | --- | --- |")
    for model, rate_img, per_gpu, size, published in HOROVOD_ROWS:
        step = per_gpu / rate_img
        p = plan(model, 128, 4, "25Gbit", per_gpu, step, size)["prediction"]
        print(f"| {model} ({step * 1e3:.0f} ms a step) | 128 x 4 | 25Gbit | {p['comm_s'] * 1e3:.0f} ms | "
              f"{p['efficiency']:.0%} | {published} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

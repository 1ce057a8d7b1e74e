"""The first job on a GPU node (scripts/gpu_smoke.sh): checks that need a GPU, and their parsers.

    python scripts/gpu_checks.py smoke [--np N] [--epochs E] [--out DIR]  # the whole check
    python scripts/gpu_checks.py build           # is this a CUDA + NCCL build? (make check-gpu-build)
    python scripts/gpu_checks.py probe           # one rank's report; run under horovodrun
    python scripts/gpu_checks.py timeline FILE   # does a Horovod timeline show NCCL gradients?

`smoke` runs the probe on all local GPUs (each rank must see exactly one GPU, its
local rank's), then a short digits job with a Horovod timeline (every gradient
allreduce must be NCCL_ALLREDUCE), and prints the throughput per GPU. It exits 1
with one line per failed check. The parsers below are plain functions on text
and JSON, so that the checks are tested here, on recorded inputs, without a GPU.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE_TAG = "GPU_PROBE "
# Horovod's timeline activity names for the allreduce itself (horovod/common/common.h).
CPU_ALLREDUCES = ("MPI_ALLREDUCE", "GLOO_ALLREDUCE", "CCL_ALLREDUCE", "MPI_ADASUM_ALLREDUCE")
GPU_ALLREDUCES = ("NCCL_ALLREDUCE",)
# Gradient tensors in a timeline: trainer.step's grouped allreduce of the tape's gradients
# ("HorovodGroupedAllreduce_gradient_tape_..."), and Horovod's DistributedGradientTape/Optimizer.
GRADIENT_NAME = re.compile(r"grad", re.IGNORECASE)
# The oldest driver that loads code of each CUDA major version (NVIDIA's minor-version
# compatibility): Horovod's kernels are code of the nvcc that built them.
MIN_DRIVER = {12: 525, 13: 580}


def check_build_problems(text: str) -> list[str]:
    """What `horovodrun --check-build` does not list of TensorFlow, MPI, Gloo and NCCL."""
    return [f"horovodrun --check-build does not list {what}" for what in ("TensorFlow", "MPI", "Gloo", "NCCL")
            if not re.search(r"\[X\] " + what + r"\b", text)]


def build() -> int:
    """Checks this environment's build: Horovod with NCCL, TensorFlow with CUDA; needs no GPU."""
    import horovod.tensorflow as hvd
    import tensorflow as tf

    res = subprocess.run([os.path.join(os.path.dirname(sys.executable), "horovodrun"), "--check-build"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(res.stdout.strip())
    problems = check_build_problems(res.stdout)
    if not hvd.nccl_built():
        problems.append("hvd.nccl_built() is false")
    if not tf.test.is_built_with_cuda():
        problems.append("tf.test.is_built_with_cuda() is false")
    gpus = tf.config.list_physical_devices("GPU")
    print(f"hvd.nccl_built() {hvd.nccl_built()}, hvd.cuda_built() {hvd.cuda_built()}, "
          f"tf.test.is_built_with_cuda() {tf.test.is_built_with_cuda()}, GPUs here: {len(gpus)}")
    for p in problems:
        print(f"check-gpu-build: FAILED: {p}")
    return 1 if problems else 0


def count_gpus(nvidia_smi_list: str) -> int:
    """GPUs in `nvidia-smi -L` output ("GPU 0: NVIDIA A100 ... (UUID: GPU-...)" per line)."""
    return sum(1 for line in nvidia_smi_list.splitlines() if re.match(r"GPU \d+:", line.strip()))


def build_cuda_major(marker: str) -> int:
    """The CUDA major version Horovod was built with, from setup_gpu.sh's `.horovod-build` (`cuda13.0-<sha>`)."""
    found = re.match(r"cuda(\d+)\.", marker.strip())
    if not found:
        raise ValueError(f"not a setup_gpu.sh build marker: {marker.strip()!r}")
    return int(found.group(1))


def driver_problems(driver_versions: str, cuda_major: int) -> list[str]:
    """Problems with `nvidia-smi --query-gpu=driver_version --format=csv,noheader` output."""
    versions = [v.strip() for v in driver_versions.splitlines() if v.strip()]
    if not versions:
        return ["nvidia-smi reports no driver version"]
    need = MIN_DRIVER.get(cuda_major, max(MIN_DRIVER.values()))
    out = []
    for v in sorted(set(versions)):
        major = re.match(r"(\d+)", v)
        if not major or int(major.group(1)) < need:
            out.append(f"driver {v} is older than {need}: Horovod's CUDA {cuda_major} code cannot run "
                       "(docs/setup.md, the GPU build)")
    return out


def parse_probes(output: str) -> list[dict]:
    """The ranks' probe reports in horovodrun's output, sorted by rank (prefixes such as `[1]<stdout>:` allowed)."""
    reports = []
    for line in output.splitlines():
        at = line.find(PROBE_TAG)
        if at >= 0:
            reports.append(json.loads(line[at + len(PROBE_TAG):]))
    return sorted(reports, key=lambda r: r["rank"])


def probe_problems(reports: list[dict], size: int) -> list[str]:
    """Each of `size` ranks sees exactly one GPU, the one its local rank names, and no two ranks of a host share one.

    A rank sees all of the host's GPUs and pins GPU <local rank> (trainer.distributed), or the
    scheduler gave it one GPU (CUDA_VISIBLE_DEVICES) and it pins that one, GPU 0.
    """
    if sorted(r["rank"] for r in reports) != list(range(size)):
        return [f"expected probe reports from ranks 0..{size - 1}, got ranks {[r['rank'] for r in reports]}"]
    out, taken = [], {}
    for r in reports:
        who = f"rank {r['rank']} (local {r['local_rank']} on {r['host']})"
        if r["logical_gpus"] != 1:
            out.append(f"{who} sees {r['logical_gpus']} GPUs, expected exactly 1")
            continue
        pinned = int(r["pinned"].rsplit(":", 1)[1]) if r["pinned"] else None
        visible = [d for d in (r.get("cuda_visible_devices") or "").split(",") if d]
        if r["physical_gpus"] == 1:
            want, device = 0, visible[0] if visible else "0"
        else:
            want, device = r["local_rank"], visible[pinned] if pinned is not None and pinned < len(visible) else pinned
        if pinned != want:
            out.append(f"{who} uses GPU {pinned}, expected GPU {want} of the {r['physical_gpus']} it can see")
        elif (r["host"], device) in taken:
            out.append(f"{who} shares GPU {device} with rank {taken[(r['host'], device)]}")
        else:
            taken[(r["host"], device)] = r["rank"]
    return out


def load_timeline(text: str) -> list[dict]:
    """A Horovod timeline's events; a file cut short by a killed job (no closing `]`) is read up to its last event."""
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        cut = text.rstrip(",\n ")
        return json.loads(cut[:cut.rfind("}") + 1] + "]")


def allreduce_activities(events: list[dict]) -> dict[str, dict[str, int]]:
    """Tensor name -> {allreduce activity name: count}, for CPU and GPU allreduce activities."""
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
             and "name" in e.get("args", {})}
    out: dict[str, dict[str, int]] = {}
    for e in events:
        if e.get("ph") == "B" and e.get("name") in CPU_ALLREDUCES + GPU_ALLREDUCES:
            per = out.setdefault(names.get(e["pid"], f"pid {e['pid']}"), {})
            per[e["name"]] = per.get(e["name"], 0) + 1
    return out


def timeline_problems(events: list[dict]) -> list[str]:
    """Every gradient tensor's allreduce went through NCCL (and there was at least one)."""
    grads = {t: acts for t, acts in allreduce_activities(events).items() if GRADIENT_NAME.search(t)}
    if not grads:
        return ["the timeline has no allreduce of a gradient tensor"]
    off_gpu = sorted(t for t, acts in grads.items() if set(acts) - set(GPU_ALLREDUCES))
    if off_gpu:
        how = sorted({a for t in off_gpu for a in grads[t]})
        return [f"{len(off_gpu)} of {len(grads)} gradient tensors were reduced by {', '.join(how)}, not NCCL "
                f"(e.g. {off_gpu[0]})"]
    return []


def per_gpu_throughput(summary: dict) -> float:
    """Images per second per GPU from a run's summary.json (all ranks train at the same pace)."""
    return summary["images_per_sec"] / summary["world_size"]


def probe() -> None:
    """Pins this rank's device as training does and prints what it sees, on one tagged line."""
    sys.path.insert(0, ROOT)
    import socket

    import tensorflow as tf

    from trainer.distributed import DistContext

    ctx = DistContext.initialize()
    report = {"rank": ctx.rank, "local_rank": ctx.local_rank, "host": socket.gethostname(),
              "physical_gpus": len(tf.config.list_physical_devices("GPU")),
              "logical_gpus": len(tf.config.list_logical_devices("GPU")), "pinned": ctx.gpu,
              "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    print(PROBE_TAG + json.dumps(report), flush=True)


def probe_argv(np_: int) -> list[str]:
    """horovodrun starting the probe on `np_` local ranks."""
    bindir = os.path.dirname(sys.executable)
    return [os.path.join(bindir, "horovodrun"), "-np", str(np_), "-H", f"localhost:{np_}", "--gloo",
            sys.executable, os.path.join(ROOT, "scripts", "gpu_checks.py"), "probe"]


def _run(argv: list[str]) -> str:
    print("+ " + " ".join(argv), flush=True)
    res = subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if res.returncode:
        sys.stdout.write(res.stdout)
        raise SystemExit(f"gpu smoke: exit code {res.returncode} from {argv[0]}")
    return res.stdout


def smoke(np_: int | None, epochs: int, out: str) -> int:
    """The operator's first check on a GPU node; returns the exit code."""
    py, bindir = sys.executable, os.path.dirname(sys.executable)
    with open(os.path.join(os.path.dirname(bindir), ".horovod-build"), encoding="utf-8") as f:
        cuda_major = build_cuda_major(f.read())
    problems = driver_problems(_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
                               cuda_major)
    np_ = np_ or count_gpus(_run(["nvidia-smi", "-L"]))
    if np_ < 1:
        problems.append("nvidia-smi lists no GPU")
    else:
        reports = parse_probes(_run(probe_argv(np_)))
        problems += probe_problems(reports, np_)
        timeline, run_dir = os.path.join(out, "timeline.json"), os.path.join(out, "run")
        _run([py, "scripts/run_digits.py", "--np", str(np_), "--timeline", timeline, "--set", f"run_dir={run_dir}",
              "--set", f"train.epochs={epochs}", "--set", f"data.global_batch_size={64 * np_}"])
        with open(timeline, encoding="utf-8") as f:
            problems += timeline_problems(load_timeline(f.read()))
        with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
        print(f"throughput: {summary['images_per_sec']:.0f} img/s on {np_} GPUs, "
              f"{per_gpu_throughput(summary):.0f} img/s per GPU")
    for p in problems:
        print(f"gpu smoke: FAILED: {p}")
    print("gpu smoke: " + ("FAILED" if problems else "passed"))
    return 1 if problems else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("smoke", help="the whole check on this node's GPUs")
    s.add_argument("--np", type=int, help="ranks (default: the GPUs nvidia-smi lists)")
    s.add_argument("--epochs", type=int, default=3)
    s.add_argument("--out", help="folder for the timeline and the run (default: a new temporary one)")
    sub.add_parser("build", help="check that this environment is a CUDA + NCCL build")
    sub.add_parser("probe", help="one rank's report (run under horovodrun)")
    t = sub.add_parser("timeline", help="check a Horovod timeline file")
    t.add_argument("file")
    args = parser.parse_args(argv)
    if args.cmd == "build":
        return build()
    if args.cmd == "probe":
        probe()
        return 0
    if args.cmd == "timeline":
        try:
            with open(args.file, encoding="utf-8") as f:
                events = load_timeline(f.read())
        except (OSError, ValueError) as e:
            print(f"gpu_checks: cannot read timeline {args.file}: {e}", file=sys.stderr)
            return 2
        problems = timeline_problems(events)
        print("\n".join(problems) or "every gradient allreduce went through NCCL")
        return 1 if problems else 0
    return smoke(args.np, args.epochs, args.out or tempfile.mkdtemp(prefix="gpu-smoke-"))


if __name__ == "__main__":
    sys.exit(main())

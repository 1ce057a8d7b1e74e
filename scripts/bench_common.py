"""What the benchmark scripts share: the results file, the statistics of repeated runs, the machine record.

bench.py, bench_conversion.py and bench_input.py import this module and never
each other's helpers, so the benchmarks form no import circle.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from data_pipeline import atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results.json")


def stats(values: list[float]) -> dict:
    """Median, min and max of repeated measurements (the machine is noisy: one figure would mislead)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "samples": [round(v, 3) for v in values]}


def merge_results(path: str, key: str, result: dict) -> None:
    """Sets `key` in the JSON results file, keeping the entries of the other benchmarks."""
    results = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    results[key] = result
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic.write_json(path, results)


def machine() -> dict:
    """The machine a figure was measured on: figures from different machines do not compare.

    The CPU's model and its bfloat16 instruction sets are part of it: the
    same 2 cores of another model differ in speed, and `train.precision:
    auto` follows those flags.
    """
    from trainer.assembly import BFLOAT16_CPU_FLAGS, cpuinfo

    info = cpuinfo()
    flags = set(info.get("flags", "").split())
    # A virtual machine may name only the vendor's line ("AMD EPYC"): the family and model tell its generation.
    cpu = f"{info.get('model name', '')} (family {info.get('cpu family', '')}, model {info.get('model', '')})"
    return {"cpus": os.cpu_count(), "cpu": cpu,
            "bfloat16_flags": [f for f in BFLOAT16_CPU_FLAGS if f in flags],
            "platform": platform.platform(), "python": platform.python_version()}


def timestamp() -> str:
    """The local date and time of a measurement, as stored in results.json."""
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def bench_env() -> dict:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}


def trainer_summary(np_: int, config: str, sets: tuple[str, ...] = (), launch_options: tuple[str, ...] = (),
                    env: dict | None = None) -> dict:
    """One run of this trainer through the launcher (one thread per rank, a fresh run_dir): its summary.json."""
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run(
            [sys.executable, "-m", "launch", "--np", str(np_), *launch_options, "--config", config,
             "--set", f"run_dir={tmp}/run", "--set", "runtime.intra_op_threads=1",
             "--set", "runtime.inter_op_threads=1", *(a for kv in sets for a in ("--set", kv))],
            cwd=ROOT, env={**bench_env(), **(env or {})}, capture_output=True, text=True,
        )
        if res.returncode:
            raise RuntimeError(f"trainer np={np_} {' '.join(sets)} failed: {res.stderr[-2000:]}")
        with open(os.path.join(tmp, "run", "summary.json"), encoding="utf-8") as f:
            return json.load(f)

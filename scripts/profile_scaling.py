"""Where the time of an np=2 run goes: a Horovod timeline and the CPU time of every thread of each rank.

    python scripts/profile_scaling.py [--warmup-sec 35] [--window-sec 20] [--no-timeline] [-- LAUNCH OPTIONS]

Runs the trainer's ResNet-20 benchmark (scripts/bench.py's trainer section: 64
images per replica, 1 intra-op and 1 inter-op thread per rank) at np=2, lets it
warm up, then over a steady-state window of `--window-sec`:
  - reads /proc/<pid>/task/*/stat and schedstat of both ranks at the window's
    two ends: CPU seconds per thread, and the time it waited for a CPU while
    runnable (the run queue: what two cores shared by more busy threads cost);
  - samples every thread's state and wait channel every 10 ms, which names
    the threads that /proc calls only `python` (see `classify`);
  - with the timeline (the default), sums rank 0's Horovod timeline over the
    same window: allreduces per second, and the time per step spent in
    negotiation (waiting until both ranks have submitted) and in the allreduce.
Then stops the run (SIGTERM: the trainer stops at an agreed step) and prints a
table; `--json FILE` writes the figures. Anything after `--` goes to the
launcher (for example `--cycle-time-ms 5`).
"""

import argparse
import collections
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = os.sysconf("SC_CLK_TCK")
BATCH = 64


def threads(pid: int) -> dict[int, dict]:
    """Every thread of `pid`: name, state, CPU ticks, start tick, and schedstat (ns on CPU, ns runnable waiting)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        base = f"/proc/{pid}/task/{tid}"
        try:
            with open(f"{base}/stat", encoding="utf-8") as f:
                raw = f.read()
            with open(f"{base}/schedstat", encoding="utf-8") as f:
                on_cpu, waiting = (int(x) for x in f.read().split()[:2])
            with open(f"{base}/wchan", encoding="utf-8") as f:
                wchan = f.read().strip() or "-"
        except OSError:  # the thread ended between listdir and open
            continue
        name, rest = raw[raw.index("(") + 1: raw.rindex(")")], raw[raw.rindex(")") + 2:].split()
        out[int(tid)] = {"name": name, "state": rest[0], "ticks": int(rest[11]) + int(rest[12]),
                         "start": int(rest[19]), "on_cpu_ns": on_cpu, "wait_ns": waiting, "wchan": wchan}
    return out


def classify(pid: int, first: dict, samples: dict) -> dict[int, str]:
    """A role for each thread, from its name, where it sleeps, and when it started.

    TensorFlow names its pools (tf_Compute, tf_data_*); the rest are `python`.
    Gloo's TCP loop sleeps in epoll; Horovod's background thread is the one
    that started last before it, since that thread creates the Gloo context.
    A `python` thread that never sleeps (wait channel 0) is the timeline's
    writer, which rank 0 runs when a timeline is recorded.
    """
    roles = {}
    dominant = {tid: collections.Counter(s).most_common(1)[0][0] for tid, s in samples.items() if s}
    gloo = [tid for tid, w in dominant.items() if w in ("do_epoll_wait", "ep_poll")]
    for tid in gloo:
        roles[tid] = "Gloo TCP loop"
    if gloo:
        start = min(first[t]["start"] for t in gloo)
        before = [t for t, v in first.items() if v["name"] == "python" and t not in gloo and t != pid
                  and v["start"] <= start]
        if before:
            roles[max(before, key=lambda t: (first[t]["start"], t))] = "Horovod background"
    for tid, v in first.items():
        if tid in roles:
            continue
        if v["name"] == "python" and tid != pid and dominant.get(tid) == "0":
            roles[tid] = "spinning: Horovod timeline writer (rank 0)"  # sched_yield in a loop, never asleep
        elif tid == pid:
            roles[tid] = "Python main (Keras loop, callbacks, op dispatch)"
        elif v["name"].startswith("tf_data"):
            roles[tid] = "tf.data"
        elif v["name"].startswith("tf_"):
            roles[tid] = f"TensorFlow {v['name']}"
        else:
            roles[tid] = f"other ({v['name']}, sleeps in {dominant.get(tid, '-')})"
    return roles


class Progress:
    """Rank 0's progress bar, read from the launcher's output: the last step drawn, and when.

    The bar is redrawn at each step's end unless 0.1 s have not passed, so with
    steps of that length or more the count is exact.
    """

    def __init__(self, stream):
        self.step, self.at = 0, 0.0
        self._stream = stream
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for chunk in iter(lambda: os.read(self._stream.fileno(), 65536), b""):
            steps = re.findall(rb"\] (\d+)/\d+", chunk)
            if steps:
                self.step, self.at = int(steps[-1]), time.time()

    def wait_for(self, step: int, launcher: subprocess.Popen, timeout: float) -> None:
        deadline = time.time() + timeout
        while self.step < step:
            if launcher.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the run did not reach step {step} (exit code {launcher.poll()})")
            time.sleep(0.05)


def workers(launcher: psutil.Process, np_: int, timeout: float = 120) -> dict[int, int]:
    """{rank: pid} of the trainer processes under the launcher."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = {}
        for p in launcher.children(recursive=True):
            try:
                rank = p.environ().get("HOROVOD_RANK")
                if rank is not None and "trainer.train" in " ".join(p.cmdline()):
                    found[int(rank)] = p.pid
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        if len(found) == np_:
            return found
        time.sleep(0.2)
    raise RuntimeError(f"the {np_} trainer processes did not start within {timeout:.0f} s")


def thread_profile(pids: dict[int, int], window: float) -> tuple[dict, float]:
    """Per rank and role: CPU seconds, run-queue wait and the share of samples spent runnable, over `window`."""
    first = {r: threads(p) for r, p in pids.items()}
    samples = {r: collections.defaultdict(list) for r in pids}
    running = {r: collections.Counter() for r in pids}
    t0 = time.time()
    while time.time() - t0 < window:
        for r, p in pids.items():
            for tid, v in threads(p).items():
                samples[r][tid].append(v["wchan"])
                running[r][tid] += v["state"] == "R"
        time.sleep(0.01)
    elapsed = time.time() - t0
    last = {r: threads(p) for r, p in pids.items()}
    result = {}
    for r, p in pids.items():
        roles = classify(p, first[r], samples[r])
        rows = collections.defaultdict(lambda: {"cpu_sec": 0.0, "runqueue_wait_sec": 0.0, "runnable_share": 0.0,
                                                "threads": 0})
        for tid, v in first[r].items():
            if tid not in last[r]:
                continue
            row = rows[roles[tid]]
            row["cpu_sec"] += (last[r][tid]["on_cpu_ns"] - v["on_cpu_ns"]) / 1e9
            row["runqueue_wait_sec"] += (last[r][tid]["wait_ns"] - v["wait_ns"]) / 1e9
            row["runnable_share"] += running[r][tid] / max(len(samples[r][tid]), 1)
            row["threads"] += 1
        result[str(r)] = {k: {**v, "cpu_share": v["cpu_sec"] / elapsed} for k, v in sorted(rows.items())}
    return result, elapsed


def load_timeline(path: str) -> list[dict]:
    """The timeline's events; a file cut off mid-event is read up to its last whole event."""
    with open(path, encoding="utf-8") as f:
        text = f.read().rstrip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return json.loads(text[: text.rindex("}") + 1] + "]")


def timeline_profile(path: str, start: float, end: float) -> dict:
    """Rank 0's allreduce cycles within [start, end] (Unix seconds): rate, negotiation and allreduce time."""
    events = load_timeline(path)
    origin = next(e["args"]["start_time_since_epoch_in_micros"] for e in events
                  if e.get("name") == "process_name" and e.get("pid") == 0)
    lo, hi = (start * 1e6 - origin), (end * 1e6 - origin)
    open_spans: dict[int, list] = collections.defaultdict(list)
    spans = collections.defaultdict(list)  # (activity) -> [(begin, end)] of the first tensor of each cycle
    for e in events:
        if e.get("ph") == "B":
            open_spans[e["pid"]].append((e["name"], e["ts"]))
        elif e.get("ph") == "E" and open_spans[e["pid"]]:
            name, begin = open_spans[e["pid"]].pop()
            if lo <= begin and e["ts"] <= hi:
                spans[name].append((begin, e["ts"]))
    # The tensors of one grouped allreduce have overlapping spans of each
    # activity: merged, they give one interval per allreduce (cycle).
    cycles = {name: merge(s) for name, s in spans.items()}
    seconds = end - start
    allreduces = len(cycles.get("ALLREDUCE", []))
    per_cycle = {name: sum(b - a for a, b in s) / 1e3 / max(allreduces, 1) for name, s in cycles.items()}
    return {"allreduces_per_sec": allreduces / seconds, "allreduces": allreduces,
            "ms_per_allreduce": {k: round(v, 3) for k, v in sorted(per_cycle.items())},
            "tensors_per_allreduce": round(len(spans.get("ALLREDUCE", [])) / max(allreduces, 1), 1)}


def merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of `intervals`, as disjoint intervals in order."""
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def print_table(result: dict) -> None:
    print(f"\nwindow {result['window_sec']:.1f} s, {result['steps']} steps, {result['images_per_sec']:.1f} images/s; "
          "per rank, CPU seconds per wall second by thread role")
    print(f"{'rank':<5}{'role':<54}{'threads':>8}{'cpu/s':>8}{'runq/s':>8}{'runnable':>9}")
    for rank, rows in result["threads"].items():
        for role, v in sorted(rows.items(), key=lambda kv: -kv[1]["cpu_sec"]):
            print(f"{rank:<5}{role[:53]:<54}{v['threads']:>8}{v['cpu_share']:>8.3f}"
                  f"{v['runqueue_wait_sec'] / result['window_sec']:>8.3f}{v['runnable_share']:>9.2f}")
        total = sum(v["cpu_share"] for v in rows.values())
        print(f"{rank:<5}{'total':<54}{'':>8}{total:>8.3f}")
    if "timeline" in result:
        t = result["timeline"]
        print(f"\ntimeline (rank 0): {t['allreduces_per_sec']:.2f} allreduces/s "
              f"= {t['allreduces_per_sec'] * BATCH * 2:.1f} images/s, {t['tensors_per_allreduce']} tensors each")
        for name, ms in t["ms_per_allreduce"].items():
            print(f"  {name:<32}{ms:>9.2f} ms per allreduce (union over its tensors)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--warmup-steps", type=int, default=8, help="steps before the window starts")
    p.add_argument("--window-sec", type=float, default=20.0)
    p.add_argument("--no-timeline", action="store_true", help="no Horovod timeline (its writer thread spins)")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("launch", nargs="*", help="launcher options, after --")
    args = p.parse_args()
    if args.warmup_steps < 1 or args.window_sec <= 0:
        p.error("--warmup-steps must be >= 1 and --window-sec > 0")
    with tempfile.TemporaryDirectory(prefix="profile-scaling-") as tmp:
        timeline = None if args.no_timeline else os.path.join(tmp, "timeline.json")
        argv = [sys.executable, "-m", "launch", "--np", "2", *(["--timeline", timeline] if timeline else []),
                *args.launch, "--config", "configs/bench_resnet20.yaml", "--set", f"run_dir={tmp}/run",
                "--set", f"data.global_batch_size={2 * BATCH}", "--set", "train.steps_per_epoch=100000",
                "--set", "train.epochs=1", "--set", "train.keep_checkpoints=1"]
        # Rank 0 draws its progress bar (trainer.console.PROGRESS_ENV): the step count to time the window by.
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "HVD_KERAS_PROGRESS_BAR": "1"}
        launcher = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            progress = Progress(launcher.stdout)
            pids = workers(psutil.Process(launcher.pid), 2)
            progress.wait_for(args.warmup_steps, launcher, timeout=600)
            first_step, first_at = progress.step, progress.at
            start = time.time()
            per_thread, elapsed = thread_profile(pids, args.window_sec)
            steps, seconds = progress.step - first_step, progress.at - first_at
            result = {"window_sec": elapsed, "launch_options": args.launch, "steps": steps,
                      "images_per_sec": steps * 2 * BATCH / seconds if seconds > 0 else 0.0, "threads": per_thread}
        finally:
            launcher.send_signal(signal.SIGTERM)  # the trainer stops at an agreed step and writes a checkpoint
            try:
                launcher.wait(timeout=120)
            except subprocess.TimeoutExpired:
                launcher.kill()
                launcher.wait()
        if timeline:
            result["timeline"] = timeline_profile(timeline, start, start + elapsed)
    print_table(result)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

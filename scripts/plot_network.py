"""docs/scaling.png from bench/results.json's `network` entry (`make bench ARGS="--only network"` first).

    python scripts/plot_network.py [--results bench/results.json] [--out docs/scaling.png]

Left: allreduce time against message size at each emulated rate, measured
(points) and the ring model at the tc rate (lines). Right: the trainer's
measured step time against `launch plan`'s prediction, with the ±25% band
(the knobs once per repetition, from the `network_knobs` entry when there is one:
`--only network_knobs` measures them again alone).

matplotlib is needed for this picture only: it is installed with
`pip install --target` into a folder of pip's cache on first use and put on
sys.path for this process, so the project's environment does not carry it.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# matplotlib's own dependencies that the venv lacks (numpy, pillow and packaging are there already).
PACKAGES = ("matplotlib~=3.11", "contourpy", "cycler", "fonttools", "kiwisolver", "pyparsing", "python-dateutil", "six")


def matplotlib_path() -> str:
    cache = subprocess.run([sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True,
                           check=True).stdout.strip()
    target = os.path.join(cache, "hvd-keras-cnn", "matplotlib")
    if not os.path.isdir(os.path.join(target, "matplotlib")):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                        "--target", target, *PACKAGES], check=True)
    return target


def allreduce_panel(ax, sweeps: list[dict]) -> None:
    for sweep in sweeps:
        pts = sweep["points"]
        label = f"{sweep['tc_rate_bps'] / 1e6:g} Mbit/s, {sweep['hosts'].count(',') + 1} nodes, p={sweep['ranks']}"
        line = ax.plot([p["bytes"] for p in pts], [p["predicted_seconds"] for p in pts], "-", lw=1)[0]
        ax.plot([p["bytes"] for p in pts], [p["seconds"] for p in pts], "o", ms=4, color=line.get_color(),
                label=label)
    ax.set(xscale="log", yscale="log", xlabel="message (bytes)", ylabel="allreduce time (s)",
           title="Horovod allreduce over shaped links\npoints measured, lines the ring model at the tc rate")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)


def trainer_panel(ax, points: list[dict], runs: list[dict]) -> None:
    """Each trainer point's medians; each knob of each repetition on its own (r1, r2, ...)."""
    from matplotlib import ticker  # main() has put matplotlib on sys.path

    rows = [(p["step_seconds"]["median"], p["predicted_step_seconds"]["median"],
             f"{p['model']} {p['tc_rate_bps'] / 1e6:g}M") for p in points]
    rows += [(v["step_seconds"], v["predicted_step_seconds"], f"{k} r{i}")
             for i, run in enumerate(runs, 1) for k, v in run["knobs"].items() if k != "default"]
    measured, predicted = [r[0] for r in rows], [r[1] for r in rows]
    lo, hi = min(measured + predicted) / 1.5, max(measured + predicted) * 1.5
    ax.fill_between([lo, hi], [lo / 1.25, hi / 1.25], [lo * 1.25, hi * 1.25], color="0.9", label="±25%")
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
    ax.plot(measured, predicted, "o", ms=5)
    for m, p, (_, _, label) in zip(measured, predicted, rows):
        ax.annotate(label, (m, p), fontsize=6, xytext=(3, -8), textcoords="offset points")
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel="measured step (s)",
           ylabel="predicted step (s)", title="Trainer on 2 nodes: step time\nmeasured vs `launch plan`")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(True, which="both", alpha=0.3)
    # Labels at 1-2-5 steps in plain seconds: the log axis's own minor labels overlap on a span of two decades.
    ticks = [t for t in (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20) if lo <= t <= hi]
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_minor_formatter(ticker.NullFormatter())
        axis.set_major_locator(ticker.FixedLocator(ticks))
        axis.set_major_formatter(ticker.FormatStrFormatter("%g"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "results.json"))
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "scaling.png"))
    args = p.parse_args()
    with open(args.results, encoding="utf-8") as f:
        results = json.load(f)
    if "network" not in results:
        print(f"{args.results} has no `network` entry: run make bench ARGS=\"--only network\" first", file=sys.stderr)
        return 2
    sys.path.insert(0, matplotlib_path())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    net = results["network"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6))
    allreduce_panel(left, net["allreduce"])
    trainer_panel(right, net["trainer"], results.get("network_knobs", net)["runs"])
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Horovod's settings at np=2, side by side (`python scripts/bench.py --only scaling`).

Each repetition runs two plain Keras processes at once (the machine's limit,
as bench.py's run d) and this trainer at np=2 with each variant below, in an
order rotated per repetition so that no variant always runs first or last.
Reported per variant: scaling efficiency (variant / two plain processes) and
the ratio to the launcher's default settings, both per repetition, as median,
min and max. The launcher's defaults are chosen from these figures
(docs/benchmarks.md#scaling-settings).
"""

import time

from bench_common import machine, stats, timestamp

# name -> (launcher options, extra environment, config --set). "default" is the launcher as a user runs it.
VARIANTS = {
    "default": ((), {}, ()),  # a 50 ms cycle woken on enqueue, each rank on its own core
    "cycle_5ms": (("--cycle-time-ms", "5"), {}, ()),  # the launcher's cycle before 2026-12-05
    "cycle_1ms": (("--cycle-time-ms", "1"), {}, ()),  # Horovod's own default
    "unbound": ((), {}, ("runtime.bind_cores=none",)),  # every thread on any core
    "fusion_0mb": (("--fusion-threshold-mb", "0"), {}, ()),
    "autotune": (("--autotune",), {}, ()),
    "mpi": (("--mpi",), {}, ()),
}


def scaling_bench(args, steps: int, trainer_rate, plain, plain_rate, variants=tuple(VARIANTS)) -> dict:
    """The variants' images/s and ratios; `trainer_rate`, `plain` and `plain_rate` are bench.py's runners."""
    runs: dict[str, list[float]] = {"two_plain_keras_1thread_summed": [], **{v: [] for v in variants}}
    started = time.time()
    for rep in range(args.repeats):
        pair = [plain(1, steps), plain(1, steps)]
        runs["two_plain_keras_1thread_summed"].append(sum(plain_rate(q) for q in pair))
        order = variants[rep % len(variants):] + variants[: rep % len(variants)]
        for name in order:
            options, env, sets = VARIANTS[name]
            runs[name].append(trainer_rate(2, steps, *options, sets=sets, env=env))
        print(f"scaling repeat {rep + 1}/{args.repeats}: "
              + ", ".join(f"{k}={v[-1]:.1f}" for k, v in runs.items()), flush=True)
    pair = runs["two_plain_keras_1thread_summed"]
    efficiency = {v: stats([r / d for r, d in zip(runs[v], pair)]) for v in variants}
    vs_default = {v: stats([r / d for r, d in zip(runs[v], runs["default"])]) for v in variants if v != "default"}
    print(f"\n{'variant':<20}{'efficiency':>11}{'min':>8}{'max':>8}{'/default':>10}{'min':>8}{'max':>8}")
    for v in variants:
        e, d = efficiency[v], vs_default.get(v)
        tail = f"{d['median']:>10.3f}{d['min']:>8.3f}{d['max']:>8.3f}" if d else f"{'-':>10}"
        print(f"{v:<20}{e['median']:>11.3f}{e['min']:>8.3f}{e['max']:>8.3f}{tail}")
    return {
        "model": "resnet20", "per_replica_batch_size": 64, "steps_per_epoch": steps, "repeats": args.repeats,
        "variants": {v: {"launch_options": list(VARIANTS[v][0]), "env": VARIANTS[v][1], "sets": list(VARIANTS[v][2])}
                     for v in variants},
        "images_per_sec": {k: stats(v) for k, v in runs.items()},
        "scaling_efficiency": efficiency, "ratio_to_default": vs_default,
        "machine": machine(), "date": timestamp(), "bench_seconds": round(time.time() - started, 1),
    }

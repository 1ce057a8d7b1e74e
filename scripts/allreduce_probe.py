"""Times Horovod allreduces of given sizes on every rank; rank 0 prints one JSON line per size.

Started by horovodrun (scripts/bench_network.py, tests/test_network.py):

    horovodrun -np 2 -H node1:1,node2:1 python scripts/allreduce_probe.py --sizes 4096,1048576

Each size is a float32 tensor of that many bytes, averaged with
horovod.tensorflow's allreduce as the trainer's step does it (one grouped
allreduce, compression optional). One warm-up call per size, timed on every
rank, sets how many calls fit in --budget-seconds (the slowest rank's figure,
so every rank runs the same number of calls); the figure reported is the
median over those calls of the slowest rank's time.
"""

import argparse
import json
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", required=True, help="comma-separated message sizes in bytes")
    parser.add_argument("--budget-seconds", type=float, default=3.0, help="time to spend on each size")
    parser.add_argument("--max-calls", type=int, default=20)
    parser.add_argument("--fp16", action="store_true", help="Horovod's fp16 compression")
    args = parser.parse_args()

    import horovod.tensorflow as hvd
    import tensorflow as tf

    hvd.init()
    compression = hvd.Compression.fp16 if args.fp16 else hvd.Compression.none

    def timed(tensor) -> float:
        """One allreduce's wall time, the slowest rank's (they start together after the previous call)."""
        start = time.perf_counter()
        hvd.grouped_allreduce([tensor], op=hvd.Average, compression=compression)[0].numpy()
        took = time.perf_counter() - start
        return float(hvd.allreduce(tf.constant(took, tf.float64), op=hvd.Max).numpy())

    for size in (int(s) for s in args.sizes.split(",")):
        tensor = tf.fill([max(1, size // 4)], float(hvd.rank() + 1))
        first = timed(tensor)
        calls = int(min(args.max_calls, max(3, args.budget_seconds // max(first, 1e-6))))
        times = [timed(tensor) for _ in range(calls)]
        if hvd.rank() == 0:
            print(json.dumps({"bytes": size, "ranks": hvd.size(), "seconds": statistics.median(times),
                              "min": min(times), "max": max(times), "calls": calls}), flush=True)


if __name__ == "__main__":
    main()

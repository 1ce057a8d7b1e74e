"""Data-parallel training of Keras 3 CNNs with Horovod: config, step, loop and outputs."""

import gc
import os
import sys
from typing import NoReturn

# TensorFlow's C++ warnings are off unless the caller sets the variable (0 shows them all), as the launcher does
# for its ranks: for example the rendezvous that an image which does not decode aborts, which trainer.predict
# reports itself in one line. (TensorFlow's first start-up line is printed whatever the level.)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def exit_after_collecting(code: int) -> NoReturn:
    """sys.exit(code) for the entry points (train, evaluate, predict), without the exit's collection of everything.

    At exit, Python collects the reference cycles of every object still alive:
    TensorFlow's and Keras's modules, functions and graphs, hundreds of
    thousands of objects. That took 0.4 to 0.8 s of a 6.5 s single-process
    digits run (`perf`: most of the exit in gc_collect_main), on every rank,
    at every start. Once `main` has returned, everything it wrote is closed
    (checkpoints, the export, summary.json, the TensorBoard writers): the
    garbage left is collected once (finalizers run as usual), and the objects
    still alive are frozen (`gc.freeze`), which the exit's collections skip.
    atexit handlers (Horovod's shutdown, logging's flush) and module teardown
    still run; cycles among the objects alive at the end are left to the
    system, which takes the process's memory back.
    """
    gc.collect()
    gc.freeze()
    sys.exit(code)

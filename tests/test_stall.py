"""Horovod's stall check, driven by the launcher's options: a rank that never joins a collective
is named, and the job ends instead of hanging."""

import os
import re
import sys
import time

import pytest

from helpers import run
from launch.command import LaunchOptions, build_command

pytestmark = pytest.mark.horovod

SHUTDOWN_SEC = 5

# Rank 1 never joins the last allreduce (as if stuck in I/O); its Horovod
# background thread keeps running, so the coordinator can see who is missing.
WORKER = """
import sys, time
import horovod.tensorflow as hvd
import tensorflow as tf
hvd.init()
for _ in range(3):
    hvd.allreduce(tf.constant([1.0]), name="grad")  # matched steps: the tensor is in the response cache
if hvd.rank() == 1:
    time.sleep(600)
# One write: mpirun tags every write of a rank's output, and print() writes its arguments one by one.
sys.stdout.write(f"stall begins at {time.time()}\\n")
sys.stdout.flush()
try:
    hvd.allreduce(tf.constant([1.0]), name="grad")
except tf.errors.OpError as e:
    print("rank 0 collective failed:", e.message.strip().splitlines()[-1], flush=True)
    sys.exit(3)
"""


@pytest.mark.parametrize("controller", ["mpi", "gloo"])
def test_a_rank_missing_from_a_collective_is_named_and_the_job_ends(tmp_path, controller):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    opts = LaunchOptions(np=2, config="unused.yaml", controller=controller, stall_warning_sec=2,
                         stall_shutdown_sec=SHUTDOWN_SEC, python=sys.executable,
                         horovodrun=os.path.join(os.path.dirname(sys.executable), "horovodrun"))
    argv, env = build_command(opts, dict(os.environ))
    # The launcher's horovodrun command and stall options, with this worker instead of the trainer.
    argv = argv[: argv.index(sys.executable)] + [sys.executable, str(script)]
    started = time.monotonic()
    res = run(argv, env=env, timeout=300)
    ended = time.time()
    elapsed = time.monotonic() - started
    # mpirun tags each chunk it reads from a rank ("[1,0]<stdout>:"), and may cut one printed line into
    # two chunks: the tags are dropped, so a line reads whole again.
    out = re.sub(r"\[\d+,\d+\]<std(?:out|err)>:", "", res.stdout + res.stderr)
    assert res.returncode != 0, out[-3000:]
    assert "waiting for remainder of ranks for more than 2 seconds" in out, out[-3000:]
    assert "1!: [" in out  # rank 1 is named as the missing one, marked for shutdown
    assert "stalled for longer than 5 seconds. Will shutdown." in out
    assert "rank 0 collective failed: " in out and "Horovod has been shut down" in out
    # Shut down and ended within the shutdown time of the stall, plus checks and process exits: it did not hang.
    stall = float(re.search(r"stall begins at ([\d.]+)", out).group(1))
    assert ended - stall < SHUTDOWN_SEC + 15, f"the job ended {ended - stall:.0f} s after the stall began"
    print(f"{controller}: job ended {elapsed:.0f} s after start (start-up included)")

"""The training loop reads no device value on the host per step: what it needs comes in the step's logs."""

import re
import sys

from helpers import run

# Counts eager variable reads (what .numpy(), float() and read_value() of a
# variable run) in a real single-process run of the trainer's entry point.
COUNTING_RUN = """
import sys
import tensorflow as tf
from tensorflow.python.ops import resource_variable_ops

reads = 0
read = resource_variable_ops.BaseResourceVariable._read_variable_op

def counted(self, *args, **kwargs):
    global reads
    if tf.executing_eagerly():
        reads += 1
    return read(self, *args, **kwargs)

resource_variable_ops.BaseResourceVariable._read_variable_op = counted
from trainer.train import main
code = main(sys.argv[1:])
print("eager_variable_reads", reads)
sys.exit(code)
"""


def eager_reads(tmp_path, steps: int) -> int:
    """The reads of a run of `steps` steps an epoch; the small model with BatchNorm, as ResNet-20 traces 2x longer."""
    res = run([sys.executable, "-c", COUNTING_RUN, "--config", "configs/bench_resnet20.yaml",
               "--set", f"run_dir={tmp_path}/run-{steps}", "--set", "model.name=simple_cnn",
               "--set", "model.image_size=8",
               "--set", f"train.steps_per_epoch={steps}", "--set", "train.epochs=2",
               "--set", "data.global_batch_size=4", "--set", "train.keep_checkpoints=1"])
    assert res.returncode == 0, res.stderr[-3000:]
    return int(re.search(r"eager_variable_reads (\d+)", res.stdout).group(1))


def test_no_device_read_per_step(tmp_path):
    # Same epochs, checkpoints and validations; only the number of steps differs.
    few, many = eager_reads(tmp_path, 2), eager_reads(tmp_path, 8)
    assert few > 0  # the counter sees the once-per-epoch reads (checkpoint step, learning rate)
    assert many == few, f"{many - few} more variable reads for 12 more steps"

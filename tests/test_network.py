"""The emulated cluster's links carry the bandwidth they are shaped to, as the allreduce cost model needs.

Two nodes (scripts/emulated_nodes.py), each one rank, Gloo between their
namespaces, every node's egress shaped by a tc token bucket: a Horovod
allreduce of S bytes must take the ring model's time, the per-call constant
(measured with a small message) plus 2(p-1)/p·S/B. A harness that does not
shape the link, or ranks that talk over another path, fail it by a factor
of tens.
"""

import pytest

from emulated_nodes import EmulatedNodes, allreduce_times
from launch.cost_model import ring_allreduce_seconds

pytestmark = pytest.mark.horovod

RATE_BPS = 100e6  # 100 Mbit/s: a 4 MiB allreduce takes ~0.34 s shaped, ~5 ms unshaped
SMALL, LARGE = 4096, 4 * 1024 * 1024


def test_allreduce_over_a_shaped_link_takes_the_time_of_its_bandwidth(tmp_path):
    with EmulatedNodes(tmp_path / "nodes") as nodes:
        nodes.shape(RATE_BPS)
        small, large = allreduce_times(nodes, "node1:1,node2:1", [SMALL, LARGE], budget_seconds=1.5, timeout=300)
        qdisc = nodes.qdisc("node2")
    assert (small["bytes"], large["bytes"], large["ranks"]) == (SMALL, LARGE, 2)
    predicted = ring_allreduce_seconds(LARGE, 2, 0.0, RATE_BPS / 8, fixed_s=small["seconds"])
    print(f"{LARGE} B over {RATE_BPS / 1e6:.0f} Mbit/s: {large['seconds']:.3f} s measured, {predicted:.3f} s predicted")
    assert 0.8 < large["seconds"] / predicted < 1.25, (large, small, qdisc)
    # The ranks' traffic crossed node2's bucket: every call sent at least half the message from there.
    sent = int(qdisc.split("Sent ")[1].split()[0])
    assert sent >= (large["calls"] + 1) * LARGE / 2, qdisc


@pytest.mark.parametrize("knob", ["default", "accumulation_4", "fp16_compression"])
@pytest.mark.parametrize("ranks", [1, 2])
def test_each_network_knob_runs_the_images_a_step_its_comparison_assumes(knob, ranks):
    """The knobs' images/s against the default's is `factor` x default step / knob step: the runs must do that work.

    A knob that accumulates keeps the model's micro-batch. Scaling the
    global batch by the factor as well ran 4 x 64 images a step where 4 x 16
    were meant, and made accumulation look 4x slower than it is.
    """
    from bench_network import KNOB_POINT, KNOBS, MODELS, run_sets
    from trainer.config import effective_batch_size, load_config

    name = KNOB_POINT[0]
    config, _, batch, _ = MODELS[name]
    sets, _, factor = KNOBS[knob]
    cfg = load_config(config, run_sets(name, ranks, sets))
    assert (cfg.data.global_batch_size, effective_batch_size(cfg)) == (ranks * batch, ranks * batch * factor)

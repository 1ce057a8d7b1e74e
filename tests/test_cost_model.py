"""launch.cost_model and launch.units: the allreduce formula, units, fusion, the knobs and the recommendations.

Pure arithmetic against values worked out by hand; `python -m launch plan`
itself is tests/test_plan.py.
"""

import math
import subprocess
import sys

import pytest

from helpers import ROOT
from launch import cost_model as cm

GOOD_RATES = [
    ("25Gbit", 25e9 / 8), ("100mbit", 100e6 / 8), ("100Mbit/s", 100e6 / 8), ("10Gbps", 10e9 / 8),
    ("1.5kbit", 1500 / 8), ("2Tbit", 2e12 / 8), ("800bit", 100.0), ("1.25GB/s", 1.25e9), ("500MB", 500e6),
    ("3kB", 3e3), ("64B", 64.0), (" 1e3 Mbit ", 1e9 / 8), ("1GBIT", 1e9 / 8),
]
BAD_RATES = [
    ("25", "no unit"), ("25Gb", "unknown unit 'Gb'"), ("25mb", "unknown unit 'mb'"), ("10GbE", "unknown unit"),
    ("0Gbit", "positive"), ("-1Gbit", "negative"), ("nanGbit", "not a number"), ("infMbit", "not a number"),
    ("1e400Gbit", "finite"), ("", "not a number"), ("fast", "not a number"), ("1e-400Gbit", "positive"),
]
GOOD_TIMES = [("20us", 20e-6), ("1.5ms", 1.5e-3), ("0.2s", 0.2), ("0", 0.0), ("0us", 0.0), ("50ns", 50e-9),
              ("3µs", 3e-6), ("2MS", 2e-3)]
BAD_TIMES = [("20", "no unit"), ("-1ms", "negative"), ("5min", "unknown unit 'min'"), ("ms", "not a number"),
             ("1e999s", "finite")]


@pytest.mark.parametrize("text,expected", GOOD_RATES)
def test_bandwidths_parse_to_bytes_per_second(text, expected):
    assert cm.parse_bandwidth(text) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("text,why", BAD_RATES)
def test_bad_bandwidths_are_one_line_naming_the_text(text, why):
    with pytest.raises(ValueError) as e:
        cm.parse_bandwidth(text)
    assert why in str(e.value) and repr(text) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text,expected", GOOD_TIMES)
def test_durations_parse_to_seconds(text, expected):
    assert cm.parse_duration(text) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("text,why", BAD_TIMES)
def test_bad_durations_are_one_line_naming_the_text(text, why):
    with pytest.raises(ValueError) as e:
        cm.parse_duration(text)
    assert why in str(e.value) and repr(text) in str(e.value)


def test_ring_allreduce_by_hand():
    # 4 ranks, 1 MB at 100 MB/s, 10 us, 2 ms fixed: 2 ms + 6 x 10 us + 1.5 x 10 ms.
    assert cm.ring_allreduce_seconds(1e6, 4, 1e-5, 1e8, 0.002) == pytest.approx(0.002 + 6e-5 + 0.015)
    # Three fused allreduces in one cycle: the cycle's constant once, the ring latency three times.
    terms = cm.allreduce_terms(1e6, 4, 1e-5, 1e8, 0.002, count=3)
    assert (terms.fixed, terms.latency, terms.bandwidth) == pytest.approx((0.002, 18e-5, 0.015))
    terms = cm.allreduce_terms(1e6, 4, 1e-5, 1e8, 0.002, count=3, per_allreduce_s=1e-4)
    assert terms.fixed == pytest.approx(0.0023) and terms.total == pytest.approx(0.0023 + 18e-5 + 0.015)
    assert cm.ring_allreduce_seconds(1e9, 1, 1.0, 1.0, 5.0) == 0
    # A gather and broadcast of log2(8) = 3 steps each; the cycle starts when the gradients are ready (Gloo).
    assert cm.horovod_fixed_seconds(0.005, 8, 1e-5) == pytest.approx(6e-5)
    # Sleeping out the cycle (MPI): half of the 5 ms cycle more.
    assert cm.horovod_fixed_seconds(0.005, 8, 1e-5, wake_on_enqueue=False) == pytest.approx(0.0025 + 6e-5)


def test_fusion_chunks():
    assert cm.fusion_chunks(300 * cm.MIB, 128 * cm.MIB) == 3
    assert cm.fusion_chunks(128 * cm.MIB, 128 * cm.MIB) == 1
    assert cm.fusion_chunks(128 * cm.MIB + 1, 128 * cm.MIB) == 2
    assert cm.fusion_chunks(300 * cm.MIB, 128 * cm.MIB, tensors=1) == 1  # a tensor is never split
    assert cm.fusion_chunks(10, 0, tensors=7) == 7  # fusion off: one allreduce per tensor
    assert cm.fusion_chunks(0, 128) == 0


def test_fusion_packs_whole_tensors_in_order():
    assert cm.fused_allreduces([3, 3, 3], 5) == 3  # 3 + 3 > 5: each alone, not ceil(9 / 5) = 2
    assert cm.fused_allreduces([2, 2, 2, 2], 4) == 2
    assert cm.fused_allreduces([1, 4, 1, 1], 4) == 3  # [1], [4], [1, 1]: in order, no reordering
    assert cm.fused_allreduces([10], 4) == 1  # larger than the threshold: alone, whole
    assert cm.fused_allreduces([1, 1, 1], 0) == 3 and cm.fused_allreduces([], 4) == 0
    model = cm.ModelBytes(6, 24, 8, 3, 2, trainable_tensor_bytes=(8, 8, 8), state_tensor_bytes=(4, 4))
    # float32 at 16 bytes: [8, 8], [8, 4 (state), 4 (state)], [4, 4 (the two scalars)]
    assert model.allreduces(False, 16) == 3 and model.allreduces(False, 12) == 4  # [8], [8], [8, 4], [4, 4, 4]
    # float16 gradients [4, 4, 4] apart from the float32 state [4, 4, 4, 4]
    assert model.allreduces(True, 12) == 1 + 2 and model.allreduces(True, 16) == 2
    assert model.allreduces(True, 100) == 2 and model.allreduces(False, 100) == 1  # two dtypes never fuse


MODEL = cm.ModelBytes(trainable_params=25_000_000, trainable_bytes=100_000_000, state_bytes=200_000,
                      trainable_tensors=200, state_tensors=100)
NET = cm.Cluster(nodes=4, gpus_per_node=2, bandwidth_Bps=1e9, latency_s=1e-5)
FIXED = cm.Settings(fixed_s=0.001)


def test_a_step_by_hand():
    p = cm.predict(MODEL, 0.1, NET, 32, FIXED)
    s = 100_000_000 + 200_000 + 8
    comm = 0.001 + 2 * 7 * 1e-5 + 2 * 7 / 8 * s / 1e9
    assert (p.ranks, p.allreduces, p.message_bytes) == (8, 1, s)
    assert p.comm_s == pytest.approx(comm) and p.step_s == pytest.approx(0.1 + comm)
    assert p.global_batch == 256 and p.images_per_sec == pytest.approx(256 / (0.1 + comm))
    assert p.efficiency == pytest.approx(0.1 / (0.1 + comm))
    one_node = cm.predict(MODEL, 0.1, cm.Cluster(1, 8, 1e9, 1e-5), 32, FIXED)
    assert not one_node.network and one_node.comm_s == 0 and one_node.efficiency == 1


def test_fusion_threshold_adds_a_ring_latency_per_allreduce():
    small = cm.Settings(fixed_s=0.001, fusion_threshold_bytes=40 * cm.MIB)  # 100.2 MB: 3 allreduces
    p, one = cm.predict(MODEL, 0.1, NET, 32, small), cm.predict(MODEL, 0.1, NET, 32, FIXED)
    assert p.allreduces == 3
    assert p.comm_s - one.comm_s == pytest.approx(2 * 14e-5) and p.terms.fixed == 0.001
    assert p.terms.bandwidth == pytest.approx(one.terms.bandwidth)
    off = cm.predict(MODEL, 0.1, NET, 32, cm.Settings(fixed_s=0.001, fusion_threshold_bytes=0))
    assert off.allreduces == 200 + 100 + 2


def test_accumulation_multiplies_compute_and_images_not_communication():
    one = cm.predict(MODEL, 0.1, NET, 32, FIXED)
    four = cm.predict(MODEL, 0.1, NET, 32, cm.Settings(accumulation_steps=4, fixed_s=0.001))
    assert four.compute_s == pytest.approx(0.4) and four.comm_s == pytest.approx(one.comm_s)
    assert four.global_batch == 4 * one.global_batch
    assert four.efficiency == pytest.approx(0.4 / (0.4 + one.comm_s)) and four.efficiency > one.efficiency


def test_fp16_halves_the_gradients_only_and_sends_two_allreduces():
    p = cm.predict(MODEL, 0.1, NET, 32, cm.Settings(fp16=True, fixed_s=0.001))
    assert p.gradient_bytes == 50_000_000 and p.message_bytes == 50_000_000 + 200_000 + 8
    assert p.allreduces == 2  # float16 gradients and float32 state are never fused together
    assert p.terms.bandwidth == pytest.approx(2 * 7 / 8 * p.message_bytes / 1e9)


def _efficiency(k: int, fp16: bool = False) -> float:
    return cm.predict(MODEL, 0.1, NET, 32, cm.Settings(fp16=fp16, accumulation_steps=k, fixed_s=0.001)).efficiency


def test_recommendations_reach_the_target_and_no_less_would():
    slow = cm.Cluster(4, 2, 1e8, 1e-5)  # 0.8 Gbit/s: about 1.8 s of communication per step
    recs = {r.knob: r for r in cm.recommend(MODEL, 0.1, slow, 32, FIXED)}
    for name, fp16 in (("accumulation", False), ("accumulation + fp16", True)):
        k = int(recs[name].setting.split("=")[1].split()[0])
        eff = [cm.predict(MODEL, 0.1, slow, 32, cm.Settings(fp16, j, fixed_s=0.001)).efficiency for j in (k - 1, k)]
        assert eff[1] >= cm.TARGET_EFFICIENCY > eff[0], (name, k, eff)
        assert recs[name].prediction.efficiency == pytest.approx(eff[1])
    fp16 = recs["fp16 compression"].prediction
    assert fp16.settings.fp16 and fp16.efficiency > cm.predict(MODEL, 0.1, slow, 32, FIXED).efficiency
    assert recs["fusion threshold"].prediction is None  # one allreduce already


def test_accumulation_is_not_recommended_where_the_target_is_met():
    fast = cm.Cluster(4, 2, 1e11, 0.0)
    recs = {r.knob: r for r in cm.recommend(MODEL, 0.1, fast, 32, FIXED)}
    assert recs["accumulation"].prediction is None and "not needed" in recs["accumulation"].note


def test_fusion_threshold_recommended_covers_the_message():
    small = cm.Settings(fixed_s=0.001, fusion_threshold_bytes=16 * cm.MIB)
    rec = {r.knob: r for r in cm.recommend(MODEL, 0.1, NET, 32, small)}["fusion threshold"]
    mb = int(rec.setting.split()[-1])
    assert mb * cm.MIB >= MODEL.message_bytes(False) > (mb - 1) * cm.MIB
    assert rec.prediction.allreduces == 1 and rec.prediction.comm_s < cm.predict(MODEL, 0.1, NET, 32, small).comm_s


def test_the_module_imports_neither_tensorflow_nor_horovod():
    code = ("import sys, launch.cost_model; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('tensorflow', 'horovod', 'keras', 'numpy')]; assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_target_solution_matches_the_closed_form():
    comm = cm.predict(MODEL, 0.1, NET, 32, FIXED).comm_s
    k = cm.smallest_accumulation(MODEL, 0.1, NET, 32, FIXED)
    assert k == max(1, math.ceil(9 * comm / 0.1 - 1e-9))
    assert _efficiency(k) >= 0.9 and (k == 1 or _efficiency(k - 1) < 0.9)

import pytest

from trainer.config import TrainConfig
from trainer.schedule import make_schedule, peak_learning_rate


def lr(schedule, step):
    return float(schedule(step))


def test_linear_scaling_rule():
    assert peak_learning_rate(0.1, 256, 256) == pytest.approx(0.1)
    assert peak_learning_rate(0.1, 1024, 256) == pytest.approx(0.4)
    assert peak_learning_rate(0.004, 64, 256) == pytest.approx(0.001)


def test_warmup_from_single_rank_rate_then_cosine_to_zero():
    cfg = TrainConfig(base_learning_rate=0.1, reference_batch_size=256, warmup_epochs=2, epochs=10, lr_decay="cosine")
    s = make_schedule(cfg, global_batch_size=1024, world_size=4, steps_per_epoch=10)
    assert s.peak == pytest.approx(0.4)
    assert lr(s, 0) == pytest.approx(0.1, rel=1e-5)  # what one rank alone would use
    assert lr(s, 10) == pytest.approx(0.25, rel=1e-5)  # halfway through warmup
    assert lr(s, 20) == pytest.approx(0.4, rel=1e-5)
    assert lr(s, 60) == pytest.approx(0.2, rel=1e-4)  # halfway through the cosine
    assert lr(s, 100) == pytest.approx(0.0, abs=1e-7)
    rates = [lr(s, i) for i in range(101)]
    assert all(b >= a for a, b in zip(rates[:20], rates[1:21]))
    assert all(b <= a for a, b in zip(rates[20:100], rates[21:101]))


def test_constant_after_warmup_and_no_warmup():
    cfg = TrainConfig(base_learning_rate=0.1, warmup_epochs=0, epochs=5, lr_decay="constant")
    s = make_schedule(cfg, global_batch_size=512, world_size=2, steps_per_epoch=4)
    assert [lr(s, i) for i in (0, 7, 19)] == pytest.approx([0.2, 0.2, 0.2])

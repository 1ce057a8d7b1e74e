"""The worker entry point in one process (Horovod at size 1), on synthetic data and on digits."""

import json
import sys

from helpers import checkpoint_dir, run


def test_synthetic_resnet20_run_writes_summary(tmp_path):
    res = run([sys.executable, "-m", "trainer.train", "--config", "configs/bench_resnet20.yaml",
               "--set", f"run_dir={tmp_path}/run", "--set", "model.image_size=16",
               "--set", "train.steps_per_epoch=3", "--set", "train.epochs=2", "--set", "data.global_batch_size=8",
               "--set", "train.keep_checkpoints=1"])
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 1
    assert summary["model"] == "resnet20"
    assert summary["steps_per_epoch"] == 3
    assert summary["epochs"] == 2
    checkpoints = tmp_path / "run" / "checkpoints"
    best = json.loads((checkpoints / "best.json").read_text())["checkpoint"]
    # The latest, and the best by val_accuracy on random labels (either epoch): nothing more.
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted({"best.json", "ckpt-000002-step-000000006", best})
    state = json.loads((checkpoint_dir(tmp_path / "run", 6) / "state.json").read_text())
    assert state["global_step"] == 6 and state["epoch"] == 2 and state["checkpoint_number"] == 2


def test_a_corrupt_summary_of_a_finished_run_is_one_line(tmp_path):
    argv = [sys.executable, "-m", "trainer.train", "--config", "configs/bench_resnet20.yaml",
            "--set", f"run_dir={tmp_path}/run", "--set", "model.image_size=8", "--set", "train.steps_per_epoch=2",
            "--set", "train.epochs=1", "--set", "data.global_batch_size=4", "--set", "train.resume=true"]
    assert run(argv).returncode == 0
    summary = tmp_path / "run" / "summary.json"
    summary.write_text('{"val_accuracy": 0.')  # torn by a full disk
    res = run(argv)  # nothing left to train: the finished run's summary is read
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith(f"checkpoint error: cannot read {str(summary)!r} (")
    assert line.endswith("); delete it and the run writes it again")


def test_digits_run_in_one_process_learns(digits_shards, tmp_path):
    res = run([sys.executable, "-m", "trainer.train", "--config", "configs/digits.yaml",
               "--set", f"run_dir={tmp_path}/run", "--set", f"data.dir={digits_shards}",
               "--set", "train.epochs=3", "--set", "train.export=false"])
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["val_examples"] == 359
    # Chance is 0.1 on 10 classes; 3 epochs reach about 0.9.
    assert summary["val_accuracy"] > 0.8, summary

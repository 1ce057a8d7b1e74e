"""What rank 0 writes for TensorBoard, read back through a real TensorBoard server."""

import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from helpers import free_port, run
from trainer.config import ConfigError, profile_range

EPOCHS, SPE, EVERY = 2, 22, 5


@pytest.mark.parametrize("text, expected", [("", None), ("3,5", (3, 5)), (" 7, 7", (7, 7))])
def test_profile_range_accepts_first_last(text, expected):
    assert profile_range(text) == expected


@pytest.mark.parametrize("text", ["5", "5,3", "0,2", "a,b", "1,2,3"])
def test_profile_range_refuses_with_one_line(text):
    with pytest.raises(ConfigError) as e:
        profile_range(text)
    assert str(e.value) == (
        f"tensorboard.profile_steps={text!r}: must be 'first,last' steps with 1 <= first <= last"
    )


def test_worker_refuses_bad_tensorboard_keys_before_starting(tmp_path):
    res = run([sys.executable, "-m", "trainer.train", "--config", "configs/digits.yaml",
               "--set", f"run_dir={tmp_path}/run", "--set", "tensorboard.step_frequency=-1"])
    assert res.returncode == 2
    assert res.stderr.strip() == "config error: tensorboard.step_frequency=-1: must be >= 0"
    assert not (tmp_path / "run").exists()


def test_image_grid_tiles_enlarged_images_row_by_row():
    from trainer.summaries import image_grid

    images = np.stack([np.full((8, 8, 1), i / 10, np.float32) for i in range(5)])
    grid = image_grid(images, 16)
    # 5 images -> 3 columns, 2 rows of 64x64 tiles (8x8 enlarged 8 times) with 2-pixel gaps.
    assert grid.shape == (1, 2 * 64 + 2, 3 * 64 + 4, 1)
    assert grid[0, 0, 0, 0] == 0.0 and grid[0, 63, 63, 0] == 0.0
    assert grid[0, 0, 66, 0] == pytest.approx(0.1) and grid[0, 66, 66, 0] == pytest.approx(0.4)
    assert grid[0, 64, 0, 0] == 1.0  # gap
    assert (grid[0, 66:, 132:, 0] == 1.0).all()  # the empty sixth tile
    assert image_grid(images, 4).shape == (1, 130, 130, 1)


def test_timing_table_has_one_row_per_rank():
    from trainer.summaries import timing_table

    rows = [{"host": "a", "steps": 22, "step_time_mean_sec": 0.010, "step_time_max_sec": 0.5, "input_wait_mean": 0.25},
            {"host": "b", "steps": 22, "step_time_mean_sec": 0.030, "step_time_max_sec": 0.7, "input_wait_mean": 0.5}]
    assert timing_table(rows).splitlines() == [
        "| rank | host | steps | step_time_mean_ms | step_time_max_ms | input_wait_mean |",
        "|---|---|---|---|---|---|",
        "| 0 | a | 22 | 10.00 | 500.00 | 0.25 |",
        "| 1 | b | 22 | 30.00 | 700.00 | 0.5 |",
    ]


def test_launcher_binds_tensorboard_to_loopback_unless_told():
    from launch.command import LaunchError, tensorboard_command

    assert tensorboard_command("py", "runs/x/tensorboard", 6006) == [
        "py", "-m", "tensorboard.main", "--logdir", "runs/x/tensorboard", "--host", "127.0.0.1", "--port", "6006"]
    assert tensorboard_command("py", "l", 7000, "0.0.0.0")[-4:] == ["--host", "0.0.0.0", "--port", "7000"]
    with pytest.raises(LaunchError, match=r"^--tensorboard 0: not a TCP port \(1-65535\)$"):
        tensorboard_command("py", "l", 0)


class Board:
    """A real `tensorboard` server on loopback over `logdir`."""

    def __init__(self, logdir: Path):
        self.port = free_port()
        exe = Path(sys.executable).parent / "tensorboard"
        self.proc = subprocess.Popen(
            [str(exe), "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )

    def raw(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
            return r.read()

    def get(self, route: str, **params):
        return json.loads(self.raw(f"{route}?{urllib.parse.urlencode(params)}"))

    def wait_for(self, route: str, ready, timeout=300.0):
        """The route's answer once `ready(answer)` holds; the server loads events in the background."""
        deadline = time.time() + timeout
        while True:
            assert self.proc.poll() is None, self.proc.stderr.read()[-2000:]
            try:
                answer = self.get(route)
                if ready(answer):
                    return answer
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.time() < deadline, f"TensorBoard did not serve {route} in time"
            time.sleep(0.5)

    def scalars(self, run_name: str, tag: str) -> dict[int, float]:
        return {step: value for _, step, value in self.get("/data/plugin/scalars/scalars", run=run_name, tag=tag)}

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def board_run(digits_shards, tmp_path_factory, request):
    """A finished 2-rank run with every TensorBoard option on, and a server over its events."""
    run_dir = tmp_path_factory.mktemp("tb") / "run"
    job_board = free_port()
    res = run([sys.executable, "-m", "launch", "--np", "2", "--config", "configs/digits.yaml",
               "--tensorboard", job_board,
               "--set", f"run_dir={run_dir}", "--set", f"data.dir={digits_shards}",
               "--set", f"train.epochs={EPOCHS}", "--set", "train.export=false",
               "--set", f"tensorboard.step_frequency={EVERY}", "--set", "tensorboard.histograms=true",
               "--set", "tensorboard.profile_steps=3,5", "--set", "tensorboard.sample_images=12"])
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    # The launcher's own TensorBoard ran on loopback during the job, and stopped with it.
    assert f"http://127.0.0.1:{job_board}/" in out, out[-3000:]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", job_board), timeout=5)
    board = Board(run_dir / "tensorboard")
    request.addfinalizer(board.stop)
    board.wait_for("/data/plugin/scalars/tags",
                   lambda t: "loss" in t.get("train", {}) and "accuracy" in t.get("validation", {}))
    return run_dir, out, board


@pytest.mark.horovod
def test_served_epoch_scalars_match_summary_and_epoch_logs(board_run):
    from test_horovod import epoch_records

    run_dir, out, board = board_run
    summary = json.loads((run_dir / "summary.json").read_text())
    records = epoch_records(run_dir)
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("loss", "accuracy", "learning_rate", "images_per_sec", "step_time_sec", "epoch_time_sec"):
        served = board.scalars("train", key)
        assert sorted(served) == [1, 2], key
        for r in records:
            assert served[r["epoch"]] == pytest.approx(r[key], rel=1e-6), key
    assert board.scalars("train", "loss")[EPOCHS] == pytest.approx(summary["train_loss"], rel=1e-6)
    assert board.scalars("train", "accuracy")[EPOCHS] == pytest.approx(summary["train_accuracy"], rel=1e-6)
    rates = board.scalars("train", "images_per_sec")
    median = statistics.median([rates[e] for e in range(2, EPOCHS + 1)])
    assert median == pytest.approx(summary["images_per_sec"], rel=1e-6)
    for key in ("accuracy", "loss"):
        served = board.scalars("validation", key)
        assert served == {r["epoch"]: pytest.approx(r[f"val_{key}"], rel=1e-6) for r in records}, key
        assert served[EPOCHS] == pytest.approx(summary[f"val_{key}"], rel=1e-6), key
    # One writer per start: a single event file beside the profiler's folder.
    assert sorted(p.name.split(".")[0] for p in (run_dir / "tensorboard" / "train").iterdir()) == ["events", "plugins"]


@pytest.mark.horovod
def test_served_step_scalars_every_n_steps(board_run):
    from trainer.config import load_config
    from trainer.schedule import make_schedule

    _, _, board = board_run
    steps = list(range(EVERY, EPOCHS * SPE + 1, EVERY))
    tags = board.get("/data/plugin/scalars/tags")["train"]
    for key in ("loss", "accuracy", "step_time_sec", "images_per_sec", "learning_rate"):
        assert sorted(board.scalars("train", f"step/{key}")) == steps, key
    times = board.scalars("train", "step/step_time_sec")
    rates = board.scalars("train", "step/images_per_sec")
    for s in steps:
        assert times[s] > 0 and rates[s] == pytest.approx(64 / times[s], rel=1e-5)
    # The rate the optimizer applies after step s: the warmup and cosine schedule of the config.
    schedule = make_schedule(load_config("configs/digits.yaml", [f"train.epochs={EPOCHS}"]).train, 64, 2, SPE)
    lrs = board.scalars("train", "step/learning_rate")
    for s in steps:
        assert lrs[s] == pytest.approx(float(schedule(s)), rel=1e-5), s
    assert "step/epoch_time_sec" not in tags  # epoch-only figures stay off the step axis


@pytest.mark.horovod
def test_served_rank_timing_has_every_rank(board_run):
    _, _, board = board_run
    means = {r: board.scalars("train", f"rank_timing/step_time_mean_sec/rank_{r}") for r in (0, 1)}
    maxes = {r: board.scalars("train", f"rank_timing/step_time_max_sec/rank_{r}") for r in (0, 1)}
    for r in (0, 1):
        assert sorted(means[r]) == [1, 2]
        assert all(0 < means[r][e] <= maxes[r][e] for e in (1, 2))
    ratio = board.scalars("train", "rank_timing/straggler_ratio")
    slowest = board.scalars("train", "rank_timing/slowest_rank")
    for e in (1, 2):
        worst = max((0, 1), key=lambda r: means[r][e])
        assert slowest[e] == worst
        assert ratio[e] == pytest.approx(means[worst][e] / statistics.median([means[0][e], means[1][e]]), rel=1e-5)
    text = board.get("/data/plugin/text/text", run="train", tag="rank_timing/table")
    assert len(text) == 2 and all("<td>0</td>" in t["text"] and "<td>1</td>" in t["text"] for t in text)


@pytest.mark.horovod
def test_served_images_histograms_and_profile_trace(board_run):
    run_dir, _, board = board_run
    images = board.get("/data/plugin/images/tags")
    assert "input/first_batch" in images["train"]
    import tensorflow as tf

    meta = board.get("/data/plugin/images/images", run="train", tag="input/first_batch", sample=0)
    assert [m["step"] for m in meta] == [1]
    png = board.raw(f"/data/plugin/images/individualImage?{meta[0]['query']}")
    # 12 images of 8x8 -> 4 columns, 3 rows of 64-pixel tiles with 2-pixel gaps.
    assert tf.io.decode_png(png).shape == (3 * 64 + 4, 4 * 64 + 6, 1)
    labels = images["train"]["input/first_batch"]["description"]
    assert "labels, row by row:" in labels and len(labels.split(":")[1].split()) == 12
    hist = board.get("/data/plugin/histograms/tags")["train"]
    kernels = [t for t in hist if t.endswith("/kernel")]
    assert kernels
    served = board.get("/data/plugin/histograms/histograms", run="train", tag=kernels[0])
    assert sorted(step for _, step, _ in served) == [1, 2]
    traces = list((run_dir / "tensorboard" / "train" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 1000

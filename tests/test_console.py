"""The first screen: the launcher's output filter, the epoch line, and a real run's console."""

import io
import json
import re
import sys

import pytest

from helpers import run
from launch import console
from trainer.console import PROGRESS_ENV, format_epoch_line, format_progress, progress_wanted

# Recorded from `python -m launch --np 2 ...` (horovodrun, Gloo) before the filter existed.
RECORDED = """\
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1796216412.116886    8279 port.cc:153] oneDNN custom operations are on. You may see slightly different \
numerical results due to floating-point round-off errors from different computation orders. To turn them off, set the \
environment variable `TF_ENABLE_ONEDNN_OPTS=0`.
I0000 00:00:1796216409.152077    8184 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use available \
CPU instructions in performance-critical operations.
To enable the following instructions: AVX2 AVX512F AVX512_VNNI AVX512_BF16 AVX_VNNI FMA, in other operations, rebuild \
TensorFlow with the appropriate compiler flags.
[0]<stderr>:WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
[1]<stderr>:I0000 00:00:1796216414.390403    8344 port.cc:153] oneDNN custom operations are on. You may see slightly \
different numerical results due to floating-point round-off errors from different computation orders.
[1]<stderr>:E0000 00:00:1796216414.390403    8344 cuda_dnn.cc:8310] Unable to register cuDNN factory: Attempting to \
register factory for plugin cuDNN when one has already been registered
[0]<stderr>:2026-12-02 13:00:16,630 rank0 INFO trainer.runner: world size 2; global batch 64 = 32 per replica
[1]<stderr>:2026-12-02 13:00:17,001 rank1 WARNING trainer.callbacks: epoch 1: input-bound
[0]<stdout>:epoch 1/2  loss 1.7162  accuracy 0.4652  val_loss 2.1266  val_accuracy 0.8412  1803 img/s  0.8 s
[1,1]<stdout>:hello from Open MPI's rank 1
[0]<stdout>:summary:
[0]<stdout>:  val_accuracy            0.8468
Process 1 exit with status code 137.
"""

SHOWN = """\
world size 2; global batch 64 = 32 per replica
[1] 2026-12-02 13:00:17,001 rank1 WARNING trainer.callbacks: epoch 1: input-bound
epoch 1/2  loss 1.7162  accuracy 0.4652  val_loss 2.1266  val_accuracy 0.8412  1803 img/s  0.8 s
[1] hello from Open MPI's rank 1
summary:
  val_accuracy            0.8468
"""

# Lines the brief's user must never see; the test below does not reuse launch.console.BANNERS.
BANNER_WORDS = re.compile(r"oneDNN custom operations|This TensorFlow binary is optimized|absl::InitializeLog|cuda"
                          r"|Unable to register", re.IGNORECASE)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def shown(text: str, color=False, stream=None) -> str:
    out = stream or io.StringIO()
    con = console.Console(out, out, color=color)
    segments, rest = console.split_segments(text)
    for s in segments + ([rest] if rest else []):
        con.write("stdout", s)
    con.close()
    return out.getvalue()


def test_recorded_output_loses_banners_and_rank0_prefixes():
    # The timestamps of the log lines are not the filter's business: compare without them.
    # horovodrun's line on the killed rank is its report, which the launcher turns into its own line.
    assert re.sub(r"2026-\S+ \S+ rank0 INFO \S+ ", "", shown(RECORDED)) == SHOWN


def test_split_segments_keeps_terminators_and_waits_for_a_possible_crlf():
    assert console.split_segments("a\nb\r\nc\rd") == (["a\n", "b\r\n", "c\r"], "d")
    assert console.split_segments("bar\r") == ([], "bar\r")
    assert console.split_segments("") == ([], "")


def test_progress_drawings_are_redrawn_in_place_and_a_line_clears_them():
    text = "[0]<stdout>:epoch 1/2 [=>  ] 1/4\x1b[K\r[0]<stdout>:epoch 1/2 [==> ] 2/4\x1b[K\r[0]<stdout>:\x1b[K\r" \
           "[0]<stdout>:epoch 1/2  loss 0.5000\n"
    assert shown(text + "x") == ("epoch 1/2 [=>  ] 1/4\x1b[K" + console.CLEAR_LINE + "epoch 1/2 [==> ] 2/4\x1b[K"
                                 + console.CLEAR_LINE + "epoch 1/2  loss 0.5000\n" + "x")


def test_warnings_and_errors_stand_out_on_a_terminal_only():
    warn = "[1]<stderr>:2026-12-02 13:00:17,001 rank1 WARNING trainer.callbacks: epoch 1: input-bound\n"
    err = "[0]<stderr>:config error: data.global_batch_size=63: is not divisible by the world size 2\n"
    info = "[0]<stderr>:2026-12-02 13:00:16,630 rank0 INFO trainer.runner: world size 2\n"
    assert shown(warn + err + info, color=True) == (
        f"{console.YELLOW}[1] {warn[12:-1]}{console.RESET}\n{console.RED}{err[12:-1]}{console.RESET}\n{info[12:]}")
    assert shown(warn) == "[1] " + warn[12:]
    assert console.highlight("Traceback (most recent call last):\n").startswith(console.RED)
    assert console.highlight("launch: error: --np must be at least 1\n").startswith(console.RED)


def test_start_tells_the_workers_about_a_terminal_and_verbose_filters_nothing():
    code = f"import os; print('[0]<stdout>:' + str(os.environ.get({PROGRESS_ENV!r})))"
    for stdout, expected in ((Terminal(), "1\n"), (io.StringIO(), "None\n")):
        proc, pumps, output = console.start([sys.executable, "-c", code], {}, verbose=False, stdout=stdout,
                                            stderr=io.StringIO())
        assert proc.wait() == 0
        console.finish(pumps, output)
        assert stdout.getvalue() == expected
    # --verbose: no progress bar (the drawings would reach the terminal as they are), no filter.
    stdout = Terminal()
    proc, pumps, output = console.start([sys.executable, "-c", code], {}, verbose=True, stdout=stdout,
                                        stderr=io.StringIO())
    assert proc.wait() == 0
    console.finish(pumps, output)
    assert stdout.getvalue() == "[0]<stdout>:None\n"


def test_epoch_line_and_progress_text():
    logs = {"loss": 0.41234, "accuracy": 0.88119, "val_loss": 0.2, "val_accuracy": 0.94444,
            "images_per_sec": 1234.4, "epoch_time_sec": 1.84, "learning_rate": 0.001, "step_time_sec": 0.01}
    assert format_epoch_line(3, 25, logs) == (
        "epoch 3/25  loss 0.4123  accuracy 0.8812  val_loss 0.2000  val_accuracy 0.9444  1234 img/s  1.8 s")
    unvalidated = {k: v for k, v in logs.items() if not k.startswith("val_")}
    assert format_epoch_line(4, 25, unvalidated) == "epoch 4/25  loss 0.4123  accuracy 0.8812  1234 img/s  1.8 s"
    assert format_progress(3, 25, 11, 22, 0.5, width=10) == "epoch 3/25 [=====>    ] 11/22  loss 0.5000"
    assert format_progress(3, 25, 22, 22, None, width=4) == "epoch 3/25 [====] 22/22"
    assert progress_wanted({PROGRESS_ENV: "1"}, False) and progress_wanted({}, True) and not progress_wanted({}, False)


def test_a_diverged_loss_shows_as_nan_or_inf():
    diverged = {"loss": float("nan"), "accuracy": 0.1, "images_per_sec": 1234.4, "epoch_time_sec": 1.84}
    assert format_epoch_line(5, 25, diverged) == "epoch 5/25  loss nan  accuracy 0.1000  1234 img/s  1.8 s"
    assert format_epoch_line(5, 25, {"loss": float("inf")}) == "epoch 5/25  loss inf"
    assert format_progress(3, 25, 11, 22, float("nan"), width=10) == "epoch 3/25 [=====>    ] 11/22  loss nan"


def test_metrics_file_appends_one_record_per_epoch(tmp_path):
    from trainer.callbacks import MetricsFile

    path = tmp_path / "metrics.jsonl"
    MetricsFile(str(path)).on_epoch_end(0, {"loss": 1.5, "accuracy": 0.25})
    # A resumed run builds a new callback on the same file.
    MetricsFile(str(path)).on_epoch_end(1, {"loss": 0.5, "val_accuracy": 0.75})
    assert [json.loads(x) for x in path.read_text().splitlines()] == [
        {"epoch": 1, "accuracy": 0.25, "loss": 1.5}, {"epoch": 2, "loss": 0.5, "val_accuracy": 0.75}]


EPOCH_LINE = re.compile(r"^epoch (\d+)/2  loss (\d+\.\d{4})  accuracy (\d\.\d{4})  val_loss (\d+\.\d{4})  "
                        r"val_accuracy (\d\.\d{4})  (\d+) img/s  (\d+\.\d) s$")


@pytest.mark.horovod
def test_a_real_run_shows_one_line_per_epoch_and_the_summary(digits_shards, tmp_path):
    run_dir = tmp_path / "run"
    res = run([sys.executable, "-m", "launch", "--np", "2", "--config", "configs/digits.yaml",
               "--set", "train.epochs=2", "--set", f"run_dir={run_dir}", "--set", f"data.dir={digits_shards}",
               "--set", "train.export=false"], timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    lines = out.splitlines()
    assert not [x for x in lines if BANNER_WORDS.search(x)], out
    assert not re.search(r"<std(out|err)>:", out)  # horovodrun's prefixes
    assert "epoch_metrics" not in out and not [x for x in lines if x.lstrip().startswith("{")]
    assert "\r" not in out and "ms/step" not in out  # no progress bar off a terminal, no Keras progress line

    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert {"loss", "accuracy", "val_loss", "val_accuracy", "images_per_sec", "epoch_time_sec", "learning_rate",
                "step_time_sec"} <= set(r)
    epoch_lines = [x for x in lines if x.startswith("epoch ")]
    assert epoch_lines == [format_epoch_line(r["epoch"], 2, r) for r in records]
    assert [int(EPOCH_LINE.match(x).group(1)) for x in epoch_lines] == [1, 2]

    # The summary closes stdout: `summary:`, then one `  key  value` row per key.
    summary = json.loads((run_dir / "summary.json").read_text())
    stdout = res.stdout.splitlines()
    rows = stdout[stdout.index("summary:") + 1:]
    assert stdout.index("summary:") > stdout.index(epoch_lines[-1])
    assert [row.split()[0] for row in rows] == sorted(summary)
    assert f"  val_accuracy            {summary['val_accuracy']:.4f}" in rows

    # --verbose shows the workers' output as horovodrun prints it (the run is finished: nothing is trained).
    res = run([sys.executable, "-m", "launch", "--np", "2", "--config", "configs/digits.yaml", "--verbose",
               "--set", "train.epochs=2", "--set", f"run_dir={run_dir}", "--set", f"data.dir={digits_shards}"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[0]<stdout>:summary:" in res.stdout.splitlines()

"""Elastic training: launcher options, the Keras 3 elastic state, and a real 2 -> 1 -> 2 resize."""

import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from helpers import ROOT, run
from launch.command import LaunchError, LaunchOptions, build_command, world_sizes
from test_horovod import epoch_records

LINE = re.compile(r"rank(\d+) (\w+) ([\w.]+): (.*)$")


def elastic_opts(**kw) -> LaunchOptions:
    base = dict(np=2, config="c.yaml", elastic=True, min_np=1, max_np=2, host_discovery_script="./hosts.sh")
    return LaunchOptions(**{**base, **kw})


def test_elastic_command_uses_the_discovery_script_and_bounds():
    argv, _ = build_command(elastic_opts(reset_limit=5, network_interface="lo"), {})
    joined = " ".join(argv)
    assert "--min-np 1 --max-np 2 --host-discovery-script ./hosts.sh --reset-limit 5" in joined
    assert "--network-interface lo" in joined
    assert "-H" not in argv and "--gloo" in argv
    assert list(world_sizes(elastic_opts(min_np=2, max_np=4, np=3))) == [2, 3, 4]
    assert list(world_sizes(LaunchOptions(np=3, config="c.yaml"))) == [3]


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(host_discovery_script=None), "--elastic needs --host-discovery-script"),
        (dict(controller="mpi"), "--elastic runs on Gloo only"),
        (dict(min_np=3, max_np=4), "--np 2 must lie between --min-np 3 and --max-np 4"),
        (dict(min_np=2, max_np=1), "--np 2 must lie between --min-np 2 and --max-np 1"),
        (dict(hosts="a:2"), "not --hosts/--hostfile"),
        (dict(min_np=0), "--min-np must be at least 1"),
        (dict(elastic=False), "need --elastic"),
    ],
)
def test_bad_elastic_options(kw, message):
    with pytest.raises(LaunchError, match=re.escape(message)):
        build_command(elastic_opts(**kw), {})


def test_launcher_needs_a_batch_that_divides_by_every_elastic_size(digits_shards, tmp_path):
    script = tmp_path / "hosts.sh"
    script.write_text("#!/bin/sh\necho localhost:3\n")
    script.chmod(0o755)
    res = run([sys.executable, "-m", "launch", "--elastic", "--np", "2", "--min-np", "1", "--max-np", "3",
               "--host-discovery-script", script, "--config", "configs/digits.yaml",
               "--set", f"data.dir={digits_shards}", "--set", f"run_dir={tmp_path / 'run'}", "--dry-run"])
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "launch: error: data.global_batch_size=64: is not divisible by the world size 3"
    ]
    script.chmod(0o644)
    res = run([sys.executable, "-m", "launch", "--elastic", "--np", "2", "--min-np", "1", "--max-np", "2",
               "--host-discovery-script", script, "--config", "configs/digits.yaml", "--dry-run"])
    assert res.returncode == 2 and "is not an executable file" in res.stderr


def test_keras_state_commits_restores_and_syncs_model_and_optimizer():
    """One process (size 1): commit, train on, restore: back to the committed values, counters too."""
    import horovod.tensorflow as hvd
    import keras
    import numpy as np

    from trainer.distributed import DistContext
    from trainer.elastic import KerasState

    hvd.init()
    ctx = DistContext(rank=hvd.rank(), local_rank=0, size=hvd.size(), local_size=1)
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dropout(0.5)])
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    x, y = np.random.rand(16, 4).astype("float32"), np.random.rand(16, 3).astype("float32")
    model.fit(x, y, epochs=1, verbose=0)
    state = KerasState(model, ctx, epoch=1, batch=0)
    state.commit()
    committed = [v.numpy().copy() for v in [*model.variables, *model.optimizer.variables]]
    assert int(model.optimizer.iterations.numpy()) == 1

    model.fit(x, y, epochs=2, verbose=0)
    state.epoch, state.batch = 3, 7
    moved = [v.numpy() for v in [*model.variables, *model.optimizer.variables]]
    assert any(not np.array_equal(a, b) for a, b in zip(committed, moved))

    state.restore()
    restored = [v.numpy() for v in [*model.variables, *model.optimizer.variables]]
    assert all(np.array_equal(a, b) for a, b in zip(committed, restored))
    assert (state.epoch, state.batch, int(model.optimizer.iterations.numpy())) == (1, 0, 1)
    state.sync()  # a broadcast from rank 0 to itself leaves everything as it is
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(committed, [*model.variables, *model.optimizer.variables]))


def parse(line: str):
    m = LINE.search(line)
    return (int(m.group(1)), m.group(4)) if m else (None, None)


@pytest.mark.horovod
def test_workers_leave_and_join_and_training_reaches_the_target(digits_shards, tmp_path):
    """2 workers; one slot removed after epoch 2; added back after 3 epochs at 1; the run still reaches 0.98."""
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("localhost:2\n")
    script = tmp_path / "discover.sh"
    script.write_text(f"#!/bin/sh\ncat {hosts}\n")
    script.chmod(0o755)
    epochs, spe = 24, 22
    argv = [sys.executable, "-m", "launch", "--elastic", "--np", "2", "--min-np", "1", "--max-np", "2",
            "--host-discovery-script", str(script), "--network-interface", "lo", "--config", "configs/digits.yaml",
            "--set", f"run_dir={tmp_path / 'run'}", "--set", f"data.dir={digits_shards}",
            "--set", f"train.epochs={epochs}", "--set", "train.export=false", "--set", "runtime.log_all_ranks=true"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(400, proc.kill)  # never hang the suite
    timer.start()
    lines, sizes, events = [], [], {}
    epochs_at_one = seen = 0
    try:
        for line in proc.stdout:
            lines.append(line)
            rank, msg = parse(line)
            if rank == 0 and msg is not None and msg.startswith("elastic: world size"):
                sizes.append(int(msg.split()[3].rstrip(",")))
                events.setdefault(f"size{len(sizes)}", time.monotonic())
            # Rank 0 appends each epoch's record to metrics.jsonl just before it prints the epoch's line.
            new = epoch_records(tmp_path / "run", skip=seen)
            seen += len(new)
            for epoch in (r["epoch"] for r in new):
                if epoch == 2 and "removed" not in events:
                    hosts.write_text("localhost:1\n")
                    events["removed"] = time.monotonic()
                elif sizes[-1] == 1:
                    epochs_at_one += 1
                    if epochs_at_one == 3:
                        hosts.write_text("localhost:2\n")
                        events["added"] = time.monotonic()
        code = proc.wait()
    finally:
        timer.cancel()
        proc.kill()
    out = "".join(lines)
    (tmp_path / "horovodrun.log").write_text(out)
    assert code == 0, out[-4000:]
    assert sizes == [2, 1, 2], out[-4000:]
    print(f"removed -> training at 1: {events['size2'] - events['removed']:.1f} s; "
          f"added -> training at 2: {events['size3'] - events['added']:.1f} s")

    records = epoch_records(tmp_path / "run")
    # Resizes happen at commits (epoch ends): no epoch is lost or repeated.
    assert [r["epoch"] for r in records] == list(range(1, epochs + 1))
    # The global batch is kept, so the schedule goes on by step, as without a resize.
    from trainer.schedule import WarmupSchedule
    schedule = WarmupSchedule(0.001, 0.002, 2 * spe, epochs * spe, "cosine")
    for r in records:
        assert r["learning_rate"] == pytest.approx(float(schedule(r["epoch"] * spe)), rel=1e-4, abs=1e-7)
    continuing = [m for r, m in map(parse, lines) if r == 0 and m and m.startswith("elastic: world size")]
    starts = [int(re.search(r"global step (\d+)", m).group(1)) for m in continuing]
    assert starts[0] == 0 and all(s % spe == 0 and s > 0 for s in starts[1:])
    # At size 1 the one worker reads all four shards; at size 2 each reads two.
    shards = [m for r, m in map(parse, lines) if r == 0 and m and m.startswith("train shards read by this rank")]
    assert [s.count(".tfrecord") for s in shards] == [2, 4, 2]
    assert "localhost[1] has been removed from elastic job" in out
    # The rejoined worker started from its own weights and ended equal to rank 0.
    after = {r: m for r, m in map(parse, lines) if m and m.startswith("weights after training")}
    assert sorted(after) == [0, 1] and after[0] == after[1]

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 64
    assert summary["val_accuracy"] >= 0.98, summary

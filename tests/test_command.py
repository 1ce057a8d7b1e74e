import sys

import pytest

from conftest import run
from launch.command import LaunchError, LaunchOptions, build_command, parse_hosts


def opts(**kw):
    base = dict(np=2, config="configs/digits.yaml", python="/venv/bin/python", horovodrun="/venv/bin/horovodrun")
    return LaunchOptions(**{**base, **kw})


def test_default_command_runs_local_gloo_workers():
    argv, env = build_command(opts(overrides=("train.epochs=3", "run_dir=runs/x")), {"PATH": "/bin"})
    assert argv == [
        "/venv/bin/horovodrun", "-np", "2", "--gloo", "-H", "localhost:2",
        "--stall-check-warning-time-seconds", "60", "--stall-check-shutdown-time-seconds", "600",
        "/venv/bin/python", "-m", "trainer.train", "--config", "configs/digits.yaml",
        "--set", "train.epochs=3", "--set", "run_dir=runs/x",
    ]
    assert env["PATH"] == "/bin"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert "OMPI_ALLOW_RUN_AS_ROOT" not in env


def test_mpi_hosts_and_horovod_tuning_flags():
    argv, env = build_command(
        opts(np=4, controller="mpi", hosts="n1:2, n2:2", timeline="/tmp/tl.json", autotune=True, fusion_threshold_mb=32,
             cycle_time_ms=2.5),
        {},
    )
    assert argv[:10] == [
        "/venv/bin/horovodrun", "-np", "4", "--mpi", "-H", "n1:2,n2:2",
        "--timeline-filename", "/tmp/tl.json", "--autotune", "--fusion-threshold-mb",
    ]
    assert argv[10:13] == ["32", "--cycle-time-ms", "2.5"]
    assert env["OMPI_ALLOW_RUN_AS_ROOT"] == "1"


def test_hostfile_is_passed_through():
    argv, _ = build_command(opts(hostfile="hosts.txt"), {})
    assert argv[4:6] == ["--hostfile", "hosts.txt"]
    assert "-H" not in argv


def test_caller_environment_is_not_overridden():
    _, env = build_command(opts(), {"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert env["TF_CPP_MIN_LOG_LEVEL"] == "0"


def test_build_command_does_not_mutate_its_input():
    base = {"A": "1"}
    build_command(opts(), base)
    assert base == {"A": "1"}


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(np=0), "--np must be at least 1, got 0"),
        (dict(hosts="a:1", hostfile="f"), "--hosts and --hostfile are exclusive"),
        (dict(hosts="a:1,b:0"), "--hosts entry 'b:0' is not host[:slots] with slots >= 1"),
        (dict(hosts="a:x"), "--hosts entry 'a:x' is not host[:slots] with slots >= 1"),
        (dict(np=5, hosts="a:2,b:2"), "--hosts 'a:2,b:2' has 4 slots for --np 5"),
        (dict(controller="nccl"), "controller must be gloo or mpi, got 'nccl'"),
        (dict(fusion_threshold_mb=-1), "--fusion-threshold-mb must be >= 0, got -1"),
        (dict(cycle_time_ms=0), "--cycle-time-ms must be > 0, got 0"),
        (dict(stall_warning_sec=0), "--stall-warning-sec must be >= 1, got 0"),
        (dict(stall_warning_sec=60, stall_shutdown_sec=30), "--stall-shutdown-sec 30 must exceed --stall-warning-sec 60"),
    ],
)
def test_bad_options(kw, message):
    with pytest.raises(LaunchError) as e:
        build_command(opts(**kw), {})
    assert str(e.value) == message


def test_parse_hosts():
    assert parse_hosts("a:2,b,c-1.example:8") == [("a", 2), ("b", 1), ("c-1.example", 8)]


def test_dry_run_prints_command_and_checks_config(digits_shards, tmp_path):
    res = run([sys.executable, "-m", "launch", "--np", "2", "--config", "configs/digits.yaml", "--mpi",
               "--set", f"data.dir={digits_shards}", "--set", f"run_dir={tmp_path}/run", "--dry-run"])
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert "export OMPI_ALLOW_RUN_AS_ROOT=1" in lines
    assert " -np 2 --mpi -H localhost:2 " in lines[-1]
    assert lines[-1].endswith(f"--set data.dir={digits_shards} --set run_dir={tmp_path}/run")
    assert not (tmp_path / "run").exists()


def test_launcher_rejects_bad_config_before_starting_workers(digits_shards):
    res = run([sys.executable, "-m", "launch", "--np", "2", "--config", "configs/digits.yaml",
               "--set", f"data.dir={digits_shards}", "--set", "data.global_batch_size=63"])
    assert res.returncode == 2
    assert res.stderr.strip() == (
        "launch: error: data.global_batch_size=63: is not divisible by the world size 2"
    )
    assert res.stdout == ""

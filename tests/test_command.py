import json
import os
import re
import subprocess
import sys

import pytest

from helpers import run
from launch.command import (
    GRACE_ENV,
    STRICT_HOST_KEYS_ENV,
    WAKE_ENV,
    LaunchError,
    LaunchOptions,
    build_command,
    stop_plan,
    tensorboard_command,
)


def opts(**kw):
    base = dict(np=2, config="configs/digits.yaml", python="/venv/bin/python", horovodrun="/venv/bin/horovodrun")
    return LaunchOptions(**{**base, **kw})


def test_default_command_runs_local_gloo_workers():
    argv, env = build_command(opts(overrides=("train.epochs=3", "run_dir=runs/x")), {"PATH": "/bin"})
    assert argv == [
        "/venv/bin/horovodrun", "-np", "2", "--gloo", "-H", "localhost:2", "--cycle-time-ms", "50",
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


def test_srun_runner_passes_horovod_options_as_environment():
    argv, env = build_command(opts(runner="srun", timeline="/tmp/tl.json", autotune=True, fusion_threshold_mb=32,
                                   cycle_time_ms=2.5, overrides=("train.epochs=3",)), {"PATH": "/bin"})
    assert argv == ["srun", "--mpi=pmix", "--ntasks", "2", "--kill-on-bad-exit=1", "--label",
                    "/venv/bin/python", "-m", "trainer.train", "--config", "configs/digits.yaml",
                    "--set", "train.epochs=3"]
    assert env["HOROVOD_CONTROLLER"] == env["HOROVOD_CPU_OPERATIONS"] == "mpi"
    assert env["HOROVOD_TIMELINE"] == "/tmp/tl.json" and env["HOROVOD_AUTOTUNE"] == "1"
    assert env["HOROVOD_FUSION_THRESHOLD"] == str(32 * 1024 * 1024) and env["HOROVOD_CYCLE_TIME"] == "2.5"
    assert env["HOROVOD_STALL_CHECK_TIME_SECONDS"] == "60" and env["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] == "600"
    assert "OMPI_ALLOW_RUN_AS_ROOT" not in env  # no mpirun involved


def test_hostfile_becomes_a_host_list(digits_shards, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# cluster\nn1 slots=2\nn2 slots=2 max_slots=4\n")
    res = run([sys.executable, "-m", "launch", "--config", "configs/digits.yaml", "--hostfile", hostfile,
               "--set", f"data.dir={digits_shards}", "--set", f"run_dir={tmp_path}/run", "--dry-run"])
    assert res.returncode == 0, res.stderr
    # --np defaults to the hostfile's slots.
    assert " -np 4 --gloo -H n1:2,n2:2 " in res.stdout
    hostfile.write_text("n1 slots=2\nn2 slots=x\n")
    res = run([sys.executable, "-m", "launch", "--config", "configs/digits.yaml", "--hostfile", hostfile,
               "--set", f"data.dir={digits_shards}", "--dry-run"])
    assert res.returncode == 2
    assert res.stderr.strip() == f"launch: error: {hostfile} line 2: slots='x' is not a number"
    hostfile.write_bytes("n1 slots=2\nn\u00e9 slots=2\n".encode("latin-1"))
    res = run([sys.executable, "-m", "launch", "--config", "configs/digits.yaml", "--hostfile", hostfile,
               "--set", f"data.dir={digits_shards}", "--dry-run"])
    assert res.returncode == 2
    assert res.stderr.strip() == f"launch: error: --hostfile {str(hostfile)!r}: not UTF-8 (byte 0xe9 at offset 12)"


def test_slurm_allocation_gives_np_and_hosts(digits_shards, tmp_path):
    env = {"SLURM_JOB_NODELIST": "node[07-08]", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_ID": "42"}
    base = [sys.executable, "-m", "launch", "--config", "configs/digits.yaml", "--slurm-allocation",
            "--set", f"data.dir={digits_shards}", "--set", f"run_dir={tmp_path}/run", "--dry-run"]
    res = run(base, env=env)
    assert res.returncode == 0, res.stderr
    assert " -np 4 --gloo -H node07:2,node08:2 " in res.stdout.splitlines()[-1]
    res = run([*base, "--srun"], env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1].startswith("srun --mpi=pmix --ntasks 4 ")
    res = run([sys.executable, "-m", "launch", "--config", "configs/digits.yaml", "--srun", "--np", "2",
               "--set", f"data.dir={digits_shards}", "--dry-run"])
    assert res.returncode == 2
    assert res.stderr.strip() == "launch: error: --srun needs --slurm-allocation (run it inside a Slurm job)"


def test_caller_environment_is_not_overridden():
    _, env = build_command(opts(), {"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert env["TF_CPP_MIN_LOG_LEVEL"] == "0"


def test_the_environment_of_an_enclosing_mpi_singleton_is_not_passed_on():
    # A process that called MPI_Init without mpirun (hvd.init() in a notebook or a
    # test process) leaves PMIx and ORTE variables to its children; an mpirun that
    # inherits them exits 1 without a message. Take them from a real singleton.
    probe = "from mpi4py import MPI; import subprocess; subprocess.run(['env', '-0'])"
    given = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, check=True, env=given)
    inherited = dict(kv.split("=", 1) for kv in res.stdout.decode().split("\0") if "=" in kv)
    singleton = {k for k in inherited if k not in given and k.startswith(("PMIX_", "OMPI_", "ORTE_"))}
    assert "PMIX_SERVER_URI41" in singleton or "PMIX_NAMESPACE" in singleton, sorted(singleton)
    base = {**inherited, "OMPI_MCA_btl_tcp_if_include": "eth0"}
    for controller in ("gloo", "mpi"):
        _, env = build_command(opts(controller=controller), base)
        assert not singleton & set(env), sorted(singleton & set(env))
        assert env["OMPI_MCA_btl_tcp_if_include"] == "eth0"  # a user's own Open MPI settings stay


def test_build_command_does_not_mutate_its_input():
    base = {"A": "1"}
    build_command(opts(), base)
    assert base == {"A": "1"}


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(np=0), "--np must be at least 1, got 0"),
        (dict(runner="mpirun"), "runner must be one of horovodrun, srun, got 'mpirun'"),
        (dict(runner="srun", controller="gloo"),
         "--gloo needs horovodrun's rendezvous; srun starts MPI ranks (use --mpi)"),
        (dict(runner="srun", hosts="a:2"), "--hosts does not apply to srun, which runs on the hosts of the allocation"),
        (dict(hosts="a:1,b:0"), "--hosts entry 'b:0' is not host[:slots] with slots >= 1"),
        (dict(hosts="a:x"), "--hosts entry 'a:x' is not host[:slots] with slots >= 1"),
        (dict(np=5, hosts="a:2,b:2"), "--hosts 'a:2,b:2' has 4 slots for --np 5"),
        (dict(controller="nccl"), "controller must be gloo or mpi, got 'nccl'"),
        (dict(fusion_threshold_mb=-1), "--fusion-threshold-mb must be in 0..65536, got -1"),
        # Horovod reads the buffer size in bytes into an int64.
        (dict(fusion_threshold_mb=10**17), "--fusion-threshold-mb must be in 0..65536, got 100000000000000000"),
        (dict(cycle_time_ms=0), "--cycle-time-ms must be a number > 0, got 0"),
        # nan and inf passed `<= 0` and reached Horovod's cycle timer.
        (dict(cycle_time_ms=float("nan")), "--cycle-time-ms must be a number > 0, got nan"),
        (dict(cycle_time_ms=float("inf")), "--cycle-time-ms must be a number > 0, got inf"),
        # The launcher's timer that ends the grace takes no more (OverflowError in its thread).
        (dict(signal_grace_sec=10**20), "--signal-grace-sec must be in 1..65535, got 100000000000000000000"),
        (dict(stall_warning_sec=0), "--stall-warning-sec must be >= 1, got 0"),
        (dict(stall_warning_sec=60, stall_shutdown_sec=30),
         "--stall-shutdown-sec 30 must exceed --stall-warning-sec 60"),
    ],
)
def test_bad_options(kw, message):
    with pytest.raises(LaunchError) as e:
        build_command(opts(**kw), {})
    assert str(e.value) == message


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


def test_launchers_call_a_data_folder_without_its_files_a_data_error(tmp_path):
    (tmp_path / "empty").mkdir()
    sets = ["--config", "configs/digits.yaml", "--set", f"data.dir={tmp_path}/empty", "--set", f"run_dir={tmp_path}/r"]
    for argv in (["--np", "2", *sets], ["slurm", *sets, "--dry-run"]):
        res = run([sys.executable, "-m", "launch", *argv])
        assert (res.returncode, res.stderr.strip()) == (2, (
            f"launch: data error: data.dir='{tmp_path}/empty': has no metadata.json "
            "(build it with python -m data_pipeline.build_shards)")), argv
    (tmp_path / "empty" / "metadata.json").write_text("{}")
    res = run([sys.executable, "-m", "trainer.evaluate", *sets])
    assert (res.returncode, res.stderr.strip()) == (
        2, f"data error: data.dir='{tmp_path}/empty': has no train-*.tfrecord shards")


def test_help_lists_both_commands_and_options_without_a_command_mean_run(capsys):
    from launch.main import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert re.search(r"^ +run +start the workers", out, re.M)
    assert re.search(r"^ +slurm +write an sbatch script", out, re.M)
    words = ["--np", "2", "--config", "configs/digits.yaml", "--mpi", "--verbose"]
    assert vars(parse_args(words)) == vars(parse_args(["run", *words]))
    assert parse_args(words).command == "run" and parse_args(words).verbose is True
    assert parse_args(["slurm", "--config", "configs/digits.yaml"]).command == "slurm"


def test_the_printed_tensorboard_command_runs_the_tensorboard_script():
    assert tensorboard_command(None, "runs/x/tensorboard") == [
        "tensorboard", "--logdir", "runs/x/tensorboard", "--host", "127.0.0.1", "--port", "6006"]


# Values horovodrun would paste unquoted into a shell line: a command, a
# substitution, backticks, quotes, a space, line breaks (one inside, one at the end).
EVIL = ["x;touch pwned", "x$(touch pwned)", "x`touch pwned`", "x'y", 'x"y', "x y", "x\ny", "x\n"]


def _refused(res, named):
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"launch: error: {named}"), res.stderr
    assert res.stdout == ""  # no command was printed, so none would have started


REMOTE_VALUES = [
    (flag, value)
    for flag in ["--network-interface", "--timeline", "--ssh-identity-file", "--host-discovery-script", "--hosts",
                 "--hostfile", "SLURM_JOB_NODELIST"]
    for value in EVIL
    # Not values that reach a shell: a line break ends a hostfile line, and a node list is stripped (plain x).
    if not (flag == "--hostfile" and "\n" in value) and not (flag == "SLURM_JOB_NODELIST" and value == "x\n")
]


@pytest.mark.parametrize("flag, value", REMOTE_VALUES)
def test_values_that_reach_a_remote_shell_are_refused(flag, value, tmp_path):
    base = [sys.executable, "-m", "launch", "--config", "configs/digits.yaml", "--dry-run"]
    env = {"PATH": str(tmp_path)}  # no scontrol: the launcher's own node list expansion
    if flag == "--host-discovery-script":
        script = tmp_path / value  # an executable that exists, so only its name is wrong
        script.write_text("#!/bin/sh\necho localhost:2\n")
        script.chmod(0o755)
        argv, named = [*base, "--np", "2", "--elastic", flag, script], f"{flag} {str(script)!r}"
    elif flag == "--hosts":
        argv, named = [*base, "--np", "2", flag, f"{value}:2"], f"{flag} entry {value + ':2'!r}"
    elif flag == "--hostfile":
        hostfile = tmp_path / "hosts"
        hostfile.write_text(f"{value} slots=2\n")
        argv, named = [*base, flag, hostfile], f"{hostfile} line 1: "
    elif flag == "SLURM_JOB_NODELIST":
        argv, named = [*base, "--slurm-allocation"], f"node list {value!r}: "
        env.update(SLURM_JOB_NODELIST=value, SLURM_TASKS_PER_NODE="2", SLURM_JOB_ID="7")
    else:
        argv, named = [*base, "--np", "2", flag, value], f"{flag} {value!r}: not allowed"
    _refused(run(argv, env=env), named)
    assert not (tmp_path / "pwned").exists()


def test_plain_interfaces_hosts_and_paths_pass(digits_shards, tmp_path):
    res = run([sys.executable, "-m", "launch", "--np", "2", "--config", "configs/digits.yaml",
               "--network-interface", "eth0,ib0", "--timeline", "runs/tl-1.json", "--ssh-identity-file",
               "keys/id_ed25519", "--hosts", "10.0.0.1:1,node-2.cluster_a:1",
               "--set", f"data.dir={digits_shards}", "--set", f"run_dir={tmp_path}/run", "--dry-run"])
    assert res.returncode == 0, res.stderr
    assert (" -H 10.0.0.1:1,node-2.cluster_a:1 --network-interface eth0,ib0 --timeline-filename runs/tl-1.json "
            in res.stdout)
    assert " --ssh-identity-file keys/id_ed25519 " in res.stdout


@pytest.mark.parametrize("extra, env, message", [
    ([], {}, "horovodrun is not installed here: not next to this python nor on PATH"),
    (["--slurm-allocation", "--srun"], {"SLURM_JOB_NODELIST": "n1", "SLURM_TASKS_PER_NODE": "2"},
     "srun is not installed here: not on PATH"),
    (["--requeue-on-timeout"], {"SLURM_JOB_ID": "42"}, "--requeue-on-timeout needs scontrol, which is not on PATH"),
])
def test_a_runner_missing_from_path_is_one_line(digits_shards, tmp_path, monkeypatch, capsys, extra, env, message):
    from launch.cli import run as launch_run
    from launch.main import parse_args

    # An interpreter outside the venv and a PATH without Horovod's or Slurm's tools.
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = parse_args(["--np", "2", "--config", "configs/digits.yaml", "--set", f"data.dir={digits_shards}",
                       "--set", f"run_dir={tmp_path}/run", *extra])
    assert launch_run(args) == 2
    assert capsys.readouterr().err == f"launch: error: {message}\n"
    assert not (tmp_path / "run").exists()


def test_a_run_dir_that_cannot_be_written_is_one_line(digits_shards, tmp_path, capsys):
    from launch.cli import run as launch_run
    from launch.main import parse_args

    (tmp_path / "afile").write_text("")
    args = parse_args(["--np", "2", "--config", "configs/digits.yaml", "--set", f"data.dir={digits_shards}",
                       "--set", f"run_dir={tmp_path}/afile/run", "--dry-run"])
    assert launch_run(args) == 2
    assert capsys.readouterr().err == (
        f"launch: error: run_dir '{tmp_path}/afile/run': '{tmp_path}/afile' is not a folder\n")
    if os.geteuid() != 0:  # root writes anywhere but on a read-only file system
        (tmp_path / "locked").mkdir(mode=0o555)
        args = parse_args(["--np", "2", "--config", "configs/digits.yaml", "--set", f"data.dir={digits_shards}",
                           "--set", f"run_dir={tmp_path}/locked/a/run", "--dry-run"])
        assert launch_run(args) == 2
        assert capsys.readouterr().err == (
            f"launch: error: run_dir '{tmp_path}/locked/a/run': '{tmp_path}/locked' is not writable\n")


def test_the_grace_goes_to_horovodrun_and_mpi_jobs_are_stopped_with_sigusr2_then_sigterm():
    import signal

    assert build_command(opts(), {})[1][GRACE_ENV] == "120"
    assert build_command(opts(signal_grace_sec=300), {GRACE_ENV: "5"})[1][GRACE_ENV] == "300"
    assert stop_plan(opts()) == (signal.SIGTERM, None)
    assert stop_plan(opts(runner="srun")) == (signal.SIGTERM, None)
    # mpirun would kill the ranks 2 s after a SIGTERM: they get SIGUSR2, mpirun SIGTERM after the grace.
    assert stop_plan(opts(controller="mpi", signal_grace_sec=300)) == (signal.SIGUSR2, 300.0)
    with pytest.raises(LaunchError, match=r"^--signal-grace-sec must be in 1..65535, got 0$"):
        build_command(opts(signal_grace_sec=0), {})


def test_strict_host_keys_reach_horovodruns_ssh_command():
    """ssh takes the first value of an option, so only horovodrun's own command line can turn the check on."""
    assert STRICT_HOST_KEYS_ENV not in build_command(opts(), {})[1]
    env = build_command(opts(hosts="n1:1,n2:1", ssh_strict_host_keys=True), {})[1]
    assert env[STRICT_HOST_KEYS_ENV] == "yes"
    code = "from horovod.runner.util.remote import get_ssh_command as c; print(c('true', 'n2', 22))"
    for value, expected in (("yes", "StrictHostKeyChecking=yes"), ("", "StrictHostKeyChecking=no")):
        res = run([sys.executable, "-c", code], env={STRICT_HOST_KEYS_ENV: value})
        assert res.returncode == 0, res.stderr
        assert res.stdout.split()[:5] == ["ssh", "-o", "PasswordAuthentication=no", "-o", expected]


def test_a_local_mpi_job_uses_shared_memory_only():
    """The tcp btl listens on every address; ranks on one host need none of it."""
    assert build_command(opts(controller="mpi"), {})[1]["OMPI_MCA_btl"] == "self,vader"
    assert build_command(opts(controller="mpi", hosts="localhost:2"), {})[1]["OMPI_MCA_btl"] == "self,vader"
    assert "OMPI_MCA_btl" not in build_command(opts(controller="mpi", hosts="n1:1,n2:1"), {})[1]
    assert "OMPI_MCA_btl" not in build_command(opts(), {})[1]  # Gloo
    assert build_command(opts(controller="mpi"), {"OMPI_MCA_btl": "self,tcp"})[1]["OMPI_MCA_btl"] == "self,tcp"


def test_gloo_jobs_wake_horovods_cycle_on_enqueue_and_mpi_jobs_do_not():
    """Under MPI the rank that waits for the others in the cycle's collective would poll a core."""
    assert build_command(opts(), {})[1][WAKE_ENV] == "1"
    assert build_command(opts(controller="gloo", elastic=True, host_discovery_script="/bin/true"), {})[1][WAKE_ENV] \
        == "1"
    assert WAKE_ENV not in build_command(opts(controller="mpi"), {})[1]
    assert WAKE_ENV not in build_command(opts(runner="srun"), {})[1]
    assert build_command(opts(), {WAKE_ENV: "0"})[1][WAKE_ENV] == "0"  # the caller's choice stands


def cycle_ms(argv_env) -> str:
    argv, env = argv_env
    return argv[argv.index("--cycle-time-ms") + 1] if "--cycle-time-ms" in argv else env["HOROVOD_CYCLE_TIME"]


def test_the_cycle_is_long_where_an_enqueue_starts_it_and_short_where_it_does_not():
    """Woken on enqueue (Gloo) a cycle without one is a negotiation for nothing; under MPI each collective waits."""
    assert cycle_ms(build_command(opts(), {})) == "50"
    assert cycle_ms(build_command(opts(controller="mpi"), {})) == "5"
    assert cycle_ms(build_command(opts(runner="srun"), {})) == "5"
    assert cycle_ms(build_command(opts(), {WAKE_ENV: "0"})) == "5"  # Gloo sleeping out its cycles
    assert cycle_ms(build_command(opts(runner="srun"), {WAKE_ENV: "1"})) == "50"
    for controller in ("gloo", "mpi"):  # a cycle time given stands
        assert cycle_ms(build_command(opts(controller=controller, cycle_time_ms=2.5), {})) == "2.5"


def test_the_launcher_stops_an_mpi_runner_with_sigusr2_and_sends_sigterm_when_the_grace_is_over(tmp_path):
    """A runner that ignores the stop: it gets SIGUSR2 at once, and SIGTERM only after the grace."""
    import signal
    import threading
    import time

    from launch.command import StopPlan
    from launch.job import execute

    out = tmp_path / "out"
    runner = tmp_path / "runner.py"
    runner.write_text(
        "import signal, sys, time\n"
        f"log = open({str(out)!r}, 'a', buffering=1)\n"
        "t0 = time.time()\n"
        "signal.signal(signal.SIGUSR2, lambda s, f: log.write(f'USR2 {time.time() - t0:.2f}\\n'))\n"
        "signal.signal(signal.SIGTERM, lambda s, f: (log.write(f'TERM {time.time() - t0:.2f}\\n'), sys.exit(143)))\n"
        "log.write('ready\\n')\n"
        "time.sleep(60)\n"
    )
    out.write_text("")

    def signal_when_ready():  # the launcher gets SIGTERM once the runner is up
        while "ready" not in out.read_text():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=signal_when_ready, daemon=True).start()
    code = execute([sys.executable, str(runner)], dict(os.environ), verbose=True, stop=StopPlan(signal.SIGUSR2, 2.0))
    lines = out.read_text().splitlines()
    assert code == 143, lines
    assert [x.split()[0] for x in lines] == ["ready", "USR2", "TERM"], lines
    assert 1.8 < float(lines[2].split()[1]) - float(lines[1].split()[1]) < 10, lines


@pytest.mark.parametrize("summary_epochs, expected", [(None, 143), (3, 143), (5, 0)])
def test_a_runner_that_exits_0_after_a_stop_does_not_make_an_unfinished_run_a_success(
        tmp_path, capfd, summary_epochs, expected):
    """After the stop it passed on, the launcher believes a 0 only for a run whose summary.json has all its epochs.

    The stand-in runner exits 0 on SIGTERM, as horovodrun once did in the Slurm
    time-limit test while rank 0 had stopped at a checkpoint (exit 143): its
    safe_shell_exec read 0 for a worker it had reaped itself (tests/test_worker_exit_codes.py).
    """
    import signal
    import threading
    import time

    from launch.job import execute
    from trainer.checkpoint import run_finished

    if summary_epochs is not None:
        (tmp_path / "summary.json").write_text(json.dumps({"epochs": summary_epochs}))
    ready = tmp_path / "ready"
    runner = tmp_path / "runner.py"
    runner.write_text(
        "import pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda s, f: sys.exit(0))\n"
        f"pathlib.Path({str(ready)!r}).write_text('')\n"
        "time.sleep(60)\n"
    )

    def signal_when_ready():
        while not ready.exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=signal_when_ready, daemon=True).start()
    code = execute([sys.executable, str(runner)], dict(os.environ), verbose=False,
                   finished=lambda: run_finished(str(tmp_path), 5))
    err = capfd.readouterr().err
    assert code == expected, err
    if expected:
        assert err.count("has not trained all its epochs: exiting with 143") == 1, err
    else:
        assert "launch: error" not in err, err


@pytest.mark.horovod
def test_horovodrun_checks_its_build_once_and_answers_from_the_kept_result_after(tmp_path):
    """The patch keeps horovodrun's build check (a TensorFlow import, about 3 s) in ~/.horovod/build-checks.

    A kept `false` proves the next start answers from the file: it refuses the
    controller without importing anything. An unreadable file is checked
    again and replaced; HOROVOD_BUILD_CHECK_CACHE=0 ignores the file.
    """
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    argv = [horovodrun, "-np", "1", "--gloo", "-H", "localhost:1", sys.executable, "-c", "pass"]
    checks = tmp_path / ".horovod" / "build-checks"

    first = run(argv, env={"HOME": str(tmp_path)}, timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    kept = list(checks.iterdir())
    assert len(kept) == 1 and json.loads(kept[0].read_text()) is True, kept

    kept[0].write_text("false")
    refused = run(argv, env={"HOME": str(tmp_path)}, timeout=120)
    assert refused.returncode != 0 and "Gloo support has not been built" in refused.stderr, refused.stderr[-2000:]
    ignored = run(argv, env={"HOME": str(tmp_path), "HOROVOD_BUILD_CHECK_CACHE": "0"}, timeout=120)
    assert ignored.returncode == 0, ignored.stderr[-2000:]
    assert kept[0].read_text() == "false"

    kept[0].write_text("{torn")
    again = run(argv, env={"HOME": str(tmp_path)}, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert list(checks.iterdir()) == kept and json.loads(kept[0].read_text()) is True

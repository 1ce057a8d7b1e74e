"""The sbatch script as data: its lines, option checks, and that no value can inject shell."""

import os
import shlex
import subprocess
import sys

import pytest

from helpers import run
from launch.command import LaunchError
from launch.slurm import SlurmOptions, build_script, time_limit_seconds


def opts(**kw):
    base = dict(config="/repo/configs/digits.yaml", run_dir="/runs/digits", workdir="/repo", python="/venv/bin/python")
    return SlurmOptions(**{**base, **kw})


def test_script_lines():
    script = build_script(opts(nodes=2, ntasks_per_node=4, cpus_per_task=8, time="2-00:00:00", partition="gpu,gpu2",
                               account="proj1", qos="high", job_name="resnet50", setup=("module load cuda/12.4",),
                               venv="/repo/.venv", overrides=("train.epochs=90",), signal_grace_sec=300,
                               launcher_args=("--mpi", "--cycle-time-ms", "5")))
    assert script.splitlines() == [
        "#!/bin/bash",
        "#SBATCH --job-name=resnet50",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --partition=gpu,gpu2",
        "#SBATCH --account=proj1",
        "#SBATCH --qos=high",
        '#SBATCH --chdir="/repo"',
        '#SBATCH --output="/runs/digits/slurm/%x-%j.out"',
        '#SBATCH --error="/runs/digits/slurm/%x-%j.err"',
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@300",
        "set -euo pipefail",
        'echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST at $(date -Is)"',
        "module load cuda/12.4",
        "source /repo/.venv/bin/activate",
        "exec /venv/bin/python -m launch --slurm-allocation --mpi --cycle-time-ms 5 --config /repo/configs/digits.yaml "
        "--set train.epochs=90 --requeue-on-timeout",
    ]


def test_gpus_set_the_ranks_per_node_and_no_requeue_drops_the_requeue():
    lines = build_script(opts(gpus_per_node=8, requeue=False)).splitlines()
    assert "#SBATCH --ntasks-per-node=8" in lines and "#SBATCH --gpus-per-node=8" in lines
    assert "#SBATCH --no-requeue" in lines and not lines[-1].endswith("--requeue-on-timeout")


@pytest.mark.parametrize("text, seconds", [
    ("30", 1800), ("30:15", 1815), ("01:00:00", 3600), ("2-0", 172800), ("1-2:30", 95400), ("1-00:00:10", 86410),
])
def test_time_formats(text, seconds):
    assert time_limit_seconds(text) == seconds


@pytest.mark.parametrize("kw, message", [
    (dict(nodes=0), "--nodes must be at least 1, got 0"),
    (dict(ntasks_per_node=0), "--ntasks-per-node must be at least 1, got 0"),
    (dict(gpus_per_node=-1), "--gpus-per-node must be >= 0, got -1"),
    (dict(gpus_per_node=4, ntasks_per_node=2), "--ntasks-per-node 2 differs from --gpus-per-node 4 (one rank per GPU)"),
    (dict(cpus_per_task=0), "--cpus-per-task must be at least 1, got 0"),
    (dict(time="1h"), "--time '1h' is not a Slurm time (MM, HH:MM:SS, D-HH:MM:SS)"),
    (dict(time="0"), "--time '0' must be longer than 0"),
    # int() reads these Arabic-Indic digits as 20; sbatch would not.
    (dict(time="\u0662\u0660"), "--time '\u0662\u0660' is not a Slurm time (MM, HH:MM:SS, D-HH:MM:SS)"),
    (dict(time="2", signal_grace_sec=120), "--signal-grace-sec 120 must be shorter than --time '2'"),
    (dict(signal_grace_sec=0), "--signal-grace-sec must be in 1..65535, got 0"),
    (dict(partition="gpu;id"), "--partition 'gpu;id': only letters, digits and _.+- are allowed"),
    (dict(account="a b"), "--account 'a b': only letters, digits and _.+- are allowed"),
    (dict(job_name="x/../y"), "--job-name 'x/../y': only letters, digits and _.+- are allowed"),
    (dict(job_name="x\n#SBATCH --uid=0"),
     "--job-name 'x\\n#SBATCH --uid=0': only letters, digits and _.+- are allowed"),
    # `$` matched before a trailing newline, and the newline reached the #SBATCH line
    (dict(job_name="train\n"), "--job-name 'train\\n': only letters, digits and _.+- are allowed"),
    (dict(partition="gpu\n"), "--partition 'gpu\\n': only letters, digits and _.+- are allowed"),
    (dict(run_dir='/runs/a"b'),
     "run_dir '/runs/a\"b/slurm': a path for Slurm may not hold quotes, backslashes or control characters"),
    (dict(run_dir="/runs/a\nb"),
     "run_dir '/runs/a\\nb/slurm': a path for Slurm may not hold quotes, backslashes or control characters"),
    (dict(setup=("module load a\nrm -rf /",)), "--setup 'module load a\\nrm -rf /': one line per --setup"),
    (dict(overrides=("run_dir=a\nid",)), "'run_dir=a\\nid': line breaks are not allowed in a job's arguments"),
])
def test_bad_options_get_one_line(kw, message):
    with pytest.raises(LaunchError) as e:
        build_script(opts(**kw))
    assert str(e.value) == message


def test_config_values_cannot_inject_shell(tmp_path):
    """The script's shell part, run by bash, hands every value over literally."""
    canary = tmp_path / "pwned"
    evil = [f"$(touch {canary})", f"`touch {canary}`", f"; touch {canary}", f"' ; touch {canary} ; '", "$HOME", "a b"]
    printer = tmp_path / "print-argv"
    printer.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    printer.chmod(0o755)
    run_dir = str(tmp_path / ("run " + " ".join(evil) + " 100%"))
    script = build_script(opts(run_dir=run_dir, config=str(tmp_path / "c $(id).yaml"), python=str(printer),
                               overrides=tuple(f"k={e}" for e in evil)))
    assert '#SBATCH --output="' + run_dir.replace("%", "%%") + '/slurm/%x-%j.out"' in script
    env = {"PATH": os.environ["PATH"], "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1"}
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    printed = res.stdout.splitlines()
    assert printed[1:] == ["-m", "launch", "--slurm-allocation", "--config", str(tmp_path / "c $(id).yaml"),
                           *[x for e in evil for x in ("--set", f"k={e}")], "--requeue-on-timeout"]
    assert not canary.exists()


def test_dry_run_prints_the_script_and_checks_config_and_world(digits_shards, tmp_path):
    base = [sys.executable, "-m", "launch", "slurm", "--config", "configs/digits.yaml",
            "--set", f"data.dir={digits_shards}", "--set", f"run_dir={tmp_path}/run", "--dry-run"]
    res = run([*base, "--nodes", "2", "--ntasks-per-node", "2", "--srun"])
    assert res.returncode == 0, res.stderr
    assert "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=2\n" in res.stdout
    assert f'#SBATCH --output="{tmp_path}/run/slurm/%x-%j.out"' in res.stdout
    assert " -m launch --slurm-allocation --srun --srun-mpi pmix " in res.stdout
    assert not (tmp_path / "run").exists()
    res = run([*base, "--ntasks-per-node", "5"])
    assert res.returncode == 2
    assert res.stderr.strip() == "launch: error: data.global_batch_size=64: is not divisible by the world size 5"
    res = run([*base, "--nodes", "0"])
    assert (res.returncode, res.stderr.strip()) == (2, "launch: error: --nodes must be at least 1, got 0")


def test_data_dir_only_on_compute_nodes_needs_no_data_check(tmp_path):
    base = [sys.executable, "-m", "launch", "slurm", "--config", "configs/digits.yaml",
            "--set", f"data.dir={tmp_path}/on-the-nodes", "--set", f"run_dir={tmp_path}/run", "--dry-run"]
    res = run(base)
    assert res.returncode == 2
    assert res.stderr.strip() == f"launch: error: data.dir='{tmp_path}/on-the-nodes': folder does not exist"
    res = run([*base, "--no-data-check"])
    assert res.returncode == 0, res.stderr
    assert "#SBATCH --nodes=1\n" in res.stdout


# A non-default value for every option that `launch slurm` passes on to the job's launcher.
FORWARDED = {
    "runner": ["--srun"], "srun_mpi": ["--srun-mpi", "pmi2"], "controller": ["--mpi"],
    "network_interface": ["--network-interface", "ib0"], "timeline": ["--timeline", "/runs/timeline.json"],
    "autotune": ["--autotune"], "fusion_threshold_mb": ["--fusion-threshold-mb", "32"],
    "cycle_time_ms": ["--cycle-time-ms", "2.5"], "stall_warning_sec": ["--stall-warning-sec", "7"],
    "stall_shutdown_sec": ["--stall-shutdown-sec", "70"], "verbose": ["--verbose"],
    "signal_grace_sec": ["--signal-grace-sec", "300"],
}


def test_every_forwarded_option_survives_the_round_trip_into_the_job(tmp_path, capsys):
    """`launch slurm OPTIONS` writes a launcher line that parses to the same options as `launch run OPTIONS`."""
    from launch.cli import options_from_args
    from launch.main import main, parse_args
    from launch.options import OPTIONS, defaults

    assert sorted(FORWARDED) == sorted({o.name for o in OPTIONS if o.forward}), "a forwarded option has no test value"
    given = [word for words in FORWARDED.values() for word in words]
    common = ["--config", os.path.abspath("configs/digits.yaml"), "--set", f"run_dir={tmp_path}/run"]
    assert main(["slurm", *common, "--no-data-check", "--dry-run", *given]) == 0
    exec_line = shlex.split(capsys.readouterr().out.splitlines()[-1])
    in_job = parse_args(exec_line[exec_line.index("launch") + 1:])
    direct = parse_args(["run", "--slurm-allocation", *given, *common, "--requeue-on-timeout"])
    job_opts, direct_opts = options_from_args(in_job, 4, None), options_from_args(direct, 4, None)
    assert job_opts == direct_opts
    assert {name for name, value in defaults().items() if getattr(job_opts, name) != value} == set(FORWARDED)
    assert vars(in_job) == vars(direct)


def test_submission_prints_the_job_log_and_the_same_watch_command_as_run(digits_shards, tmp_path):
    """With a stand-in sbatch: the script is saved and submitted, and the printed TensorBoard command
    is the one `launch run` prints."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sbatch").write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\necho "42;cluster"\n')
    (bindir / "sbatch").chmod(0o755)
    run_dir = tmp_path / "run"
    sets = ["--set", f"data.dir={digits_shards}", "--set", f"run_dir={run_dir}"]
    res = run([sys.executable, "-m", "launch", "slurm", "--config", "configs/digits.yaml", *sets],
              env={"PATH": f"{bindir}:{os.environ['PATH']}"})
    assert res.returncode == 0, res.stderr
    script = run_dir / "slurm" / "digits.sbatch"
    assert (bindir / "args").read_text().split() == ["--parsable", str(script)]
    watch = f"tensorboard --logdir {run_dir}/tensorboard --host 127.0.0.1 --port 6006"
    assert res.stdout.splitlines() == [f"submitted Slurm job 42 ({script})",
                                       f"log: {run_dir}/slurm/digits-42.out (stderr: .err)", f"watch: {watch}"]
    # `launch run` without --tensorboard prints this command before the workers start.
    from launch.cli import prepare
    from launch.main import parse_args

    job = prepare(parse_args(["--np", "2", "--config", "configs/digits.yaml", *sets]))
    assert shlex.join(job.board) == watch


@pytest.mark.parametrize("value", ["x;touch pwned", "x$(touch pwned)", "x`touch pwned`", "x'y", 'x"y', "x y",
                                   "x\ny", "x\n"])
@pytest.mark.parametrize("flag", ["--network-interface", "--timeline"])
def test_values_that_reach_a_remote_shell_are_refused_before_submission(flag, value, tmp_path):
    """The job's launcher would refuse them too, but only once the job got its nodes."""
    res = run([sys.executable, "-m", "launch", "slurm", "--config", "configs/digits.yaml", flag, value,
               "--set", f"run_dir={tmp_path}/run", "--no-data-check", "--dry-run"])
    assert res.returncode == 2, res.stdout
    assert res.stderr.splitlines() == [res.stderr.strip()]
    assert res.stderr.startswith(f"launch: error: {flag} {value!r}: not allowed; expected ")
    assert res.stdout == "" and not (tmp_path / "run").exists()


def test_scontrol_missing_from_path_is_one_line(digits_shards, tmp_path):
    bindir = tmp_path / "bin"  # sbatch, but no scontrol to check --partition with
    bindir.mkdir()
    (bindir / "sbatch").write_text('#!/bin/sh\necho "42;cluster"\n')
    (bindir / "sbatch").chmod(0o755)
    res = run([sys.executable, "-m", "launch", "slurm", "--config", "configs/digits.yaml", "--partition", "gpu",
               "--set", f"data.dir={digits_shards}", "--set", f"run_dir={tmp_path}/run"], env={"PATH": str(bindir)})
    assert res.returncode == 2
    assert res.stderr == ("launch: error: --partition 'gpu': scontrol is not on PATH, "
                          "so the partition cannot be checked\n")
    assert not (tmp_path / "run").exists()


def test_a_run_dir_that_cannot_be_written_is_one_line(digits_shards, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sbatch").write_text('#!/bin/sh\necho "42;cluster"\n')
    (bindir / "sbatch").chmod(0o755)
    (tmp_path / "afile").write_text("")
    run_dir = tmp_path / "afile" / "run"
    res = run([sys.executable, "-m", "launch", "slurm", "--config", "configs/digits.yaml",
               "--set", f"data.dir={digits_shards}", "--set", f"run_dir={run_dir}"], env={"PATH": str(bindir)})
    assert res.returncode == 2
    assert res.stderr == f"launch: error: run_dir '{run_dir}': cannot write '{run_dir}': Not a directory\n"


def test_the_grace_sets_slurms_warning_and_reaches_the_launcher_in_the_job(digits_shards, tmp_path, capsys):
    """One --signal-grace-sec: Slurm warns that long before the limit, and the workers then get all of it."""
    from launch.cli import prepare
    from launch.command import GRACE_ENV
    from launch.main import main, parse_args

    common = ["--config", os.path.abspath("configs/digits.yaml"), "--set", f"run_dir={tmp_path}/run",
              "--set", f"data.dir={digits_shards}"]
    assert main(["slurm", *common, "--dry-run", "--signal-grace-sec", "300"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "#SBATCH --signal=B:USR1@300" in lines
    exec_line = shlex.split(lines[-1])
    args = parse_args(exec_line[exec_line.index("launch") + 1:])
    assert args.signal_grace_sec == 300
    job = prepare(parse_args(["--np", "2", *common, "--signal-grace-sec", "300"]))
    assert job.env[GRACE_ENV] == "300"

"""The runner's account of the workers' ends, read from its own lines (launch.runner_report, launch.console).

The recordings are the runners' real output (horovodrun 0.28.1 with Gloo and
with Open MPI 4.1, srun of Slurm 22.05) for two workers where both fail with
exit 2, where rank 1 fails with exit 2 or 1 and rank 0 is then stopped, and
where rank 1 is killed with SIGKILL; only TensorFlow's start-up banners and
some traceback frames are left out.
"""

import io

import pytest

from launch import console
from launch.runner_report import RunnerReport, WorkerEnd

GLOO_TRACEBACK = """\
Traceback (most recent call last):
  File "/venv/bin/horovodrun", line 6, in <module>
    sys.exit(run_commandline())
             ^^^^^^^^^^^^^^^^^
  File "/venv/lib/python3.11/site-packages/horovod/runner/gloo_run.py", line 287, in launch_gloo
    raise RuntimeError('Horovod detected that one or more processes exited with non-zero '
RuntimeError: Horovod detected that one or more processes exited with non-zero status, thus causing the job to be \
terminated. The first process to do so was:
Process name: {rank}
Exit code: {code}

"""

MPI_PRIMARY = """\
--------------------------------------------------------------------------
Primary job  terminated normally, but 1 process returned
a non-zero exit code. Per user-direction, the job has been aborted.
--------------------------------------------------------------------------
"""

MPI_DETECTED = """\
--------------------------------------------------------------------------
mpirun detected that one or more processes exited with non-zero status, thus causing
the job to be terminated. The first process to do so was:

  Process name: [[4022,1],{rank}]
  Exit code:    {code}
--------------------------------------------------------------------------
"""

CHECKPOINT = "checkpoint error: same on every rank"

# (runner, its exit code, stdout, stderr, what the console shows, the launcher's exit code, its account line)
RECORDED = {
    "gloo, both ranks exit 2": (
        "horovodrun", 1,
        "Process 1 exit with status code 2.\nTerminating remaining workers after failure of Process 1.\n"
        "Process 0 exit with status code 2.\n",
        f"[1]<stderr>:{CHECKPOINT}\n[0]<stderr>:{CHECKPOINT}\n" + GLOO_TRACEBACK.format(rank=1, code=2),
        f"[1] {CHECKPOINT}\n", 2, None),
    "gloo, rank 1 exits 2, rank 0 is stopped": (
        "horovodrun", 1,
        "Process 1 exit with status code 2.\nTerminating remaining workers after failure of Process 1.\n"
        "Process 0 exit with status code 143.\n",
        "[1]<stderr>:config error: only rank 1\n" + GLOO_TRACEBACK.format(rank=1, code=2),
        "[1] config error: only rank 1\n", 2, None),
    "gloo, rank 1 killed": (
        "horovodrun", 1,
        "Process 1 exit with status code 137.\nTerminating remaining workers after failure of Process 1.\n"
        "Process 0 exit with status code 143.\n",
        "[1]<stderr>:Killed\n[0]<stderr>:Terminated\n" + GLOO_TRACEBACK.format(rank=1, code=137),
        "", 137, "launch: error: rank 1 was killed by SIGKILL (exit code 137); the job ended"),
    "mpi, both ranks exit 2": (
        "horovodrun", 2, "",
        f"[1,1]<stderr>:{CHECKPOINT}\n[1,0]<stderr>:{CHECKPOINT}[1,0]<stderr>:\n" + MPI_PRIMARY
        + MPI_DETECTED.format(rank=1, code=2),
        f"[1] {CHECKPOINT}\n", 2, None),
    "mpi, rank 1 crashes": (
        "horovodrun", 1, "",
        "[1,1]<stderr>:Traceback (most recent call last):\n"
        '[1,1]<stderr>:  File "/tmp/worker.py", line 15, in <module>\n'
        '[1,1]<stderr>:    [1,1]<stderr>:raise RuntimeError("a bug in rank 1")[1,1]<stderr>:\n'
        "[1,1]<stderr>:RuntimeError[1,1]<stderr>:: [1,1]<stderr>:a bug in rank 1[1,1]<stderr>:\n"
        + MPI_PRIMARY + MPI_DETECTED.format(rank=1, code=1),
        '[1] Traceback (most recent call last):\n[1]   File "/tmp/worker.py", line 15, in <module>\n'
        '[1]     raise RuntimeError("a bug in rank 1")\n[1] RuntimeError: a bug in rank 1\n',
        1, "launch: error: rank 1 exited with code 1; the job ended"),
    "mpi, rank 1 killed": (
        "horovodrun", 137, "",
        MPI_PRIMARY + "--------------------------------------------------------------------------\n"
        "mpirun noticed that process rank 1 with PID 0 on node vm exited on signal 9 (Killed).\n"
        "--------------------------------------------------------------------------\n",
        "", 137, "launch: error: rank 1 was killed by SIGKILL (exit code 137); the job ended"),
    "srun, both ranks exit 2": (
        "srun", 2, "",
        f"1: {CHECKPOINT}\n0: {CHECKPOINT}\nsrun: error: vm: tasks 0-1: Exited with exit code 2\n"
        "srun: launch/slurm: _step_signal: Terminating StepId=1.0\n",
        f"[1] {CHECKPOINT}\n", 2, None),
    # srun exits with the highest code: rank 0's 143 after the stop that followed rank 1's failure.
    "srun, rank 1 exits 2, rank 0 is stopped": (
        "srun", 143, "",
        "1: config error: only rank 1\nsrun: error: vm: task 1: Exited with exit code 2\n"
        "srun: launch/slurm: _step_signal: Terminating StepId=3.0\n"
        "0: slurmstepd-vm: error: *** STEP 3.0 ON vm CANCELLED AT 2026-12-04T17:44:43 ***\n"
        "srun: error: vm: task 0: Exited with exit code 143\n",
        "[1] config error: only rank 1\n", 2, None),
    "srun, rank 1 killed": (
        "srun", 137, "",
        "srun: error: vm: task 1: Killed\nsrun: launch/slurm: _step_signal: Terminating StepId=1.0\n"
        "0: slurmstepd-vm: error: *** STEP 1.0 ON vm CANCELLED AT 2026-12-04T17:44:38 ***\n"
        "srun: error: vm: task 0: Exited with exit code 143\nsrun: Force Terminated StepId=1.0\n",
        "", 137, "launch: error: rank 1 was killed by SIGKILL (exit code 137); the job ended"),
}


def through_console(runner: str, stdout: str, stderr: str, verbose: bool = False):
    out, err = io.StringIO(), io.StringIO()
    con = console.Console(out, err, color=False, srun=runner == "srun", verbose=verbose,
                          report=RunnerReport(hide=not verbose))
    for name, text in (("stdout", stdout), ("stderr", stderr)):
        segments, rest = console.split_segments(text)
        for s in segments + ([rest] if rest else []):
            con.write(name, s)
    con.close()
    return out.getvalue() + err.getvalue(), con.report


@pytest.mark.parametrize("case", sorted(RECORDED))
def test_a_failed_job_shows_the_workers_line_once_and_ends_with_the_first_failed_workers_code(case):
    runner, runner_code, stdout, stderr, shown, code, account = RECORDED[case]
    text, report = through_console(runner, stdout, stderr)
    assert text == shown
    assert report.exit_code(runner_code) == code
    assert report.account(runner_code, runner) == account


@pytest.mark.parametrize("case", sorted(RECORDED))
def test_verbose_shows_everything_and_ends_with_the_same_code(case):
    runner, runner_code, stdout, stderr, _, code, account = RECORDED[case]
    text, report = through_console(runner, stdout, stderr, verbose=True)
    assert text == stdout + stderr
    assert (report.exit_code(runner_code), report.account(runner_code, runner)) == (code, account)


def test_other_runner_failures_are_one_line_and_unknown_banners_are_shown():
    ssh = ("Traceback (most recent call last):\n  File \"/venv/bin/horovodrun\", line 6, in <module>\n"
           "    sys.exit(run_commandline())\nRuntimeError: could not connect to some hosts via ssh\n")
    text, report = through_console("horovodrun", "", ssh)
    assert text == "" and report.exit_code(1) == 1
    assert report.account(1, "horovodrun") == "launch: error: horovodrun failed: RuntimeError: could not connect " \
                                              "to some hosts via ssh"
    chained = ("Traceback (most recent call last):\n  File \"a.py\", line 1\nKeyError: 'x'\n\n"
               "During handling of the above exception, another exception occurred:\n\n"
               "Traceback (most recent call last):\n  File \"a.py\", line 3\nValueError: bad\n  more\n")
    assert through_console("horovodrun", "", chained)[1].runner_error == "ValueError: bad"
    banner = ("--------------------------------------------------------------------------\n"
              "mpirun was unable to launch the specified application as it could not access\nthe executable.\n"
              "--------------------------------------------------------------------------\n")
    text, report = through_console("horovodrun", "", banner)
    assert text == banner and report.first_failure is None
    assert report.account(1, "horovodrun") == "launch: error: horovodrun exited with code 1 (no worker failed)"
    # A banner cut short by the end of the output is still shown.
    assert through_console("horovodrun", "", banner[:-76])[0] == banner[:-76]
    # srun's own errors that are no worker's end stay.
    text, _ = through_console("srun", "", "srun: error: Unable to create step for job 7: Invalid argument\n")
    assert text == "srun: error: Unable to create step for job 7: Invalid argument\n"


def test_a_line_repeated_by_one_rank_stays_and_the_ranks_log_lines_are_all_kept():
    progress = "[0]<stdout>:epoch 1/2 [=>  ] 1/4\r[1]<stdout>:epoch 1/2 [=>  ] 1/4\r"
    lines = ("[0]<stderr>:warning: slow disk\n[0]<stderr>:warning: slow disk\n[1]<stderr>:warning: slow disk\n"
             "[1]<stderr>:2026-12-02 13:00:17,001 rank1 WARNING x: a\n[0]<stderr>:2026-12-02 13:00:17,001 rank0 "
             "WARNING x: a\n")
    text, _ = through_console("horovodrun", progress, lines)
    assert text == ("epoch 1/2 [=>  ] 1/4" + console.CLEAR_LINE + "[1] epoch 1/2 [=>  ] 1/4"
                    + console.CLEAR_LINE + "warning: slow disk\nwarning: slow disk\n"
                    "[1] 2026-12-02 13:00:17,001 rank1 WARNING x: a\n2026-12-02 13:00:17,001 rank0 WARNING x: a\n")


def test_a_worker_that_ends_with_its_own_cause_counts_before_one_that_exited_first():
    """Rank 0's collective failed when rank 1 stopped with a data error, and rank 0 happened to exit first."""
    stdout = ("Process 0 exit with status code 1.\nTerminating remaining workers after failure of Process 0.\n"
              "Process 1 exit with status code 2.\n")
    text, report = through_console("horovodrun", stdout, GLOO_TRACEBACK.format(rank=0, code=1))
    assert text == "" and report.exit_code(1) == 2 and report.account(1, "horovodrun") is None


def test_elastic_jobs_keep_horovodruns_lines_about_a_worker_that_left():
    report = RunnerReport(keep_ends=True)
    assert report.show("stdout", "Process 1 exit with status code 1.\n") == ["Process 1 exit with status code 1.\n"]
    assert report.first_failure == WorkerEnd(1, 1) and report.exit_code(0) == 0 and report.account(0, "x") is None

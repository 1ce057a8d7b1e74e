"""Runs a job's runner (horovodrun, mpirun or srun): its output, the stop signals, its exit code, the requeue.

launch.cli builds the command; this runs it to its end. SIGTERM and Slurm's
SIGUSR1 stop the workers at a checkpoint (launch.command.stop_plan); the exit
code is the first failed worker's (launch.runner_report).
"""

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

from launch import console
from launch.command import PASS_SIGTERM, StopPlan
from trainer.exit_codes import EXIT_STOPPED


def execute(argv: list[str], env: dict[str, str], requeue_job: str | None = None,
            board: list[str] | None = None, verbose: bool = True,
            stop: StopPlan = PASS_SIGTERM, elastic: bool = False,
            finished: Callable[[], bool] | None = None) -> int:
    """Runs horovodrun (or srun), passing SIGINT on to it; returns the first failed worker's exit code, else its own.

    SIGTERM, and SIGUSR1 (what Slurm sends before the time limit, see
    launch.slurm), stop the workers as `stop` says (launch.command.stop_plan),
    which makes them checkpoint; after SIGUSR1, with `requeue_job`, that Slurm
    job is then requeued, and resumes from the checkpoint.
    `board`, a TensorBoard command, runs alongside and is stopped when the job ends.
    The job's output goes through launch.console (unchanged with `verbose`),
    which reads the runner's account of the workers' ends (launch.runner_report):
    a job that failed ends with one line saying how, unless the failed
    worker's own line said why.
    `finished` tells whether the run has trained all its epochs: after a stop
    that the launcher passed on, a runner that exits 0 before then is not
    believed (EXIT_STOPPED instead, and the requeue), as a scheduler would
    otherwise count a stopped run as done.
    """
    server = subprocess.Popen(board) if board else None
    try:
        return _run_job(argv, env, requeue_job, verbose, stop, elastic, finished)
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _run_job(argv: list[str], env: dict[str, str], requeue_job: str | None, verbose: bool = True,
             stop: StopPlan = PASS_SIGTERM, elastic: bool = False,
             finished: Callable[[], bool] | None = None) -> int:
    runner = os.path.basename(argv[0])
    proc, pumps, output = console.start(argv, env, verbose, srun=runner == "srun", elastic=elastic)
    timed_out, stopped = [], []
    # Started by the first stop: the runner's SIGTERM once the grace is over.
    deadline = threading.Timer(stop.kill_after or 0, proc.send_signal, (signal.SIGTERM,))
    deadline.daemon = True

    def forward(signum, _frame):
        stopped.append(signum)
        proc.send_signal(signum)

    def stop_workers(signum, _frame):
        stopped.append(signum)
        proc.send_signal(stop.signal)
        if stop.kill_after is not None and deadline.ident is None:  # once
            deadline.start()

    def time_limit(signum, frame):
        if not timed_out:
            print("launch: time limit near: stopping the workers at a checkpoint", file=sys.stderr, flush=True)
        timed_out.append(True)
        stop_workers(signum, frame)

    handlers = {signal.SIGINT: forward, signal.SIGTERM: stop_workers, signal.SIGUSR1: time_limit}
    previous = {s: signal.signal(s, h) for s, h in handlers.items()}
    try:
        code = proc.wait()
        console.finish(pumps, output)
    finally:
        deadline.cancel()
        for s, handler in previous.items():
            signal.signal(s, handler)
    code = 128 - code if code < 0 else code
    account = output.report.account(code, runner)
    if account:
        print(account, file=sys.stderr, flush=True)
    code = output.report.exit_code(code)
    if stopped and code == 0 and finished is not None and not finished():
        # Seen once in a Slurm time-limit test: horovodrun exited 0 after its SIGTERM while
        # rank 0 had said it stopped at a checkpoint with 143 (its safe_shell_exec read 0 for
        # a worker it reaped itself, fixed in our patch; kept for runners that still do).
        print(f"launch: error: the workers were stopped at a checkpoint and {runner} exited with 0, but the run "
              f"has not trained all its epochs: exiting with {EXIT_STOPPED}, as for a stop", file=sys.stderr,
              flush=True)
        code = EXIT_STOPPED
    if timed_out and requeue_job and code != 0:
        res = subprocess.run(["scontrol", "requeue", requeue_job], capture_output=True, text=True, check=False)
        if res.returncode == 0:
            print(f"launch: requeued Slurm job {requeue_job}; it resumes from the checkpoint",
                  file=sys.stderr, flush=True)
        else:
            print(f"launch: error: scontrol requeue {requeue_job} failed: {res.stderr.strip()}", file=sys.stderr)
    return code

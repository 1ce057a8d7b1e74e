"""horovodrun reports the exit code a worker ended with, also when it is terminating that worker.

Once one rank has failed, horovodrun terminates the others (Horovod's
safe_shell_exec), and they are often exiting by then with a code of their own:
every rank leaves with 74 after a failed write, 3 after divergence, 143 after
a stop's checkpoint. Unpatched, horovodrun reaped the worker's shell with
psutil, so the shell's Popen found no child and read 0 (about one end in four
here), or it terminated the shell between its reaping of the worker and its
own exit, 143 (rarer; under load). Our patch lets the shell exit and waits on
it through its Popen.

These tests run horovodrun's own safe_shell_exec (the code that runs each
worker under Gloo) on a worker that ignores SIGTERM, as trainer.train does
once it knows its exit code, and exits 74 while it is being terminated.
"""

import os
import sys
import threading
import time

from horovod.runner.common.util import safe_shell_exec

EXIT_CODE = 74
WORKER = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
          f"open(sys.argv[1], 'w').close(); time.sleep(0.2); raise SystemExit({EXIT_CODE})")


def end_while_terminated(tmp_path, name: str, shell_tail: str = "") -> tuple[int, float]:
    """The code execute() reports, and its seconds, for a worker terminated once it ignores SIGTERM.

    The command is `env ... python -c WORKER READY` (as horovodrun's), then `shell_tail`.
    """
    ready = tmp_path / name
    command = f'env HVD_TEST=1 {sys.executable} -c "{WORKER}" {ready}{shell_tail}'
    terminate = threading.Event()

    def once_ready():
        while not ready.exists():
            time.sleep(0.005)
        terminate.set()

    threading.Thread(target=once_ready, daemon=True).start()
    start = time.monotonic()
    code = safe_shell_exec.execute(command, events=[terminate])
    return code, time.monotonic() - start


def test_a_worker_that_exits_with_its_own_code_while_terminated_is_reported_with_that_code(tmp_path):
    # Unpatched, about one in four of these read 0: 20 all passing had a chance of 0.75^20 = 0.3%.
    codes = [end_while_terminated(tmp_path, f"ready-{i}")[0] for i in range(20)]
    assert codes == [EXIT_CODE] * 20


def test_a_shell_that_is_still_exiting_after_its_worker_ended_is_not_terminated(tmp_path):
    # The shell's window between reaping the worker and exiting, widened to 0.3 s: unpatched,
    # horovodrun froze and terminated the shell in it, and reported 143 every time.
    code, _ = end_while_terminated(tmp_path, "ready", "; code=$?; sleep 0.3; exit $code")
    assert code == EXIT_CODE


def test_a_child_the_shell_starts_after_its_worker_ended_is_killed_with_it(tmp_path, monkeypatch):
    # Unpatched, the later child (sleep 60) was left running, and execute() waited for it.
    monkeypatch.setenv(safe_shell_exec.GRACEFUL_TERMINATION_ENV, "2")
    code, seconds = end_while_terminated(tmp_path, "ready", "; sleep 60")
    assert seconds < 15, seconds
    assert code != 0
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and cmdline(pid) == "sleep\x0060\x00"]


def cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read()
    except OSError:
        return ""


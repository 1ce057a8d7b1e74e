"""What the runner (horovodrun, mpirun, srun) says about how the workers ended, read from its own lines.

When a worker fails, each runner tells it its own way, in several lines
that repeat what the worker already said:

- horovodrun (Gloo) prints `Process N exit with status code C.` for every
  failed rank, then raises a RuntimeError whose traceback names the first
  one (`Process name: N`, `Exit code: C`), and exits 1 whatever C was;
- mpirun prints banners between lines of dashes ("Primary job terminated
  normally, but 1 process returned a non-zero exit code", "mpirun detected
  that one or more processes exited with non-zero status ... Process name:
  [[J,V],N] Exit code: C", or "mpirun noticed that process rank N ...
  exited on signal S") and exits with the first failed rank's code;
- srun prints `srun: error: HOST: task N: Exited with exit code C` (or the
  signal's name) for each, and exits with the highest code, not the first:
  143 when rank 1 failed with 2 and rank 0 was then stopped.

RunnerReport reads the runner's lines (those without a rank label), holds
back the ones it knows, and keeps the first failed rank and its code; the
launcher exits with that code, and says in one line what happened when the
worker's own line does not (launch.cli). Lines it does not know are shown as
they came. The formats are those of the versions the set-up installs
(Horovod 0.28.1, Open MPI 4.1, Slurm 22.05); the multi-process tests run them.
"""

import re
import signal
from typing import NamedTuple

from trainer.exit_codes import CAUSES, OWN_LINE

TRACEBACK = "Traceback (most recent call last):"
CHAINED = ("During handling of the above exception, another exception occurred:",
           "The above exception was the direct cause of the following exception:")
GLOO_END = re.compile(r"^Process (\d+) exit with status code (-?\d+)\.$")
GLOO_TERMINATING = re.compile(r"^Terminating remaining workers after failure of Process \d+\.$")
GLOO_FIRST = re.compile(r"^Process name: (\d+)$"), re.compile(r"^Exit code: (-?\d+)$")
MPI_RULE = re.compile(r"^-{20,}$")
MPI_FIRST = re.compile(r"Process name: +\[\[\d+,\d+\],(\d+)\]"), re.compile(r"Exit code: +(-?\d+)")
MPI_SIGNAL = re.compile(r"mpirun noticed that process rank (\d+) with PID \d+ on node \S+ exited on signal (\d+)")
MPI_FOLLOW_UP = re.compile(r"Primary job +terminated normally, but \d+ process(es)? returned")
SRUN_END = re.compile(r"^srun: error: \S+: tasks? ([0-9]+)[0-9,\-]*: (.+)$")
SRUN_FOLLOW_UP = re.compile(r"^srun: (launch/slurm: _step_signal: Terminating StepId=\S+|Force Terminated StepId=\S+"
                            r"|Job step aborted: Waiting up to \d+ seconds for job step to finish\.)$"
                            r"|^slurmstepd(-\S+)?: error: \*\*\* STEP \S+ ON \S+ CANCELLED AT \S+ \*\*\*$")
SIGNAL_NAMES = {signal.strsignal(s): s for s in signal.Signals}


def from_shell(text: str) -> bool:
    """Whether a rank's line is the shell's word on a signal that ended the rank (`Killed`, `Terminated`).

    horovodrun runs each rank under `sh -c`, which says so in the rank's
    output; the runner's report of that end says it again.
    """
    return re.sub(r" \(core dumped\)$", "", text.rstrip("\r\n")) in SIGNAL_NAMES


class WorkerEnd(NamedTuple):
    """A worker that ended with a non-zero code (128 + N for signal N, as a shell reports it)."""

    rank: int
    code: int


def describe(end: WorkerEnd) -> str:
    """`rank 1 exited with code 1`, or `rank 1 was killed by SIGKILL (exit code 137)`."""
    if end.code > 128 and end.code - 128 in {s.value for s in signal.Signals}:
        return f"rank {end.rank} was killed by {signal.Signals(end.code - 128).name} (exit code {end.code})"
    return f"rank {end.rank} exited with code {end.code}"


class RunnerReport:
    """Reads the runner's own lines; `show(stream, text)` returns what to show of them now.

    With `hide` False (--verbose) every line is shown, and still read.
    `keep_ends`: show horovodrun's per-rank exit lines (elastic jobs go on
    after a worker ends, so they are news there, not the end of the job).
    """

    def __init__(self, hide: bool = True, keep_ends: bool = False):
        self.hide = hide
        self.keep_ends = keep_ends
        self.ends: list[WorkerEnd] = []  # in the order the runner reported them
        self.first: WorkerEnd | None = None  # the runner's own word on which failed first
        self.runner_error: str | None = None
        self._held: dict[str, list[str]] = {}  # per stream: a traceback or banner being read
        self._kind: dict[str, str] = {}

    @property
    def first_failure(self) -> WorkerEnd | None:
        """The first worker that ended with a cause of its own (exit 2, 3, 74), else the first that failed.

        The others' ends follow from it: their collective failed, or the
        runner stopped them; and the first to exit is not always the first
        to fail (trainer.train's yield_to_the_failed_rank makes it rare).
        """
        ends = ([self.first] if self.first else []) + self.ends
        return next((e for e in ends if e.code in CAUSES), ends[0] if ends else None)

    def show(self, stream: str, text: str) -> list[str]:
        shown = self._read(stream, text)
        return shown if self.hide else [text]

    def close(self) -> list[str]:
        """Reads what is still held (the output has ended); returns what of it to show."""
        shown = []
        for stream in list(self._held):
            shown += self._release(stream)
        return shown if self.hide else []

    def exit_code(self, runner_code: int) -> int:
        """The launcher's exit code: the first failed worker's, else the runner's."""
        failure = self.first_failure
        return failure.code if runner_code and failure else runner_code

    def account(self, runner_code: int, runner: str) -> str | None:
        """One line on how the job ended, unless it succeeded or the worker's own line says why."""
        failure = self.first_failure
        if self.exit_code(runner_code) in OWN_LINE | {0}:
            return None
        if failure:
            return f"launch: error: {describe(failure)}; the job ended"
        if self.runner_error:
            return f"launch: error: {runner} failed: {self.runner_error}"
        return f"launch: error: {runner} exited with code {runner_code} (no worker failed)"

    def _read(self, stream: str, text: str) -> list[str]:
        line = text.rstrip("\r\n")
        kind = self._kind.get(stream)
        if kind == "traceback":  # horovodrun's last words: everything after it is part of them
            self._held[stream].append(text)
            return []
        if kind == "banner":
            self._held[stream].append(text)
            return self._release(stream) if MPI_RULE.match(line) else []
        if line == TRACEBACK or MPI_RULE.match(line):
            self._kind[stream] = "traceback" if line == TRACEBACK else "banner"
            self._held[stream] = [text]
            return []
        m = GLOO_END.match(line)
        if m:
            self.ends.append(WorkerEnd(int(m.group(1)), _shell_code(int(m.group(2)))))
            return [text] if self.keep_ends else []
        m = SRUN_END.match(line)
        if m:
            self.ends.append(WorkerEnd(int(m.group(1)), _srun_code(m.group(2))))
            return []
        if self.ends and (GLOO_TERMINATING.match(line) or SRUN_FOLLOW_UP.match(line)):
            return []
        return [text]

    def _release(self, stream: str) -> list[str]:
        held, kind = self._held.pop(stream), self._kind.pop(stream)
        if kind == "traceback":
            self._read_traceback(held)
            return []
        body = "".join(held)
        first = [p.search(body) for p in MPI_FIRST]
        killed = MPI_SIGNAL.search(body)
        if all(first):
            self.first = WorkerEnd(int(first[0].group(1)), _shell_code(int(first[1].group(1))))
        elif killed:
            self.ends.append(WorkerEnd(int(killed.group(1)), 128 + int(killed.group(2))))
        elif not MPI_FOLLOW_UP.search(body):
            return held  # a banner of another kind: mpirun's only word on it
        return []

    def _read_traceback(self, lines: list[str]) -> None:
        """Keeps the last exception's first line, or the first failed rank horovodrun's RuntimeError names."""
        messages, message = [], None
        for text in lines:
            line = text.rstrip("\r\n")
            if line == TRACEBACK or line in CHAINED:
                message = None
            elif line.startswith((" ", "\t")) and message is None:
                continue  # a frame
            elif line:
                if message is None:
                    message = []
                    messages.append(message)
                message.append(line)
        if not messages:
            return
        found = [next((m for m in map(p.match, messages[-1]) if m), None) for p in GLOO_FIRST]
        if all(found):
            self.first = WorkerEnd(int(found[0].group(1)), _shell_code(int(found[1].group(1))))
        else:
            self.runner_error = messages[-1][0]


def _shell_code(code: int) -> int:
    """A negative code (killed by that signal) as a shell reports it."""
    return 128 - code if code < 0 else code


def _srun_code(what: str) -> int:
    """srun's `Exited with exit code C`, or a signal's description (`Killed`, `Segmentation fault (core dumped)`)."""
    m = re.fullmatch(r"Exited with exit code (\d+)", what)
    if m:
        return int(m.group(1))
    sig = SIGNAL_NAMES.get(re.sub(r" \(core dumped\)$", "", what))
    return 128 + sig if sig else 1

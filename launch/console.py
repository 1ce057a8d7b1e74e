"""The launcher's view of the workers' output: what a person at the console reads.

horovodrun prefixes every line of rank N with `[N]<stdout>:` or `[N]<stderr>:`
(Open MPI's `--tag-output`: `[J,N]<stdout>:`; srun's `--label`: `N: `).
Between the launcher and the terminal this module:

- drops TensorFlow's and absl's start-up banners (BANNERS): every process
  prints them, and no environment variable silences them all at the source;
- drops the prefix of rank 0's lines, which are the run's story, and shortens
  the others' to `[N] ` (other ranks print only warnings and errors unless
  runtime.log_all_ranks);
- shows a line that several ranks print (the same error, found by each) once;
- hands the runner's own lines to launch.runner_report, which holds back its
  tracebacks and banners about failed workers and keeps who failed first;
- on a terminal, colours warnings and errors, and redraws rank 0's progress
  bar in place: the bar's drawings end in a carriage return, and a full line
  first clears the bar.

`python -m launch --verbose` shows the output unchanged instead (the runner's
lines are still read, for the exit code).
"""

import codecs
import os
import re
import subprocess
import sys
import threading

from launch.runner_report import RunnerReport, from_shell
from trainer.console import PROGRESS_ENV

BANNERS = re.compile("|".join([
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"oneDNN custom operations are on",
    r"This TensorFlow binary is optimized to use available CPU instructions",
    r"^To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags",
    r"Unable to register cu(DNN|FFT|BLAS) factory",
    r"computation placer already registered",
    r"TF-TRT Warning: Could not find TensorRT",
    r"Could not find cuda drivers on your machine",
    r"failed call to cuInit",
    r"could not open file to read NUMA node",
    r"Your kernel may have been built without NUMA support",
]))
PREFIX = re.compile(r"^\[(?:\d+,)?(\d+)\]<(?:stdout|stderr)>:")
# mpirun tags every write of a rank, and print() writes its text and its newline apart:
# a line may carry the tag again inside it, `error: x[1,1]<stderr>:\n`.
MPI_TAG = re.compile(r"\[\d+,\d+\]<(?:stdout|stderr)>:")
SRUN_PREFIX = re.compile(r"^ *(\d+): ")
# slurmstepd writes into a rank's output, with its label, when it cancels the job step.
SRUN_STEPD = re.compile(r"^slurmstepd(-\S+)?: ")
# The trainer's log lines carry their rank: never the same line from two ranks.
RANK_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ rank\d+ ")
TERMINATOR = re.compile(r"\r\n|\r|\n")
WARNING = re.compile(r"(^|\s)WARNING[\s:]")
ERROR = re.compile(r"(^|\s)(ERROR|CRITICAL)[\s:]|^Traceback|^\S+ error: |^\S+: error: ")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
YELLOW, RED, RESET = "\x1b[33m", "\x1b[31m", "\x1b[0m"
CLEAR_LINE = "\r\x1b[K"


def split_segments(text: str) -> tuple[list[str], str]:
    """Complete segments (each ending in \\n, \\r\\n or \\r) and the unfinished rest."""
    segments, start = [], 0
    for m in TERMINATOR.finditer(text):
        if m.group() == "\r" and m.end() == len(text):
            break  # may be the first half of \r\n: wait for the next read
        segments.append(text[start:m.end()])
        start = m.end()
    return segments, text[start:]


def highlight(line: str) -> str:
    """Warnings in yellow, errors in red (for a terminal); the text after a `[N] ` label is what counts."""
    text = re.sub(r"^\[\d+\] ", "", line)
    colour = RED if ERROR.search(text) else YELLOW if WARNING.search(text) else None
    if colour is None:
        return line
    body = line.rstrip("\r\n")
    return f"{colour}{body}{RESET}{line[len(body):]}"


class Console:
    """Writes filtered segments of both of horovodrun's streams, one at a time.

    Both streams usually reach the same terminal, so one lock orders them, and
    a line on either clears a progress bar that the other shows. `srun`: the
    ranks' lines carry srun's labels. `report` reads the runner's own lines
    (with `verbose`, every segment is written as it came, and still read).
    """

    def __init__(self, stdout, stderr, color: bool | None = None, srun: bool = False, verbose: bool = False,
                 report: RunnerReport | None = None):
        self.streams = {"stdout": stdout, "stderr": stderr}
        no_color = "NO_COLOR" in os.environ
        self.color = {name: (s.isatty() and not no_color) if color is None else color
                      for name, s in self.streams.items()}
        self.prefix = SRUN_PREFIX if srun else PREFIX
        self.verbose = verbose
        self.report = report or RunnerReport(hide=not verbose)
        self._lock = threading.Lock()
        self._bar = None  # the stream showing a progress bar, if any
        self._seen: dict[str, dict[str, int]] = {}  # line -> rank -> times shown

    def write(self, name: str, segment: str) -> None:
        with self._lock:
            for text in self._shown(name, segment):
                self._write(name, text)

    def close(self) -> None:
        """Writes what the runner report held back and turned out to be news (the output has ended)."""
        with self._lock:
            for text in self.report.close():
                self._write("stderr", text)

    def _shown(self, name: str, segment: str) -> list[str]:
        """What to write of one segment: rank 0's text, `[N] ` and another rank's, or the runner's lines."""
        m = self.prefix.match(segment)
        text = MPI_TAG.sub("", segment[m.end():]) if m else segment
        if BANNERS.search(text) and not self.verbose:
            return []
        if m is None or (self.prefix is SRUN_PREFIX and SRUN_STEPD.match(text)):
            shown = self.report.show(name, text)
            return [segment] if self.verbose else shown
        if self.verbose:
            return [segment]
        if from_shell(text) or self._repeated(m.group(1), text):
            return []
        return [text if m.group(1) == "0" else f"[{m.group(1)}] {text}"]

    def _repeated(self, rank: str, text: str) -> bool:
        """Whether another rank has shown this line as often: the n-th copy of a line shows once."""
        if text.endswith("\r") or RANK_LOG.match(text):
            return False  # a progress drawing; a log line labelled with its rank
        counts = self._seen.setdefault(text, {})
        counts[rank] = counts.get(rank, 0) + 1
        return counts[rank] <= max((n for r, n in counts.items() if r != rank), default=0)

    def _write(self, name: str, text: str) -> None:
        stream = self.streams[name]
        if self._bar is not None:
            self._bar.write(CLEAR_LINE)
            self._bar.flush()
            self._bar = None
        if text.endswith("\r") and not text.endswith("\r\n"):
            drawing = text[:-1]
            if ANSI.sub("", drawing).strip():
                stream.write(drawing)
                self._bar = stream
        else:
            stream.write(highlight(text) if self.color[name] else text)
        stream.flush()


def pump(fd: int, name: str, console: Console) -> None:
    """Reads one of horovodrun's pipes until it closes, and writes it through `console`."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    rest = ""
    while True:
        chunk = os.read(fd, 65536)
        segments, rest = split_segments(rest + decoder.decode(chunk, final=not chunk))
        for segment in segments:
            console.write(name, segment)
        if not chunk:
            break
    if rest:
        console.write(name, rest)


def start(argv: list[str], env: dict[str, str], verbose: bool, stdout=None, stderr=None, srun: bool = False,
          elastic: bool = False):
    """Starts `argv`, its output going through a Console. Returns (process, pump threads, console).

    `srun`: the runner is srun (its labels, its lines); `elastic`: a worker
    that ends is news, not the end of the job (launch.runner_report).
    """
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    if stdout.isatty() and not verbose:
        env = {**env, PROGRESS_ENV: "1"}  # the workers' stdout is a pipe: tell rank 0 a person watches
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    console = Console(stdout, stderr, srun=srun, verbose=verbose,
                      report=RunnerReport(hide=not verbose, keep_ends=elastic))
    threads = [threading.Thread(target=pump, args=(pipe.fileno(), name, console), daemon=True)
               for name, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for t in threads:
        t.start()
    return proc, threads, console


def finish(threads: list[threading.Thread], console: Console, timeout: float = 10.0) -> None:
    """Waits for the pumps to write what is left; a worker still holding a pipe open is not waited for."""
    for t in threads:
        t.join(timeout)
    console.close()

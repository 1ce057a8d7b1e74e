"""The launcher's view of the workers' output: what a person at the console reads.

horovodrun prefixes every line of rank N with `[N]<stdout>:` or `[N]<stderr>:`
(Open MPI's `--tag-output`: `[J,N]<stdout>:`). Between the launcher and the
terminal this module:

- drops TensorFlow's and absl's start-up banners (BANNERS): every process
  prints them, and no environment variable silences them all at the source;
- drops the prefix of rank 0's lines, which are the run's story, and shortens
  the others' to `[N] ` (other ranks print only warnings and errors unless
  runtime.log_all_ranks);
- on a terminal, colours warnings and errors, and redraws rank 0's progress
  bar in place: the bar's drawings end in a carriage return, and a full line
  first clears the bar.

`python -m launch --verbose` shows the output unchanged instead.
"""

import codecs
import os
import re
import subprocess
import sys
import threading

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


def filter_segment(segment: str) -> str | None:
    """The segment as the console shows it, or None for a start-up banner.

    Rank 0's prefix is dropped, other ranks' becomes `[N] `; text that no
    prefix marks (horovodrun's own lines) stays as it is.
    """
    m = PREFIX.match(segment)
    text = segment[m.end():] if m else segment
    if BANNERS.search(text):
        return None
    if m and m.group(1) != "0":
        return f"[{m.group(1)}] {text}"
    return text


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
    a line on either clears a progress bar that the other shows.
    """

    def __init__(self, stdout, stderr, color: bool | None = None):
        self.streams = {"stdout": stdout, "stderr": stderr}
        no_color = "NO_COLOR" in os.environ
        self.color = {name: (s.isatty() and not no_color) if color is None else color
                      for name, s in self.streams.items()}
        self._lock = threading.Lock()
        self._bar = None  # the stream showing a progress bar, if any

    def write(self, name: str, segment: str) -> None:
        text = filter_segment(segment)
        if text is None:
            return
        stream = self.streams[name]
        with self._lock:
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


def start(argv: list[str], env: dict[str, str], verbose: bool, stdout=None, stderr=None):
    """Starts `argv`; unless `verbose`, its output goes through a Console. Returns (process, pump threads)."""
    if verbose:
        return subprocess.Popen(argv, env=env), []
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    if stdout.isatty():
        env = {**env, PROGRESS_ENV: "1"}  # the workers' stdout is a pipe: tell rank 0 a person watches
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    console = Console(stdout, stderr)
    threads = [threading.Thread(target=pump, args=(pipe.fileno(), name, console), daemon=True)
               for name, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for t in threads:
        t.start()
    return proc, threads


def finish(threads: list[threading.Thread], timeout: float = 10.0) -> None:
    """Waits for the pumps to write what is left; a worker still holding a pipe open is not waited for."""
    for t in threads:
        t.join(timeout)

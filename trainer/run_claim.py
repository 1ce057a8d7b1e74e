"""One job per run folder: RUN_DIR/claim.json names the job that holds it.

A job claims its run folder before it writes anything: the launcher, for the
whole job (its workers know the claim by its token in TOKEN_ENV), or rank 0 of
`trainer.train` started without the launcher. The holder touches the claim
every heartbeat (a thread) and removes it at its end. Another job is refused
with one line naming the holder; a claim whose job is gone is stale and taken
over (the rules: trainer.run_claim_rules). Heartbeat ages are read on the file
server's clock: the mtime of a file this process has just written into the
folder minus the claim's mtime, both set by the server (an open revalidates
NFS's cached attributes), so the clocks of the nodes never enter.

Claiming uses only what a file server does atomically by name (link, rename,
unlink), never a directory listing, which NFS clients cache:
  1. This process writes its claim whole under a unique temporary name and
     links it to claim.json; link fails when the name exists, so of two
     starters on a free folder one wins, and no reader sees half a claim.
  2. A stale claim with token K is superseded by whoever first links its
     temporary file to `claim.json.taken-K`: one taker per stale claim. The
     taker re-reads claim.json, still K (a fresh link fails while it exists,
     other takers need the marker, tokens are never reused), and renames its
     file over it. Starters that lose look again, and find a live claim.
  3. A taker that died holding its marker leaves claim.json at K and the
     marker naming it (T); the marker is judged as a claim and, when stale,
     superseded the same way through `claim.json.taken-T`. Each name of the
     chain is re-read before the rename.
  4. On NFS a link whose reply was lost is sent again and may report EEXIST
     after it succeeded: the two names' inode decides.
"""

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import asdict, dataclass

from trainer import run_claim_rules as rules
from trainer.run_claim_rules import Claim, RunClaimError, judge

TOKEN_ENV = rules.TOKEN_ENV  # the launcher's claim, passed to its workers

log = logging.getLogger(__name__)

CLAIM_FILE = "claim.json"
HEARTBEAT_ENV = "HVD_KERAS_CLAIM_HEARTBEAT_SEC"  # for tests: a short heartbeat, and stale time
ATTEMPTS, RETRY_SEC, MAX_CHAIN = 40, 0.05, 8


def process_start(pid: int) -> int | None:
    """`pid`'s start time in clock ticks since boot; None when it has ended (a zombie included)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            after_name = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    # Fields 3 (state) and 22 (start time) of proc(5), counted after the name.
    return None if after_name[0] in ("Z", "X") else int(after_name[19])


def _first_line(path: str, link: bool = False) -> str:
    with contextlib.suppress(OSError):
        if link:
            return os.readlink(path)
        with open(path, encoding="ascii", errors="replace") as f:
            return f.readline().strip()
    return ""


def this_process(environ=os.environ) -> Claim:
    """The claim this process would write (a new token)."""
    value = environ.get(HEARTBEAT_ENV, "")
    try:
        beat = float(value) if value else rules.HEARTBEAT_SEC
    except ValueError:
        beat = 0.0
    if not 0 < beat < float("inf"):
        raise RunClaimError(f"{HEARTBEAT_ENV}={value!r}: not a number of seconds > 0")
    restart = environ.get("SLURM_RESTART_COUNT", "0")
    return Claim(
        token=secrets.token_hex(8), host=socket.gethostname(), pid=os.getpid(), pid_start=process_start(os.getpid()),
        boot_id=_first_line("/proc/sys/kernel/random/boot_id"), pid_ns=_first_line("/proc/self/ns/pid", link=True),
        slurm_job=environ.get("SLURM_JOB_ID", ""), slurm_restart=int(restart) if restart.isdigit() else 0,
        slurm_cluster=environ.get("SLURM_CLUSTER_NAME", ""), since=time.strftime("%Y-%m-%d %H:%M:%S"),
        heartbeat_sec=beat, stale_sec=beat * rules.STALE_BEATS)


def _scontrol(*argv: str) -> subprocess.CompletedProcess | None:
    if not shutil.which("scontrol"):
        return None
    try:
        return subprocess.run(["scontrol", *argv], capture_output=True, text=True, timeout=30, check=False)
    except (subprocess.TimeoutExpired, OSError):
        return None


def slurm_state(job: str, cluster: str) -> str | None:
    """The job's JobState per scontrol, GONE when Slurm does not know it; None when this Slurm cannot tell.

    A claim of another cluster (file systems are often shared between
    clusters) is not this cluster's to judge: its job ids mean other jobs here.
    """
    here = os.environ.get("SLURM_CLUSTER_NAME", "")
    if cluster and not here:
        config = _scontrol("show", "config")
        found = re.search(r"^ClusterName\s*=\s*(\S+)", config.stdout, re.M) if config else None
        here = found.group(1) if found else ""
    if cluster and here != cluster:
        return None
    res = _scontrol("-o", "show", "job", job)
    if res is None:
        return None
    found = re.search(r"\bJobState=(\S+)", res.stdout)
    if res.returncode == 0 and found:
        return found.group(1)
    return "GONE" if "Invalid job id" in res.stderr else None


@dataclass(frozen=True)
class _Seen:
    key: str  # the token, or for an unreadable file its inode and mtime
    claim: Claim | None
    mtime_ns: int


def _look(path: str) -> _Seen | None:
    try:
        with open(path, "rb") as f:  # an open, not a stat: NFS revalidates the attributes at open
            st = os.fstat(f.fileno())
            data = f.read(1 << 16)
    except (FileNotFoundError, NotADirectoryError):
        return None
    claim = rules.parse(data)
    return _Seen(claim.token if claim else f"x{st.st_ino}-{st.st_mtime_ns}", claim, st.st_mtime_ns)


class _Mine:
    """This process's claim, written whole under a unique temporary name when first needed.

    Its mtime is the file server's clock at that moment: the `now` of heartbeat ages.
    """

    def __init__(self, path: str, claim: Claim):
        self.claim, self.path, self.mtime_ns = claim, f"{path}.tmp-{claim.token}", None

    def write(self) -> str:
        if self.mtime_ns is None:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                os.write(fd, (json.dumps(asdict(self.claim), sort_keys=True) + "\n").encode())
                os.fsync(fd)
                self.mtime_ns = os.fstat(fd).st_mtime_ns
            finally:
                os.close(fd)
        return self.path

    def discard(self) -> None:
        if self.mtime_ns is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


class _Facts:
    def __init__(self, seen: _Seen, mine: _Mine):
        self.seen, self.mine = seen, mine
        self.process_start, self.slurm_state = process_start, slurm_state

    def heartbeat_age(self) -> float:
        self.mine.write()
        return (self.mine.mtime_ns - self.seen.mtime_ns) / 1e9


def _link(src: str, dst: str) -> bool:
    try:
        os.link(src, dst)
        return True
    except FileExistsError:
        with contextlib.suppress(FileNotFoundError):
            a, b = os.stat(src), os.stat(dst)
            return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)  # a retried link that had succeeded
        return False
    except OSError as e:
        if e.errno in (errno.EPERM, errno.ENOTSUP, errno.ENOSYS):
            raise RunClaimError(f"cannot claim {dst!r}: its file system does not support hard links "
                                f"({e.strerror})") from None
        raise


def _supersede(path: str, seen: _Seen, mine: _Mine, own_token: str) -> bool:
    """Replaces the stale claim `seen` by ours, unless another starter does so first (protocol 2-3)."""
    chain = [(path, seen)]
    while True:
        marker = f"{path}.taken-{chain[-1][1].key}"
        if _link(mine.write(), marker):
            break
        taker = _look(marker)
        if taker is None or len(chain) > MAX_CHAIN:
            return False
        if judge(mine.claim, taker.claim, _Facts(taker, mine), own_token).state != "stale":
            return False  # a live take-over under way: its claim will be there when we look again
        chain.append((marker, taker))
    intact = all((now := _look(name)) is not None and now.key == was.key for name, was in chain)
    if intact:
        os.replace(mine.path, path)
        mine.mtime_ns = None  # its name is claim.json now
    for name in [marker, *(name for name, _ in chain[1:] if intact)]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
    return intact


class HeldClaim:
    """The claim this process holds: touched every heartbeat by a thread, removed by `release`."""

    def __init__(self, run_dir: str, claim: Claim, made_dir: bool):
        self.run_dir, self.claim, self.made_dir = run_dir, claim, made_dir
        self.path = os.path.join(run_dir, CLAIM_FILE)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="run-claim-heartbeat", daemon=True)
        self._thread.start()

    @property
    def token(self) -> str:
        return self.claim.token

    def _beat(self) -> None:
        while not self._stop.wait(self.claim.heartbeat_sec):
            try:
                seen = _look(self.path)
                if seen is None or seen.key != self.token:
                    holder = seen.claim if seen else None
                    log.error("run_dir %r: this job's claim was %s; another job may write into it now", self.run_dir,
                              f"taken over by pid {holder.pid} on {holder.host}" if holder else "removed")
                    return
                os.utime(self.path)  # without times: the file server's clock sets the mtime
            except OSError as e:
                log.warning("run_dir %r: cannot refresh the claim: %s", self.run_dir, e)

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        seen = _look(self.path)
        if seen is not None and seen.key == self.token:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        if self.made_dir:  # a start that wrote nothing leaves no folder behind
            with contextlib.suppress(OSError):
                os.rmdir(self.run_dir)

    def __enter__(self) -> "HeldClaim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(run_dir: str, own_token: str = "") -> HeldClaim | None:
    """Claims `run_dir` for this process; None when `own_token` (our launcher's) holds it already.

    Raises RunClaimError, with the line of `describe`, when another live job holds it.
    """
    path = os.path.join(run_dir, CLAIM_FILE)
    mine = _Mine(path, this_process())
    made_dir = claimed = False
    try:
        if not os.path.isdir(run_dir):
            os.makedirs(run_dir, mode=0o750, exist_ok=True)
            made_dir = True
        for _ in range(ATTEMPTS):
            seen = _look(path)
            if seen is None:
                claimed = _link(mine.write(), path)
                if claimed:
                    return HeldClaim(run_dir, mine.claim, made_dir)
                continue
            verdict = judge(mine.claim, seen.claim, _Facts(seen, mine), own_token)
            if verdict.state != "stale":
                if verdict.state == "own":
                    return None
                raise RunClaimError(rules.describe(run_dir, seen.claim, verdict))
            holder = f"pid {seen.claim.pid} on {seen.claim.host}" if seen.claim else "nobody"
            log.warning("run_dir %r: taking over the stale claim of %s: %s", run_dir, holder, verdict.reason)
            claimed = _supersede(path, seen, mine, own_token)
            if claimed:
                return HeldClaim(run_dir, mine.claim, made_dir)
            time.sleep(RETRY_SEC)
        raise RunClaimError(f"run_dir {run_dir!r}: other jobs kept claiming it at the same time; try again")
    except OSError as e:
        raise RunClaimError(f"run_dir {run_dir!r}: cannot claim it: {e.strerror or e} ({e.filename!r})") from None
    finally:
        mine.discard()
        if made_dir and not claimed:
            with contextlib.suppress(OSError):
                os.rmdir(run_dir)


def check(run_dir: str) -> None:
    """Raises RunClaimError when a live job holds `run_dir`; claims nothing (`launch slurm` before it submits)."""
    path = os.path.join(run_dir, CLAIM_FILE)
    try:
        seen = _look(path)
        if seen is None:
            return
        mine = _Mine(path, this_process())
        try:
            verdict = judge(mine.claim, seen.claim, _Facts(seen, mine))
        finally:
            mine.discard()
    except OSError as e:
        raise RunClaimError(f"run_dir {run_dir!r}: cannot read its claim: {e.strerror or e}") from None
    if verdict.state == "live":
        raise RunClaimError(rules.describe(run_dir, seen.claim, verdict))

"""Whose is a run folder's claim: the rules, as a pure function of data (trainer.run_claim does the I/O).

`judge` decides whether the claim found in a run folder is ours, live or
stale, for the process that found it:

  - the token of our own launcher (TOKEN_ENV): ours;
  - an earlier run of this very Slurm job (a lower SLURM_RESTART_COUNT): stale;
  - on this machine (same host name, boot id and pid namespace): live while
    its pid runs with the start time recorded; ended, a zombie or another
    process under a reused pid: stale;
  - on another host: stale when its Slurm job is no longer running, or when
    its heartbeat is older than the stale time the claim records (ages on the
    file server's clock, see trainer.run_claim);
  - an unreadable claim (empty or torn: trainer.run_claim never shows a
    partly written one): stale.

What it needs to know of the world (a process, a Slurm job, the heartbeat's
age) it asks of a `Facts` object, only when a rule needs it: a claim of this
machine never needs Slurm or the file server's clock.
"""

import json
import re
from dataclasses import dataclass, fields
from typing import Protocol

TOKEN_ENV = "HVD_KERAS_RUN_CLAIM"
HEARTBEAT_SEC = 30.0
# A holder on another host is stale after this many heartbeats missed: NFS
# clients may show an mtime up to acregmax (60 s by default) old.
STALE_BEATS = 10
LIVE_SLURM_STATES = frozenset({"CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING",
                               "RESIZING", "STAGE_OUT"})
_TOKEN = re.compile(r"[0-9a-f]{16}")


class RunClaimError(Exception):
    """The run folder is in use by another job, or cannot be claimed; str(e) is one line."""


@dataclass(frozen=True)
class Claim:
    """What claim.json records about its holder.

    Attributes:
      token: random, unique to this claim (the launcher passes it to its workers).
      host, pid: the holding process (the launcher, or rank 0 of trainer.train).
      pid_start: its start time in clock ticks since boot (/proc/PID/stat), to
        tell it from a later process that reuses the pid.
      boot_id, pid_ns: with `host`, which kernel and pid namespace the pid is of.
      slurm_job, slurm_restart, slurm_cluster: SLURM_JOB_ID, SLURM_RESTART_COUNT
        and SLURM_CLUSTER_NAME of the holder's job, if it runs in one.
      since: when the claim was taken, on the holder's clock, for people.
      heartbeat_sec, stale_sec: the holder touches the claim every
        heartbeat_sec; without a touch for stale_sec it is stale.
    """

    token: str
    host: str
    pid: int
    pid_start: int | None = None
    boot_id: str = ""
    pid_ns: str = ""
    slurm_job: str = ""
    slurm_restart: int = 0
    slurm_cluster: str = ""
    since: str = ""
    heartbeat_sec: float = HEARTBEAT_SEC
    stale_sec: float = HEARTBEAT_SEC * STALE_BEATS

    def same_machine(self, other: "Claim") -> bool:
        return bool(self.boot_id) and (self.host, self.boot_id, self.pid_ns) == (other.host, other.boot_id,
                                                                                  other.pid_ns)


def parse(data: bytes) -> Claim | None:
    """The claim in a claim file's bytes; None when they are not a whole claim of ours."""
    try:
        raw = json.loads(data)
        claim = Claim(**{f.name: raw[f.name] for f in fields(Claim) if f.name in raw})
    except (ValueError, TypeError):
        return None
    ok = all(isinstance(getattr(claim, f.name), (int, float) if f.type is float else f.type) for f in fields(Claim))
    return claim if ok and _TOKEN.fullmatch(claim.token) and claim.stale_sec > 0 else None


@dataclass(frozen=True)
class Verdict:
    """`state`: "own" (our launcher's), "live" (another job's) or "stale"; `age`: the heartbeat's, if read."""

    state: str
    reason: str = ""
    age: float | None = None


class Facts(Protocol):
    """What `judge` may ask about the world; asked only when needed."""

    def process_start(self, pid: int) -> int | None:
        """Start time of `pid` on this machine; None: no such process (or a zombie)."""

    def slurm_state(self, job: str, cluster: str) -> str | None:
        """The Slurm job's state (GONE: unknown to Slurm); None when Slurm cannot tell."""

    def heartbeat_age(self) -> float:
        """Seconds since the claim was last touched, on the file server's clock."""


def judge(me: Claim, held: Claim | None, facts: Facts, own_token: str = "") -> Verdict:
    """Whether `held`, found in the folder, is ours, live or stale, for the process `me`."""
    if held is None:
        return Verdict("stale", "the claim file is empty or torn")
    if own_token and held.token == own_token:
        return Verdict("own")
    same_job = bool(held.slurm_job) and (held.slurm_job, held.slurm_cluster) == (me.slurm_job, me.slurm_cluster)
    if same_job and held.slurm_restart < me.slurm_restart:
        return Verdict("stale", f"an earlier run of this Slurm job {held.slurm_job}, requeued")
    if held.same_machine(me):
        start = facts.process_start(held.pid)
        if start is None:
            return Verdict("stale", f"pid {held.pid} has ended")
        if held.pid_start is not None and start != held.pid_start:
            return Verdict("stale", f"pid {held.pid} is another process now")
        return Verdict("live")
    if held.slurm_job and not same_job:
        state = facts.slurm_state(held.slurm_job, held.slurm_cluster)
        if state is not None and state not in LIVE_SLURM_STATES:
            return Verdict("stale", f"Slurm job {held.slurm_job} is {state}")
    age = facts.heartbeat_age()
    if age > held.stale_sec:
        return Verdict("stale", f"no heartbeat from {held.host} for {age:.0f} s", age)
    return Verdict("live", age=age)


def describe(run_dir: str, held: Claim, verdict: Verdict) -> str:
    """The one line that refuses a second job."""
    job = f" (Slurm job {held.slurm_job})" if held.slurm_job else ""
    line = f"run_dir {run_dir!r} is in use by pid {held.pid} on {held.host}{job} since {held.since}; "
    if verdict.age is None:
        return line + "stop that job first, or use another run_dir"
    return line + (f"its last heartbeat was {verdict.age:.0f} s ago: stop that job first, or use another run_dir "
                   f"(if {held.host} is lost, its claim lapses {held.stale_sec:.0f} s after its last heartbeat)")

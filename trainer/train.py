"""Per-worker entry point; horovodrun starts one of these per rank.

    python -m trainer.train --config configs/digits.yaml [--set train.epochs=5 ...]

Exit codes: 0 done; 2 bad config, data or checkpoint, or a run_dir in use by
another job (one line on stderr); 3 stopped because the loss or the weights
became non-finite (train.stop_on_nonfinite); 74 a write of the run failed
(checkpoint, metrics, summary, events or export), the earlier checkpoints
intact; 143 stopped by SIGTERM/SIGINT after writing a checkpoint (resumable);
1 anything else (trainer.exit_codes, docs/training.md). The lines of 3 and 74
come from rank 0 alone. Every check that needs no TensorFlow runs before it
is imported.

Without the launcher, rank 0 claims run_dir for the run (trainer.run_claim);
under it, the launcher's claim is this run's.

Files are created without permissions for others (umask 027).
"""

import logging
import os
import signal
import sys
import time

from data_pipeline.arguments import ArgumentParser
from data_pipeline.metadata import DataError
from trainer import exit_after_collecting
from trainer.checkpoint import CheckpointError
from trainer.config import ConfigError, check_environment, check_run_dir, load_config, validate, validate_world
from trainer.data_spec import check_start
from trainer.exit_codes import EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_STOPPED, EXIT_WRITE_FAILED
from trainer.run_claim import RunClaimError

PEER_GRACE_SEC = 30  # see yield_to_the_failed_rank


def parse_args(argv):
    parser = ArgumentParser(prog="python -m trainer.train", description="Train one Horovod worker.")
    parser.add_argument("--config", required=True, help="YAML experiment file (see configs/)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=5 (repeatable)",
    )
    return parser.parse_args(argv)


class RankFilter(logging.Filter):
    """Labels each record with this worker's current rank; INFO and below only from rank 0 unless `all_ranks`.

    The rank is asked for at each record: in elastic mode it changes when workers come and go.
    """

    def __init__(self, rank_fn, all_ranks: bool):
        super().__init__()
        self.rank_fn = rank_fn
        self.all_ranks = all_ranks
        self.rank = 0

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            self.rank = self.rank_fn()
        except ValueError:
            pass  # Horovod is between an elastic shutdown and init: keep the last rank
        record.rank = self.rank
        return self.all_ranks or self.rank == 0 or record.levelno >= logging.WARNING


def setup_logging(rank_fn, all_ranks: bool) -> None:
    """Log lines on stderr, labelled with the rank; with `all_ranks`, the per-epoch details (DEBUG) too.

    The per-epoch details (evaluations, checkpoints written, every rank's
    metric record) would bury rank 0's one line per epoch; runtime.log_all_ranks
    is the setting for looking into the ranks, so it shows them.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s rank%(rank)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RankFilter(rank_fn, all_ranks))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.getLogger("trainer").setLevel(logging.DEBUG if all_ranks else logging.INFO)
    # TensorFlow's own INFO lines ("Assets written to ...") repeat what trainer.outputs says.
    logging.getLogger("tensorflow").setLevel(logging.WARNING)


def claim_run_dir(cfg, ctx):
    """Rank 0 claims run_dir, or finds our launcher's claim (TOKEN_ENV); every rank gets its answer.

    Returns the claim this process holds (rank 0 without a launcher), else None.
    """
    from data_pipeline.collective import on_root
    from trainer import run_claim

    token = os.environ.get(run_claim.TOKEN_ENV, "")
    if ctx.elastic:
        # No collective may run before the elastic function (trainer.elastic),
        # so the claim is the launcher's, held for every worker that joins.
        if not token:
            raise run_claim.RunClaimError("elastic training claims run_dir in its launcher: start it with "
                                          "`python -m launch --elastic`")
        return None
    held = []
    on_root(ctx.is_chief, lambda v: ctx.broadcast_object(v, "run_claim"),
            lambda: held.append(run_claim.acquire(cfg.run_dir, token)), run_claim.RunClaimError)
    return held[0] if held else None


def run_reporting_bad_input(call):
    """`(call(), 0)`, or `(None, 2)` after one line on stderr: a bad config, data or checkpoint, a run_dir in use."""
    try:
        return call(), 0
    except RunClaimError as e:
        line = f"error: {e}"
    except CheckpointError as e:
        line = f"checkpoint error: {e}"
    except DataError as e:
        line = f"data error: {e}"
    except ConfigError as e:
        line = f"config error: {e}"
    print(line, file=sys.stderr)
    return None, EXIT_BAD_INPUT


def checked_config(args):
    """The config, after every check that needs no TensorFlow: values, data, run folder, checkpoint to resume."""
    cfg = load_config(args.config, args.overrides)
    validate(cfg)
    check_environment(cfg)
    check_run_dir(cfg.run_dir)
    check_start(cfg)
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    os.umask(0o027)  # run directories and checkpoints: owner and group only
    cfg, code = run_reporting_bad_input(lambda: checked_config(args))
    if code:
        return code

    # Imported only now: TensorFlow and Horovod take seconds to load, and a bad
    # config should fail at once.
    import tensorflow as tf

    from trainer.distributed import DistContext, collective_failed
    from trainer.failures import Diverged, WriteFailed
    from trainer.preemption import Stopped
    from trainer.runner import run

    ctx = DistContext.initialize(cfg.runtime.intra_op_threads, cfg.runtime.inter_op_threads,
                                 cfg.runtime.bind_cores)
    import horovod.tensorflow as hvd

    setup_logging(hvd.rank, cfg.runtime.log_all_ranks)
    log = logging.getLogger("trainer.train")
    log.info("rank %d of %d (local %d of %d), pid %d, intra/inter-op threads %d/%d, gpu %s",
             ctx.rank, ctx.size, ctx.local_rank, ctx.local_size, os.getpid(),
             ctx.intra_op_threads, ctx.inter_op_threads, ctx.gpu)
    ctx.log_binding(log)

    def train():
        validate_world(cfg, ctx.size)
        claim = claim_run_dir(cfg, ctx)  # before anything is written
        try:
            return run(cfg, ctx)
        finally:
            if claim is not None:
                claim.release()

    try:
        summary, code = run_reporting_bad_input(train)
    except Stopped as e:
        log.warning("%s; exiting with %d, the next start resumes from it", e, EXIT_STOPPED)
        return EXIT_STOPPED
    except Diverged as e:
        return report_stop(f"training error: {e}" if str(e) else "", EXIT_NONFINITE)
    except WriteFailed as e:
        return report_stop(f"write error: {e}" if str(e) else "", EXIT_WRITE_FAILED)
    except tf.errors.OpError as e:
        if not collective_failed(e):
            raise
        # Another rank failed and said why, or died, or the stall check ended the job: a traceback
        # of this rank's collective would bury that (its details are at DEBUG, runtime.log_all_ranks).
        log.debug("the failed collective", exc_info=True)
        log.error("a collective failed: another rank ended or the stall check stopped the job; exiting")
        yield_to_the_failed_rank()
        return 1
    if code:
        return code
    if summary is not None:
        print_summary(summary)
    return 0


def report_stop(line: str, code: int) -> int:
    """`code`, after the one line on stderr (rank 0's; the other ranks' is empty).

    Every rank stops with the same code, but not at the same instant: horovodrun
    answers the first to exit by terminating the others, and a SIGTERM that
    lands while this process winds down would replace its code. It is ignored
    from here on (Python keeps an ignored signal ignored through its shutdown).
    """
    if line:
        print(line, file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return code


def yield_to_the_failed_rank(seconds: float = PEER_GRACE_SEC) -> None:
    """Lets the rank that failed first end first, so that the runner names it, and its exit code.

    That rank says why and exits, which takes it a moment; this one learnt of
    it at once, through its collective. The runner's SIGTERM, which ends the
    other ranks once one has ended, now ends this one at once (no checkpoint
    to write); without one (the stall check shut every rank down), it exits
    after `seconds`. If that SIGTERM came already, while the collective's error
    was being raised, it exits at once: the runner would not send another
    before its grace ends (launch --signal-grace-sec, minutes under Slurm).
    """
    from trainer.preemption import signal_received

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if signal_received() is None:
        time.sleep(seconds)


def print_summary(summary: dict) -> None:
    rows = [(k, summary[k]) for k in sorted(summary)]
    width = max(len(k) for k, _ in rows)
    print("summary:")
    for k, v in rows:
        print(f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}")
    sys.stdout.flush()


if __name__ == "__main__":
    exit_after_collecting(main())

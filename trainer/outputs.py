"""Everything a run writes, decided in one place: rank 0 writes, other ranks don't.

`make_outputs(ctx, ...)` returns a `ChiefOutputs` on rank 0 and a `RunOutputs`
(which writes nothing) elsewhere. The trainer calls the same methods on every
rank and never asks for the rank itself. In training, a write that fails is
recorded in the run's trainer.failures.RunFailures, not raised, and nothing
more is written: every rank then stops at the same step (trainer.failures).

RUN_DIR/
  claim.json             the job that holds the folder, while it runs (trainer.run_claim)
  config.yaml            the resolved config of the latest start
  checkpoints/ckpt-N-step-S/  see trainer.checkpoint
  checkpoints/best.json  which checkpoint is the best by train.best_metric
  checkpoints/damaged/   checkpoints that could not be read, moved aside at start
  tensorboard/train/     epoch and step scalars, rank timing, input images,
                         histograms, profiler traces (see trainer.summaries)
  tensorboard/validation/ validation scalars of the evaluated epochs
  metrics.jsonl          one JSON object per epoch (appended; a resumed run first drops
                         the records from its resume point on, see keep_records)
  summary.json           final metrics and throughput
  export/                SavedModel for serving: encoded images in, class names out (trainer.export)
"""

import json
import logging
import os
import sys

import tensorflow as tf

from data_pipeline import atomic
from trainer import callbacks as cb
from trainer import summaries
from trainer.checkpoint import CHECKPOINT_DIR, SUMMARY_FILE, CheckpointError, CheckpointManager
from trainer.checkpoint_guard import nonfinite_variable
from trainer.config import ConfigError, ExperimentConfig, best_mode, dump_yaml, profile_range
from trainer.console import progress_wanted
from trainer.failures import WRITE_ERRORS, WriteFailed, WriteGuard, describe_write_error
from trainer.input_wait import InputBoundWarning

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
EXPORT_DIR = "export"


class RunOutputs:
    """A rank that is not the chief: no files, no console lines, no progress bar."""

    verbose = 0  # for model.fit on every rank: the console lines are trainer.console's

    def __init__(self, cfg: ExperimentConfig, failures=None):
        """`failures`: the run's trainer.failures.RunFailures; None outside training, where write errors raise."""
        self.cfg = cfg
        self.failures = failures
        self.run_dir = cfg.run_dir
        self.checkpoints = CheckpointManager(
            os.path.join(self.run_dir, CHECKPOINT_DIR), cfg.train.keep_checkpoints,
            cfg.train.best_metric, best_mode(cfg.train), cfg.runtime.fault_slow_save_sec,
        )

    def start(self) -> None:
        pass

    def restore_latest(self, model, expect_model: dict) -> dict | None:
        return None

    def restore(self, model, which: str, expect_model: dict) -> dict | None:
        return None

    def keep_records(self, epochs_done: int) -> None:
        pass

    def callbacks(self, state_fn, timer=None) -> list:
        return []

    def write_input_sample(self, dataset, step: int) -> None:
        pass

    def load_summary(self) -> dict | None:
        return None

    def finish(self, model, summary: dict, log_validation: bool = False) -> dict | None:
        return None

    def report_evaluation(self, model, result: dict, export_dir: str = "") -> None:
        pass


class ChiefOutputs(RunOutputs):
    """Rank 0: checkpoints, TensorBoard, config, metrics file, epoch lines, progress bar, summary, export."""

    _writer = None  # tensorboard/train, see train_writer

    def start(self) -> None:
        try:
            os.makedirs(self.run_dir, mode=0o750, exist_ok=True)
        except OSError as e:  # past check_run_dir, a filesystem may still refuse (/proc, a read-only mount)
            raise ConfigError(f"run_dir {self.run_dir!r}: cannot be created: {e.strerror or e}") from None
        try:
            # Only rank 0 writes them, so no save or export of this run is under way.
            self.checkpoints.remove_leftovers()
            atomic.recover_dir(os.path.join(self.run_dir, EXPORT_DIR))
            atomic.write_text(os.path.join(self.run_dir, "config.yaml"), dump_yaml(self.cfg))
        except OSError as e:
            self._failed(e)

    def _failed(self, error: BaseException) -> None:
        """Records a failed write of a training run (every rank then stops), or raises it outside training."""
        if self.failures is None:
            raise error
        self.failures.record_write(error)

    @property
    def _writing(self) -> bool:
        return self.failures is None or self.failures.write is None

    def restore_latest(self, model, expect_model: dict) -> dict | None:
        """The newest checkpoint by progress; an earlier one (with a warning) when it is torn."""
        state = self.checkpoints.restore_latest(model, expect_model)
        if state is None:
            return None
        log.info("resumed from %s (epoch %d, step %d)", state.pop("path"), state["epoch"], state["global_step"])
        return state

    def keep_records(self, epochs_done: int) -> None:
        """Keeps the last record of each epoch up to `epochs_done` in metrics.jsonl, where the run continues.

        Dropped: a cut-short epoch's record (the completed epoch's replaces
        it), those of later epochs (a resume from an earlier checkpoint trains
        them again) and a line torn by a kill. Rewritten atomically, if at all.
        """
        path = os.path.join(self.run_dir, METRICS_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return
        kept = {epoch: line for epoch, line in ((_epoch_of(x), x) for x in lines) if 0 < (epoch or 0) <= epochs_done}
        if [kept[e] for e in sorted(kept)] != lines and self._writing:
            try:
                atomic.write_text(path, "".join(kept[e] + "\n" for e in sorted(kept)), durable=True)
            except OSError as e:
                self._failed(e)
                return
            log.info("%s: continuing after epoch %d, %d of its %d records dropped (cut short, later, or torn)",
                     path, epochs_done, len(lines) - len(kept), len(lines))

    def restore(self, model, which: str, expect_model: dict) -> dict:
        """Loads the `latest`, the `best` or a named checkpoint; returns its state with its path."""
        path = self.checkpoints.resolve(which)
        state = self.checkpoints.restore(model, path, expect_model)
        log.info("loaded %s (epoch %s, step %s)", path, state.get("epoch"), state.get("global_step"))
        return {**state, "path": path}

    @property
    def train_writer(self):
        """One writer per start for tensorboard/train, opened at first use."""
        if self._writer is None:
            try:
                self._writer = tf.summary.create_file_writer(os.path.join(self.run_dir, "tensorboard", "train"))
            except WRITE_ERRORS as e:
                self._failed(e)
                self._writer = tf.summary.create_noop_writer()  # never written to: nothing is after a failure
        return self._writer

    def callbacks(self, state_fn, timer=None) -> list:
        """`timer` is the cb.StepTimer of every rank, whose gathered figures rank 0 writes."""
        tb = self.cfg.tensorboard
        step = summaries.GlobalStep()
        extra = [step]
        if tb.step_frequency:
            extra.append(summaries.StepScalars(self.train_writer, step, tb.step_frequency))
        if timer is not None:
            extra.append(summaries.RankTiming(self.train_writer, timer))
        if tb.histograms:
            extra.append(summaries.WeightHistograms(self.train_writer))
        profile = profile_range(tb.profile_steps)
        if profile:
            extra.append(summaries.ProfileSteps(os.path.join(self.run_dir, "tensorboard", "train"), step, *profile))
        epochs = self.cfg.train.epochs
        console = [cb.ProgressBar(epochs)] if progress_wanted(os.environ, sys.stdout.isatty()) else []
        writers = [
            cb.MetricsFile(os.path.join(self.run_dir, METRICS_FILE)),
            cb.EpochCheckpoint(self.checkpoints, state_fn, self.failures),
            summaries.EpochScalars(self.train_writer, os.path.join(self.run_dir, "tensorboard", "validation")),
            *extra,
        ]
        evaluated = "EMA weights" if self.cfg.train.ema and self.cfg.train.ema_evaluate else ""
        return [*console, cb.EpochLine(epochs, evaluated=evaluated), InputBoundWarning(),
                WriteGuard(self.failures, writers)]

    def write_input_sample(self, dataset, step: int) -> None:
        if self.cfg.tensorboard.sample_images and self._writing:
            try:
                summaries.write_input_sample(self.train_writer, dataset, self.cfg.tensorboard.sample_images, step)
            except WRITE_ERRORS as e:
                self._failed(e)

    def load_summary(self) -> dict | None:
        path = os.path.join(self.run_dir, SUMMARY_FILE)
        if not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                summary = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {path!r} ({e}); delete it and the run writes it again") from None
        if not isinstance(summary, dict):
            raise CheckpointError(f"cannot read {path!r} (not a JSON object); delete it and the run writes it again")
        return summary

    def finish(self, model, summary: dict, log_validation: bool = False) -> dict:
        """Writes summary.json (and the export); `log_validation` when no epoch callback logged the final one."""
        if self._writing:
            try:
                self._finish(model, summary, log_validation)
            except WRITE_ERRORS as e:
                self._failed(e)
        return summary

    def _finish(self, model, summary: dict, log_validation: bool) -> None:
        if log_validation:
            writer = tf.summary.create_file_writer(os.path.join(self.run_dir, "tensorboard", "validation"))
            with writer.as_default(step=summary["epochs"]):
                for key in sorted(k for k in summary if k.startswith("val_") and k != "val_examples"):
                    tf.summary.scalar(key[4:], summary[key])
            writer.close()
        if self._writer is not None:
            self._writer.close()
        best = self.checkpoints.best()
        if best:
            summary["best_checkpoint"] = best
        bad = nonfinite_variable(model.weights) if self.cfg.train.export else None
        if bad:  # only with train.stop_on_nonfinite: false
            log.warning("no export: %s is not finite", bad)
        elif self.cfg.train.export:
            summary["export_dir"] = self._export(model, os.path.join(self.run_dir, EXPORT_DIR), summary)
        atomic.write_json(os.path.join(self.run_dir, SUMMARY_FILE), summary)

    def report_evaluation(self, model, result: dict, export_dir: str = "") -> None:
        """Prints an evaluation as one JSON line on stdout, and exports the model if asked."""
        if export_dir:
            try:
                result["export_dir"] = self._export(model, export_dir, result)
            except WRITE_ERRORS as e:
                raise WriteFailed(describe_write_error(e)) from None
        print("evaluation " + json.dumps(result, sort_keys=True), flush=True)

    def _export(self, model, final: str, result: dict) -> str:
        """The serving SavedModel (trainer.export), replaced only once the new one is complete.

        `result` holds the validation metrics, and an evaluated checkpoint's step and config hash.
        """
        from trainer.assembly import config_hash
        from trainer.export import export_info, export_serving

        sha = result.get("config_sha256") or config_hash(self.cfg)
        export_serving(model, final, export_info(self.cfg, model, result, sha))
        log.info("exported SavedModel for serving: %s", final)
        return final


def _epoch_of(line: str) -> int | None:
    """The epoch of a metrics.jsonl line, None for a line that holds no record."""
    try:
        epoch = json.loads(line)["epoch"]
    except (ValueError, TypeError, KeyError):
        return None
    return epoch if type(epoch) is int else None


def make_outputs(ctx, cfg: ExperimentConfig, failures=None) -> RunOutputs:
    """The single place where rank-0-only side effects are decided; `failures` in training (RunOutputs)."""
    return ChiefOutputs(cfg, failures) if ctx.is_chief else RunOutputs(cfg, failures)

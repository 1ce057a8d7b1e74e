"""Everything a run writes, decided in one place: rank 0 writes, other ranks don't.

`make_outputs(ctx, ...)` returns a `ChiefOutputs` on rank 0 and a `RunOutputs`
(which writes nothing) elsewhere. The trainer calls the same methods on every
rank and never asks for the rank itself.

RUN_DIR/
  config.yaml            the resolved config of the latest start
  checkpoints/step-N/    see trainer.checkpoint
  tensorboard/train/     epoch scalars
  tensorboard/validation/ final evaluation scalars
  summary.json           final metrics and throughput
  export/                TensorFlow SavedModel for serving
"""

import json
import logging
import os
import shutil
import sys

import tensorflow as tf

from trainer import callbacks as cb
from trainer.checkpoint import CheckpointManager
from trainer.config import ExperimentConfig, dump_yaml

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


class RunOutputs:
    """A rank that is not the chief: no files, no progress bar."""

    verbose = 0

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.checkpoints = CheckpointManager(os.path.join(self.run_dir, "checkpoints"), cfg.train.keep_checkpoints)

    def start(self) -> None:
        pass

    def restore_latest(self, model, expect_model: dict) -> dict | None:
        return None

    def callbacks(self, state_fn) -> list:
        return []

    def load_summary(self) -> dict | None:
        return None

    def evaluate(self, model, make_dataset) -> dict | None:
        return None

    def finish(self, model, summary: dict) -> None:
        pass


class ChiefOutputs(RunOutputs):
    """Rank 0: checkpoints, TensorBoard, config, evaluation, summary, export, progress bar."""

    verbose = 1 if sys.stdout.isatty() else 2

    def start(self) -> None:
        os.makedirs(self.run_dir, mode=0o750, exist_ok=True)
        _write_atomic(os.path.join(self.run_dir, "config.yaml"), dump_yaml(self.cfg))

    def restore_latest(self, model, expect_model: dict) -> dict | None:
        path = self.checkpoints.latest()
        if path is None:
            return None
        state = self.checkpoints.restore(model, path, expect_model)
        log.info("resumed from %s (epoch %d, step %d)", path, state["epoch"], state["global_step"])
        return state

    def callbacks(self, state_fn) -> list:
        return [
            cb.InputBoundWarning(),
            cb.EpochCheckpoint(self.checkpoints, state_fn),
            cb.TensorBoardScalars(os.path.join(self.run_dir, "tensorboard", "train")),
        ]

    def load_summary(self) -> dict | None:
        path = os.path.join(self.run_dir, SUMMARY_FILE)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def evaluate(self, model, make_dataset) -> dict:
        results = model.evaluate(make_dataset(), verbose=0, return_dict=True)
        return {k: float(v) for k, v in results.items()}

    def finish(self, model, summary: dict) -> None:
        writer = tf.summary.create_file_writer(os.path.join(self.run_dir, "tensorboard", "validation"))
        with writer.as_default(step=summary["epochs"]):
            tf.summary.scalar("loss", summary["val_loss"])
            tf.summary.scalar("accuracy", summary["val_accuracy"])
        writer.close()
        if self.cfg.train.export:
            summary["export_dir"] = self._export(model)
        _write_atomic(os.path.join(self.run_dir, SUMMARY_FILE), json.dumps(summary, indent=2, sort_keys=True) + "\n")

    def _export(self, model) -> str:
        """A SavedModel with a `serve` endpoint, replaced only once the new one is complete."""
        final = os.path.join(self.run_dir, "export")
        tmp = f"{final}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.export(tmp, format="tf_saved_model", verbose=False)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        log.info("exported SavedModel for serving: %s", final)
        return final


def make_outputs(ctx, cfg: ExperimentConfig) -> RunOutputs:
    """The single place where rank-0-only side effects are decided."""
    return ChiefOutputs(cfg) if ctx.is_chief else RunOutputs(cfg)

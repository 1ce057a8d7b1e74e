"""Epoch checkpoints: model weights, optimizer state and progress, written atomically.

A checkpoint is a folder `RUN_DIR/checkpoints/epoch-00003/` holding
`model.weights.h5` (Keras weights), `optimizer.npz` (optimizer variables,
including the step counter that drives the learning-rate schedule) and
`state.json` (epoch, global step). It is written under a temporary name and
renamed into place, so a crash mid-write leaves the previous checkpoints as
they were; `latest()` only ever sees complete ones. Nothing is unpickled.
"""

import json
import logging
import os
import re
import shutil

import numpy as np

log = logging.getLogger(__name__)

_NAME = re.compile(r"^epoch-(\d{5,})$")
STATE_FILE = "state.json"
WEIGHTS_FILE = "model.weights.h5"
OPTIMIZER_FILE = "optimizer.npz"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


class CheckpointManager:
    def __init__(self, directory: str, keep: int = 3):
        self.directory = directory
        self.keep = keep

    def _epochs(self) -> list[int]:
        if not os.path.isdir(self.directory):
            return []
        found = []
        for name in os.listdir(self.directory):
            m = _NAME.match(name)
            if m and os.path.isfile(os.path.join(self.directory, name, STATE_FILE)):
                found.append(int(m.group(1)))
        return sorted(found)

    def path(self, epoch: int) -> str:
        return os.path.join(self.directory, f"epoch-{epoch:05d}")

    def latest(self) -> str | None:
        epochs = self._epochs()
        return self.path(epochs[-1]) if epochs else None

    def save(self, model, epoch: int, extra: dict | None = None) -> str:
        """Writes the checkpoint of `epoch` (epochs completed) and prunes old ones."""
        os.makedirs(self.directory, mode=0o750, exist_ok=True)
        final = self.path(epoch)
        tmp = f"{final}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, mode=0o750)
        try:
            model.save_weights(os.path.join(tmp, WEIGHTS_FILE))
            store: dict = {}
            model.optimizer.save_own_variables(store)
            np.savez(os.path.join(tmp, OPTIMIZER_FILE), **{k: np.asarray(v) for k, v in store.items()})
            state = {"epoch": epoch, "global_step": int(model.optimizer.iterations.numpy()), **(extra or {})}
            # state.json last: its presence marks the folder complete.
            with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
                json.dump(state, f, indent=2, sort_keys=True)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self._epochs()[: -self.keep]:
            shutil.rmtree(self.path(old), ignore_errors=True)
        return final

    def restore(self, model, path: str) -> dict:
        """Loads weights and optimizer state from `path` into a built model; returns state.json."""
        try:
            with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
                state = json.load(f)
            model.load_weights(os.path.join(path, WEIGHTS_FILE))
            if not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)
            with np.load(os.path.join(path, OPTIMIZER_FILE), allow_pickle=False) as npz:
                store = {k: npz[k] for k in npz.files}
            model.optimizer.load_own_variables(store)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"cannot restore checkpoint {path!r}: {first}") from None
        return state

"""Checkpoints: model weights, optimizer state and progress, written atomically.

A checkpoint is a folder `RUN_DIR/checkpoints/step-000000132/`, named by the
global step, holding
  model.weights.h5   Keras weights (BatchNorm statistics included),
  optimizer.npz      optimizer variables, among them the step counter that
                     positions the learning-rate schedule,
  rng.npz            random-generator states (dropout masks),
  state.json         epoch, global step, steps per epoch, world size, batch,
                     data seed, a hash of the config, and the model signature
                     (name, input shape, classes) that a resume must match.
It is written under a temporary name and renamed into place, so a crash at any
moment leaves the earlier checkpoints as they were; `latest()` only sees
complete ones. Nothing is unpickled: HDF5, npz with allow_pickle=False and JSON.

The last `keep` checkpoints are kept, and with a `best_metric` also the one
whose state.json holds the best value of it (under "validation"), however
old; `checkpoints/best.json` names it. The best is found from the state.json
files themselves, so a crash between a save and the pointer update loses
nothing: the pointer is rewritten at the next save.
"""

import json
import logging
import os
import re
import shutil

import numpy as np

from data_pipeline import atomic

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{9,})$")
STATE_FILE = "state.json"
BEST_FILE = "best.json"
WEIGHTS_FILE = "model.weights.h5"
OPTIMIZER_FILE = "optimizer.npz"
RNG_FILE = "rng.npz"


def rng_variables(model) -> list:
    """Model state that save_weights leaves out: the seed generators of Dropout and the like.

    Without them a resumed run would draw different dropout masks than an
    uninterrupted one.
    """
    saved = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in saved]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit this run; str(e) is one line."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class CheckpointManager:
    def __init__(self, directory: str, keep: int = 3, best_metric: str = "", best_mode: str = "max"):
        self.directory = directory
        self.keep = keep
        self.best_metric = best_metric
        self.best_mode = best_mode

    def _steps(self) -> list[int]:
        if not os.path.isdir(self.directory):
            return []
        found = []
        for name in os.listdir(self.directory):
            m = _NAME.match(name)
            if m and os.path.isfile(os.path.join(self.directory, name, STATE_FILE)):
                found.append(int(m.group(1)))
        return sorted(found)

    def path(self, global_step: int) -> str:
        return os.path.join(self.directory, f"step-{global_step:09d}")

    def latest(self) -> str | None:
        steps = self._steps()
        return self.path(steps[-1]) if steps else None

    def _best_step(self) -> tuple[int, dict] | None:
        """(step, state) of the checkpoint with the best best_metric; the earliest of equals."""
        if not self.best_metric:
            return None
        best = None
        for step in self._steps():
            try:
                state = self.read_state(self.path(step))
            except CheckpointError as e:
                log.warning("%s; not a candidate for the best checkpoint", e)
                continue
            value = (state.get("validation") or {}).get(self.best_metric)
            if value is None:
                continue
            if best is None or (value > best[2] if self.best_mode == "max" else value < best[2]):
                best = (step, state, value)
        return best[:2] if best else None

    def best(self) -> str | None:
        """The best checkpoint by best_metric, or None (no metric, or nothing validated yet)."""
        found = self._best_step()
        return self.path(found[0]) if found else None

    def recorded_best(self) -> str | None:
        """The checkpoint best.json names (the metric of the run that wrote it), else best()."""
        try:
            with open(os.path.join(self.directory, BEST_FILE), encoding="utf-8") as f:
                name = json.load(f)["checkpoint"]
        except (OSError, ValueError, KeyError, TypeError):
            return self.best()
        return os.path.join(self.directory, name) if _NAME.match(str(name)) else self.best()

    def resolve(self, which: str) -> str:
        """`latest`, `best` (as recorded) or a checkpoint folder, as a path; CheckpointError if there is none."""
        named = os.path.join(self.directory, which)  # a folder name such as step-000000044
        path = {"latest": self.latest, "best": self.recorded_best}.get(
            which, lambda: named if _NAME.match(which) and os.path.isdir(named) else which)()
        if path is None or not os.path.isfile(os.path.join(path, STATE_FILE)):
            what = f"no {which} checkpoint" if which in ("latest", "best") else f"{which!r} is not a checkpoint"
            raise CheckpointError(f"{what} in {self.directory!r}" if path is None else what)
        return path

    def _write_best_pointer(self, found: tuple[int, dict] | None) -> None:
        pointer = os.path.join(self.directory, BEST_FILE)
        if found is None:
            if os.path.exists(pointer):
                os.remove(pointer)
            return
        step, state = found
        info = {
            "checkpoint": os.path.basename(self.path(step)), "global_step": step, "epoch": state.get("epoch"),
            "metric": self.best_metric, "mode": self.best_mode, "value": state["validation"][self.best_metric],
            "validation": state["validation"],
        }
        atomic.write_json(pointer, info)

    def save(self, model, state: dict) -> str:
        """Writes a checkpoint at the optimizer's current step and prunes old ones.

        `state` is stored in state.json beside the global step. Raises OSError
        when the write fails; the earlier checkpoints are then untouched.
        """
        global_step = int(model.optimizer.iterations.numpy())
        os.makedirs(self.directory, mode=0o750, exist_ok=True)
        final = self.path(global_step)
        with atomic.staged_dir(final) as tmp:
            model.save_weights(os.path.join(tmp, WEIGHTS_FILE))
            store: dict = {}
            model.optimizer.save_own_variables(store)
            np.savez(os.path.join(tmp, OPTIMIZER_FILE), **{k: np.asarray(v) for k, v in store.items()})
            np.savez(os.path.join(tmp, RNG_FILE), *[v.numpy() for v in rng_variables(model)])
            # state.json last: its presence marks the folder complete.
            with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
                json.dump({**state, "global_step": global_step}, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
        best = self._best_step()
        self._write_best_pointer(best)
        for old in self._steps()[: -self.keep]:
            if best is None or old != best[0]:
                shutil.rmtree(self.path(old), ignore_errors=True)
        return final

    @staticmethod
    def read_state(path: str) -> dict:
        try:
            with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
                state = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read checkpoint {path!r}: {_first_line(e)}") from None
        # Resuming indexes the schedule and the data by these two: check them here, once.
        for key in ("epoch", "global_step"):
            value = state.get(key) if isinstance(state, dict) else None
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CheckpointError(f"cannot read checkpoint {path!r}: {STATE_FILE} has no {key!r} count")
        return state

    def restore(self, model, path: str, expect_model: dict | None = None) -> dict:
        """Loads weights and optimizer state from `path` into a compiled model.

        `expect_model` (name, input_shape, num_classes) must equal the
        checkpoint's: restoring a different network is refused before any
        weight is touched.
        """
        state = self.read_state(path)
        if expect_model is not None and state.get("model") != expect_model:
            raise CheckpointError(
                f"checkpoint {path!r} was written for {describe(state.get('model'))}; "
                f"this run builds {describe(expect_model)}"
            )
        try:
            # Built first: the weights file holds the optimizer's variables too,
            # and Keras skips them (with a warning) for an unbuilt optimizer.
            if not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)
            model.load_weights(os.path.join(path, WEIGHTS_FILE))
            with np.load(os.path.join(path, OPTIMIZER_FILE), allow_pickle=False) as npz:
                store = {k: npz[k] for k in npz.files}
            model.optimizer.load_own_variables(store)
            rng = rng_variables(model)
            with np.load(os.path.join(path, RNG_FILE), allow_pickle=False) as npz:
                if len(npz.files) != len(rng):
                    raise ValueError(f"{len(npz.files)} random-generator states for {len(rng)} in the model")
                for i, v in enumerate(rng):
                    v.assign(npz[f"arr_{i}"])
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"cannot restore checkpoint {path!r}: {_first_line(e)}") from None
        return state


def describe(signature: dict | None) -> str:
    if not signature:
        return "an unknown model"
    shape = "x".join(str(d) for d in signature.get("input_shape", []))
    return f"model {signature.get('name')} with {signature.get('num_classes')} classes and input {shape}"

"""Checkpoints: model weights, optimizer state and progress, written atomically.

A checkpoint is a folder `RUN_DIR/checkpoints/ckpt-000007-step-000000132/`,
named by its save number and global step (trainer.checkpoint_folder: the
names sort in training order), holding
  model.weights.h5   Keras weights (BatchNorm statistics included),
  optimizer.npz      optimizer variables, among them the step counter that
                     positions the learning-rate schedule,
  rng.npz            random-generator states (dropout masks),
  state.json         epoch, global step, save number, steps per epoch, world
                     size, batch, data seed, a hash of the config, and the model
                     signature (name, input shape, classes) that a resume must match.
It is written under a temporary name, every file and the folder fsynced, and
renamed into place, so a crash or power loss at any moment leaves the earlier
checkpoints as they were; `latest()` only sees complete ones. Nothing is
unpickled: HDF5, npz with allow_pickle=False and JSON. Weights or optimizer
state with a NaN or an inf are never written (trainer.checkpoint_guard).

Order is training progress as state.json records it (epoch, then the fraction
of the next epoch done), never the folder name: the names of earlier versions
held only the global step, which a resume with a larger global batch re-bases
lower, and their newer checkpoints must still count as newer. The last `keep`
checkpoints in that order are kept, and with a `best_metric` also the one
whose state.json holds the best finite value of it (under "validation"),
however old; `checkpoints/best.json` names it. The best is found from the
state.json files themselves, so a crash between a save and the pointer update
loses nothing: the pointer is rewritten at the next save. A checkpoint that
cannot be read is moved into `damaged/` at the next start (restore_latest).
"""

import json
import logging
import math
import os
import shutil
import time

import numpy as np

from data_pipeline import atomic
from trainer import checkpoint_folder as folder
from trainer.checkpoint_guard import NonFiniteState, check_finite, write_weights  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"  # in the run folder
STATE_FILE = "state.json"
BEST_FILE = "best.json"
WEIGHTS_FILE = "model.weights.h5"
OPTIMIZER_FILE = "optimizer.npz"
RNG_FILE = "rng.npz"
# In the run folder: rank 0 writes it (trainer.outputs) once the run has trained all its epochs.
SUMMARY_FILE = "summary.json"


def run_finished(run_dir: str, epochs: int) -> bool:
    """Whether run_dir's summary.json says the run has trained `epochs` epochs (a stopped run writes none).

    TensorFlow-free: the launcher asks it after a stop it passed on, as a
    runner that exits 0 then does not prove the run is over.
    """
    try:
        with open(os.path.join(run_dir, SUMMARY_FILE), encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return False
    done = summary.get("epochs") if isinstance(summary, dict) else None
    return isinstance(done, int) and done >= epochs


def rng_variables(model) -> list:
    """Model state that save_weights leaves out: the seed generators of Dropout and the like.

    Without them a resumed run would draw different dropout masks than an
    uninterrupted one.
    """
    saved = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in saved]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit this run; str(e) is one line."""


class UnreadableCheckpoint(CheckpointError):
    """A checkpoint whose files cannot be read (torn by a crash or a full disk): an earlier one may do."""


def progress(state: dict) -> tuple[int, float]:
    """(completed epochs, fraction of the next epoch done): comparable across steps-per-epoch changes."""
    epoch, step = int(state["epoch"]), int(state["global_step"])
    spe = int(state.get("steps_per_epoch") or 0)
    return epoch, (step - epoch * spe) / spe if spe > 0 else 0.0


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class CheckpointManager:
    def __init__(self, directory: str, keep: int = 3, best_metric: str = "", best_mode: str = "max",
                 slow_save_sec: float = 0.0):
        self.directory = directory
        self.keep = keep
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.slow_save_sec = slow_save_sec  # runtime.fault_slow_save_sec: tests only

    def remove_leftovers(self) -> None:
        """For rank 0 at the start of a run (ChiefOutputs.start): no save is under way then."""
        folder.remove_leftovers(self.directory)

    def _scan(self) -> tuple[list[tuple[tuple, str, dict]], list[tuple[str, str]]]:
        """(order key, path, state) of the readable checkpoints, oldest progress first; (path, why) of the rest.

        Equal progress (a resume from an earlier checkpoint that reached it again) goes by write time.
        """
        if not os.path.isdir(self.directory):
            return [], []
        found, unreadable = [], []
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if not folder.NAME.match(name) or not os.path.isfile(os.path.join(path, STATE_FILE)):
                continue
            try:
                state = self.read_state(path)
                key = (*progress(state), os.stat(os.path.join(path, STATE_FILE)).st_mtime_ns, name)
            except (CheckpointError, OSError, KeyError, TypeError, ValueError) as e:
                unreadable.append((path, str(e) if isinstance(e, CheckpointError) else
                                   f"cannot read checkpoint {path!r}: state.json has no valid {_first_line(e)}"))
                continue
            found.append((key, path, state))
        return sorted(found, key=lambda entry: entry[0]), sorted(unreadable)

    def latest(self) -> str | None:
        found, _ = self._scan()
        return found[-1][1] if found else None

    def _best(self, found: list) -> tuple[str, dict] | None:
        """(path, state) of the checkpoint with the best finite best_metric; the earliest of equals."""
        if not self.best_metric:
            return None
        best = None
        for _, path, state in found:
            value = (state.get("validation") or {}).get(self.best_metric)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                continue  # not validated, or a diverged run's NaN/inf: never the best
            if best is None or (value > best[2] if self.best_mode == "max" else value < best[2]):
                best = (path, state, value)
        return best[:2] if best else None

    def best(self) -> str | None:
        """The best checkpoint by best_metric, or None (no metric, or nothing validated yet)."""
        found = self._best(self._scan()[0])
        return found[0] if found else None

    def recorded_best(self) -> str | None:
        """The checkpoint best.json names (the metric of the run that wrote it), else best()."""
        try:
            with open(os.path.join(self.directory, BEST_FILE), encoding="utf-8") as f:
                name = json.load(f)["checkpoint"]
        except (OSError, ValueError, KeyError, TypeError):
            return self.best()
        return os.path.join(self.directory, name) if folder.NAME.match(str(name)) else self.best()

    def resolve(self, which: str) -> str:
        """`latest`, `best` (as recorded) or a checkpoint folder, as a path; CheckpointError if there is none."""
        named = os.path.join(self.directory, which)  # a folder name such as ckpt-000002-step-000000044
        path = {"latest": self.latest, "best": self.recorded_best}.get(
            which, lambda: named if folder.NAME.match(which) and os.path.isdir(named) else which)()
        if path is None or not os.path.isfile(os.path.join(path, STATE_FILE)):
            what = f"no {which} checkpoint" if which in ("latest", "best") else f"{which!r} is not a checkpoint"
            raise CheckpointError(f"{what} in {self.directory!r}" if path is None else what)
        return path

    def _write_best_pointer(self, found: tuple[str, dict] | None) -> None:
        pointer = os.path.join(self.directory, BEST_FILE)
        if found is None:
            if os.path.exists(pointer):
                os.remove(pointer)
            return
        path, state = found
        info = {
            "checkpoint": os.path.basename(path), "global_step": state["global_step"], "epoch": state.get("epoch"),
            "metric": self.best_metric, "mode": self.best_mode, "value": state["validation"][self.best_metric],
            "validation": state["validation"],
        }
        atomic.write_json(pointer, info, durable=True)

    def save(self, model, state: dict) -> str:
        """Writes a checkpoint at the optimizer's current step and prunes old ones.

        `state` is stored in state.json beside the global step and the save number
        (`checkpoint_number`, in the folder name too). Raises OSError when the
        write fails, NonFiniteState (before writing anything) for a NaN or an
        inf; the earlier checkpoints are then untouched.
        """
        check_finite(model)
        number = folder.next_number(self.directory)
        state = {**state, "global_step": int(model.optimizer.iterations.numpy()), "checkpoint_number": number}
        os.makedirs(self.directory, mode=0o750, exist_ok=True)
        final = os.path.join(self.directory, folder.name(number, state["global_step"]))
        with atomic.staged_dir(final, durable=True) as tmp:
            write_weights(model, os.path.join(tmp, WEIGHTS_FILE))
            store: dict = {}
            model.optimizer.save_own_variables(store)
            np.savez(os.path.join(tmp, OPTIMIZER_FILE), **{k: np.asarray(v) for k, v in store.items()})
            np.savez(os.path.join(tmp, RNG_FILE), *[v.numpy() for v in rng_variables(model)])
            if self.slow_save_sec:
                log.warning("runtime.fault_slow_save_sec: holding the save of %s for %g s", final, self.slow_save_sec)
                time.sleep(self.slow_save_sec)
            # state.json last: its presence marks the folder complete.
            with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
                json.dump(state, f, indent=2, sort_keys=True)
        found, _ = self._scan()
        best = self._best(found)
        self._write_best_pointer(best)
        for _, old, _ in found[: -self.keep]:
            if best is None or old != best[0]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def restore_latest(self, model, expect_model: dict | None = None) -> dict | None:
        """Restores the newest checkpoint that can be read; moves those that cannot into `damaged/`.

        For rank 0 at the start of a run, when no save is under way. Each
        damaged checkpoint gets one warning, once: moved aside, it is not tried
        again. Returns the state with its "path", or None when there is no
        checkpoint. When none can be read, nothing is moved (UnreadableCheckpoint).
        A checkpoint of another model is an error, not a reason to go back.
        """
        found, skipped = self._scan()
        for _, path, _ in reversed(found):
            try:
                state = self.restore(model, path, expect_model)
            except UnreadableCheckpoint as e:
                skipped.append((path, str(e)))
                continue
            for bad, why in skipped:
                try:
                    moved = f"moved {bad} to {folder.set_aside(self.directory, bad)} for a person to look at"
                except OSError as e:
                    moved = f"could not move {bad} aside ({e})"
                log.warning("%s; restoring %s instead; %s", why, path, moved)
            return {**state, "path": path}
        if skipped:
            raise UnreadableCheckpoint(f"no readable checkpoint in {self.directory!r}: {skipped[-1][1]}")
        return None

    @staticmethod
    def read_state(path: str) -> dict:
        try:
            with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
                state = json.load(f)
        except (OSError, ValueError) as e:
            raise UnreadableCheckpoint(f"cannot read checkpoint {path!r}: {_first_line(e)}") from None
        # Resuming indexes the schedule and the data by these two: check them here, once.
        for key in ("epoch", "global_step"):
            value = state.get(key) if isinstance(state, dict) else None
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UnreadableCheckpoint(f"cannot read checkpoint {path!r}: {STATE_FILE} has no {key!r} count")
        return state

    def restore(self, model, path: str, expect_model: dict | None = None) -> dict:
        """Loads weights and optimizer state from `path` into a compiled model.

        `expect_model` (name, input_shape, num_classes) must equal the
        checkpoint's: restoring a different network is refused before any
        weight is touched.
        """
        state = self.read_state(path)
        if expect_model is not None:
            check_model(path, state, expect_model)
        try:
            # Built first: the weights file holds the optimizer's variables too,
            # and Keras skips them (with a warning) for an unbuilt optimizer.
            if not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)
            with np.load(os.path.join(path, OPTIMIZER_FILE), allow_pickle=False) as npz:
                store = {k: npz[k] for k in npz.files}
            if len(store) != len(model.optimizer.variables):  # Keras would skip them all, the step counter too
                raise CheckpointError(f"checkpoint {path!r} holds {len(store)} optimizer variables, this run's "
                                      f"optimizer {len(model.optimizer.variables)}: it was written with another "
                                      "train.optimizer or train.precision (mixed_float16 adds a loss scale), or "
                                      "train.ema on or off (it adds the average)")
            model.load_weights(os.path.join(path, WEIGHTS_FILE))
            model.optimizer.load_own_variables(store)
            rng = rng_variables(model)
            with np.load(os.path.join(path, RNG_FILE), allow_pickle=False) as npz:
                if len(npz.files) != len(rng):
                    raise ValueError(f"{len(npz.files)} random-generator states for {len(rng)} in the model")
                for i, v in enumerate(rng):
                    v.assign(npz[f"arr_{i}"])
        except (OSError, ValueError, KeyError) as e:
            raise UnreadableCheckpoint(f"cannot restore checkpoint {path!r}: {_first_line(e)}") from None
        return state


def check_model(path: str, state: dict, expect_model: dict) -> None:
    """Raises CheckpointError when the checkpoint at `path` (its `state`) was written for another model."""
    if state.get("model") != expect_model:
        raise CheckpointError(
            f"checkpoint {path!r} was written for {describe(state.get('model'))}; "
            f"this run builds {describe(expect_model)}"
        )


def describe(signature) -> str:
    if not isinstance(signature, dict) or not signature:  # a state.json may hold anything there
        return "an unknown model"
    shape = signature.get("input_shape")
    shape = "x".join(str(d) for d in shape) if isinstance(shape, list) else repr(shape)
    return f"model {signature.get('name')} with {signature.get('num_classes')} classes and input {shape}"

"""`model.initial_weights`: start a run from a `.weights.h5` or `.keras` file, layer by layer where shapes agree.

Keras's own load_weights takes a file of the same model only (or skips
mismatched layers one warning each, with `skip_mismatch`, and says nothing when
nothing matched). Fine-tuning wants more: the ImageNet backbone loaded, the
head for another class count left at its initialisation, one line saying
which, and an error when the file matches nothing. So the file is compared
here, in Keras's own format, with this model's: a `.weights.h5` addresses each
layer's variables by its position among the layers of its class
(`layers/conv2d_3/vars/0`), which is the same in two builds of one
architecture, whatever the layer names. Every layer whose variables all agree
in shape is taken; the result is written as a file of this model and loaded
with Keras's load_weights.
"""

import logging
import os
import shutil
import tempfile
import zipfile

import h5py
import keras

from trainer.ema import start_average

log = logging.getLogger(__name__)

KERAS_WEIGHTS_MEMBER = "model.weights.h5"  # where a .keras archive keeps its weights


class InitialWeightsError(ValueError):
    """The file cannot start this model; str(e) is one line naming it."""


def _layer_vars(h5: h5py.File) -> dict[str, list[tuple]]:
    """{layer path: [shape of each variable]} of a Keras weights file (not its optimizer's)."""
    found: dict[str, list[tuple]] = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Group) and name.endswith("/vars") and not name.startswith("optimizer"):
            shapes = [tuple(obj[k].shape) for k in sorted(obj, key=int) if isinstance(obj[k], h5py.Dataset)]
            if shapes:
                found[name[: -len("/vars")]] = shapes
    h5.visititems(visit)
    return found


def _open(path: str, tmp: str) -> h5py.File:
    """The weights file of `path` (a .keras archive's member extracted into `tmp`), opened."""
    where = f"model.initial_weights={path!r}"
    if not os.path.isfile(path):
        raise InitialWeightsError(f"{where}: no such file")
    if path.endswith(".keras"):
        try:
            with zipfile.ZipFile(path) as archive:
                archive.extract(KERAS_WEIGHTS_MEMBER, tmp)
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise InitialWeightsError(f"{where}: not a readable .keras archive ({e})") from None
        path = os.path.join(tmp, KERAS_WEIGHTS_MEMBER)
    elif not path.endswith(".h5"):
        raise InitialWeightsError(f"{where}: must be a .weights.h5 or a .keras file")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise InitialWeightsError(f"{where}: not a readable HDF5 weights file ({str(e).splitlines()[0]})") from None


def layer_names(model: keras.Model) -> dict[str, str]:
    """{weights-file path: layer name} of the model's top-level layers, as Keras's saving numbers them."""
    used: dict[str, int] = {}
    names = {}
    for layer in model.layers:
        key = keras.src.utils.naming.to_snake_case(type(layer).__name__)
        used[key] = used.get(key, -1) + 1
        names[f"layers/{key}" + (f"_{used[key]}" if used[key] else "")] = layer.name
    return names


def load_initial_weights(model: keras.Model, path: str) -> tuple[int, list[str]]:
    """Loads the layers of `path` that fit `model`; (layers loaded, names of the layers kept as initialised)."""
    tmp = tempfile.mkdtemp(prefix="initial-weights-")
    try:
        ours_path = os.path.join(tmp, "this-model.weights.h5")  # not the name a .keras member takes
        model.save_weights(ours_path)
        with _open(path, tmp) as theirs, h5py.File(ours_path, "r+") as ours:
            mine, given = _layer_vars(ours), _layer_vars(theirs)
            taken = [p for p, shapes in mine.items() if given.get(p) == shapes]
            if not taken:
                raise InitialWeightsError(
                    f"model.initial_weights={path!r}: matches no layer of model {model.name} ({len(given)} layers "
                    f"with weights in the file, {len(mine)} in the model)")
            for p in taken:
                for i in range(len(mine[p])):
                    ours[f"{p}/vars/{i}"][...] = theirs[f"{p}/vars/{i}"][...]
        model.load_weights(ours_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    names = layer_names(model)
    kept = [names.get(p, p) for p in mine if p not in taken]
    log.info("model.initial_weights: %d of %d layers with weights loaded from %s; kept as initialised: %s",
             len(taken), len(mine), path, ", ".join(kept) or "none")
    return len(taken), kept


def start_from(model: keras.Model, path: str) -> None:
    """A run's start from model.initial_weights: the file's layers loaded, and the average restarted there.

    train.ema's average was set to the random initialisation when the
    optimizer was built (trainer.ema.start_average); it must start from the
    weights the run starts from. Keras copies the weights into it at step 0
    too, but not when that step is skipped (mixed_float16).
    """
    load_initial_weights(model, path)
    start_average(model)

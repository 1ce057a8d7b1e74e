"""Two guards of a checkpoint save (trainer.checkpoint): no non-finite state, and a clean failure on a full disk.

A model whose loss diverged carries NaN or inf weights; a checkpoint of it
would become the newest and be resumed from, so the save refuses it
(NonFiniteState) before writing anything.

Keras writes its weights file with h5py, which on a full disk fails halfway,
leaves the file half closed, prints tracebacks as its handles are collected,
and crashed the process at exit. The file is therefore built in memory and
written with plain file I/O, which fails with one OSError.
"""

import io

import numpy as np


class NonFiniteState(ValueError):
    """Weights or optimizer state with a NaN or an inf: never written as a checkpoint."""


def nonfinite_variable(variables) -> str | None:
    """The path of the first floating-point variable holding a NaN or an inf, or None."""
    for v in variables:
        value = np.asarray(v.numpy())
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            return v.path
    return None


def check_finite(model) -> None:
    """Raises NonFiniteState naming the first model or optimizer variable that is not finite."""
    bad = nonfinite_variable([*model.weights, *model.optimizer.variables])
    if bad is not None:
        raise NonFiniteState(f"{bad} is not finite")


class _Named(io.BytesIO):
    """An in-memory file whose name ends as Keras's save_weights requires; Keras's weights store takes a BytesIO."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def __str__(self) -> str:
        return self.name


def write_weights(model, path: str) -> None:
    """model.save_weights(path) (a `.weights.h5` file), built in memory first."""
    buffer = _Named(path)
    model.save_weights(buffer)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())

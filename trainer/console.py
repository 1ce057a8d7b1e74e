"""What rank 0 shows a person: the epoch line and the progress bar text. Pure and TensorFlow-free.

The launcher (launch.console) imports PROGRESS_ENV from here: under horovodrun
a worker's stdout is a pipe, so only the launcher knows whether a person
watches a terminal, and it says so through this variable.
"""

from collections.abc import Mapping

# Set to "1" by the launcher when its own stdout is a terminal: rank 0 then draws a progress bar.
PROGRESS_ENV = "HVD_KERAS_PROGRESS_BAR"


def progress_wanted(environ: Mapping[str, str], stdout_isatty: bool) -> bool:
    """A progress bar when a terminal shows this process's output, directly or through the launcher."""
    return stdout_isatty or environ.get(PROGRESS_ENV) == "1"


def format_epoch_line(epoch: int, epochs: int, logs: Mapping[str, float], evaluated: str = "") -> str:
    """One line per epoch, e.g. `epoch 3/25  loss 0.4123  accuracy 0.8812  val_accuracy 0.9444  1234 img/s  1.8 s`.

    `epoch` counts from 1. Validation figures appear only for validated epochs,
    followed by `(EMA weights)` when `evaluated` is "EMA weights" (train.ema).
    A diverged loss shows as `loss nan` or `loss inf`: never left out.
    """
    parts = [f"epoch {epoch}/{epochs}"]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        if key in logs:
            parts.append(f"{key} {float(logs[key]):.4f}")
    if evaluated and ("val_loss" in logs or "val_accuracy" in logs):
        parts.append(f"({evaluated})")
    skipped = sum(int(logs.get(k, 0)) for k in ("skipped_records", "val_skipped_records"))
    if skipped:
        parts.append(f"{skipped} records skipped")
    if "images_per_sec" in logs:
        parts.append(f"{float(logs['images_per_sec']):.0f} img/s")
    if "epoch_time_sec" in logs:
        parts.append(f"{float(logs['epoch_time_sec']):.1f} s")
    return "  ".join(parts)


def format_progress(epoch: int, epochs: int, step: int, steps: int, loss: float | None, width: int = 30) -> str:
    """The text of a progress bar, e.g. `epoch 3/25 [=========>          ] 12/22  loss 0.4123`."""
    done = min(width, width * step // steps) if steps else 0
    bar = "=" * done + (">" if done < width else "") + " " * max(0, width - done - 1)
    text = f"epoch {epoch}/{epochs} [{bar}] {step}/{steps}"
    if loss is not None:
        text += f"  loss {loss:.4f}"
    return text

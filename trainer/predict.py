"""Classifies image files with an exported model (trainer.export), with TensorFlow alone.

    python -m trainer.predict --model RUN_DIR/export IMAGES_OR_FOLDERS... [--top-k 3]
        [--batch-size 64] [--output predictions.csv | predictions.jsonl]

Folders are read recursively; hidden files and folders, and files whose
extension is not .jpg, .jpeg, .png, .gif or .bmp, are skipped. Files are read
and decoded by tf.data, several at once, a few batches ahead at most, with the
export's own `preprocess` (the function its serving_default signature maps over
its input), and batched into its `serving_images` signature: the answers are
the ones a TensorFlow Serving deployment of the same export gives. A file that
cannot be read or decoded (not an image, truncated) is reported on stderr with
serving_default's message, counted and skipped, and so is one whose name is not
UTF-8; the others are written, one row per image: the
path and the top-k class names with their probabilities, to --output (CSV, or
JSON lines for a .jsonl name) or to stdout as CSV. A summary line on stderr
gives the counts. A progress bar shows on stderr when it is a terminal.

Nothing of the training stack is imported (no Horovod, no Keras model code).

Exit codes: 0 done (bad files skipped and counted); 2 bad arguments, a missing,
unreadable or damaged model, or no image files (one line); 1 anything else, or
no file predicted.
"""

import argparse
import csv
import json
import logging
import os
import re
import sys

import numpy as np
import tensorflow as tf

from trainer import exit_after_collecting

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
SIGNATURE = "serving_default"
IMAGES_SIGNATURE = "serving_images"
NOT_AN_IMAGE = "not a JPEG, PNG, GIF or BMP image"
MAX_BATCH = 2**31 - 1  # plenty; tf.data refused more than an int64 with a ValueError traceback

log = logging.getLogger("trainer.predict")


class UsageError(Exception):
    """Bad arguments, model or inputs: one line on stderr, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """A bad argument is one line, exit 2, as in the other entry points (data_pipeline.arguments, which a
    served model's predictor does not import)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv):
    parser = ArgumentParser(prog="python -m trainer.predict", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="an export folder (RUN_DIR/export)")
    parser.add_argument("inputs", nargs="+", metavar="IMAGES_OR_FOLDERS", help="image files and folders")
    parser.add_argument("--top-k", type=int, default=3, help="classes per image (default 3)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per call of the model (default 64)")
    parser.add_argument("--output", default="", help="predictions.csv or predictions.jsonl (default: CSV on stdout)")
    return parser.parse_args(argv)


def list_images(inputs: list[str]) -> tuple[list[str], list[str], int]:
    """(image files in a stable order, image files whose name is not UTF-8, number of other files skipped).

    A missing input is a UsageError. A name that is not UTF-8 (Linux file
    names are bytes; Python holds the bad bytes as surrogates) could not be
    written to the output, nor handed to TensorFlow as a string: it is
    counted as a bad file.
    """
    found, unnamed, skipped = [], [], 0
    for given in inputs:
        if os.path.isfile(given):
            candidates = [given]
        elif os.path.isdir(given):
            candidates = []
            for root, dirs, files in os.walk(given):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                candidates += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".")]
        else:
            raise UsageError(f"{given!r}: no such file or folder")
        for path in candidates:
            if not path.lower().endswith(IMAGE_EXTENSIONS):
                skipped += 1
            elif is_utf8(path):
                found.append(path)
            else:
                unnamed.append(path)
    return found, unnamed, skipped


def is_utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def escaped(path: str) -> str:
    """A file name with its bytes that are not UTF-8 as \\xNN, for one line of text."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def load_model(path: str, top_k: int):
    """(the loaded export, class names); a UsageError if it is missing, unreadable, damaged or too small for top_k."""
    if os.path.isdir(path) and not os.access(path, os.R_OK | os.X_OK):
        raise UsageError(f"--model {path!r}: permission denied")
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise UsageError(f"--model {path!r}: no SavedModel there (expected RUN_DIR/export)")
    try:
        loaded = tf.saved_model.load(path)
    # What tf.saved_model.load raised for exports damaged file by file (bytes changed, cut short, removed)
    # or unreadable: the model cannot be used, whichever part failed.
    except (OSError, RuntimeError, ValueError, IndexError, KeyError, tf.errors.OpError) as e:
        raise UsageError(f"--model {path!r}: cannot be loaded: {_reason(e)}") from None
    if {SIGNATURE, IMAGES_SIGNATURE} - set(loaded.signatures) or not hasattr(loaded, "preprocess") \
            or not hasattr(loaded, "metadata"):
        raise UsageError(f"--model {path!r}: not a serving export of this trainer (no {SIGNATURE} over image bytes)")
    try:
        names = json.loads(loaded.metadata().numpy())["class_names"]
    except (ValueError, KeyError, TypeError, tf.errors.OpError):
        names = None
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise UsageError(f"--model {path!r}: its metadata() holds no list of class names")
    if not 1 <= top_k <= len(names):
        raise UsageError(f"--top-k {top_k}: must be between 1 and the model's {len(names)} classes")
    return loaded, names


def image_batches(preprocess, paths: list[str], batch_size: int) -> tf.data.Dataset:
    """(paths, model inputs) batches, files read and decoded in parallel, a few batches ahead at most.

    `preprocess` is the export's own (the one serving_default maps over its
    input). A file that cannot be read or decoded is left out; its path is
    then missing from the stream, which is how the caller finds it.
    """
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(paths, tf.string))  # typed: the list may be empty
    ds = ds.map(lambda p: (p, preprocess(tf.io.read_file(p))), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
    return ds.ignore_errors().batch(batch_size).prefetch(2)


def top_k_rows(probabilities: np.ndarray, names: list[str], k: int) -> list[list[tuple[str, float]]]:
    """Per image, the k most probable (name, probability), ties to the lower index as tf.math.top_k."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [[(names[i], float(p[i])) for i in row] for p, row in zip(probabilities, order)]


def why_bad(signature, path: str) -> str:
    """What the bytes signature (as a server would) says about a file the pipeline left out."""
    try:
        with open(path, "rb") as f:
            signature(image_bytes=tf.constant([f.read()]))
    except OSError as e:
        return e.strerror or str(e)
    except tf.errors.InvalidArgumentError as e:
        return _reason(e)
    return "could not be decoded"


def _reason(error: Exception) -> str:
    """The first line of a TensorFlow error, without its graph node noise."""
    text = getattr(error, "message", str(error))
    if NOT_AN_IMAGE in text:  # the export's own check (trainer.export)
        return NOT_AN_IMAGE
    lines = [ln.strip() for ln in text.splitlines()
             if ln.strip() and not ln.strip().startswith(("[[", "Detected", "<stack", "Graph"))]
    # Errors raised inside a function call start with the name of the graph node: noise here.
    line = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", lines[0]) if lines else ""
    return line or type(error).__name__


class RowWriter:
    """CSV (path, name_1, probability_1, ...) or JSON lines ({"path", "top_k": [{"name", "probability"}]})."""

    def __init__(self, stream, jsonl: bool, k: int):
        self.stream, self.jsonl = stream, jsonl
        if not jsonl:
            self.csv = csv.writer(stream)
            self.csv.writerow(["path"] + [f"{c}_{i}" for i in range(1, k + 1) for c in ("class", "probability")])

    def write(self, path: str, top: list[tuple[str, float]]) -> None:
        if self.jsonl:
            self.stream.write(json.dumps({"path": path, "top_k": [{"name": n, "probability": p} for n, p in top]})
                              + "\n")
        else:
            self.csv.writerow([path] + [v for n, p in top for v in (n, f"{p:.6f}")])


def run(args, progress) -> dict:
    """Predicts every image of args.inputs into args.output (or stdout); returns the counts."""
    paths, unnamed, not_images = list_images(args.inputs)
    if not paths and not unnamed:
        raise UsageError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {' '.join(map(escaped, args.inputs))}")
    loaded, names = load_model(args.model, args.top_k)
    if not args.output:
        return _predict_all(args, loaded, names, (paths, unnamed, not_images), sys.stdout, progress)
    try:
        out = open(args.output, "w", newline="", encoding="utf-8")
    except OSError as e:
        raise UsageError(f"--output {args.output!r}: cannot be written: {e.strerror or e}") from None
    with out:
        return _predict_all(args, loaded, names, (paths, unnamed, not_images), out, progress)


def _predict_all(args, loaded, names, listed, out, progress) -> dict:
    paths, unnamed, not_images = listed
    by_images = loaded.signatures[IMAGES_SIGNATURE]
    writer = RowWriter(out, args.output.endswith(".jsonl"), args.top_k)
    counts = {"images": len(paths) + len(unnamed), "predicted": 0, "bad": len(unnamed),
              "skipped_not_images": not_images}
    for path in unnamed:
        print(f"bad image {escaped(path)}: its file name is not valid UTF-8", file=sys.stderr)
    expected = iter(paths)  # the stream keeps this order, less the bad files

    def bad(path):
        counts["bad"] += 1
        print(f"bad image {path}: {why_bad(loaded.signatures[SIGNATURE], path)}", file=sys.stderr)

    for batch_paths, images in image_batches(loaded.preprocess, paths, args.batch_size):
        batch_paths = [p.decode() for p in batch_paths.numpy()]
        rows = top_k_rows(by_images(images=images)["probabilities"].numpy(), names, args.top_k)
        for path, top in zip(batch_paths, rows):
            for missing in iter(lambda: next(expected), path):
                bad(missing)
            writer.write(path, top)
        counts["predicted"] += len(batch_paths)
        progress(counts["predicted"] + counts["bad"], counts["images"])
    for missing in expected:
        bad(missing)
    progress(counts["images"], counts["images"])
    return counts


def _progress_bar(enabled: bool):
    def show(done: int, total: int) -> None:
        if enabled:
            filled = 30 * done // total
            end = "\n" if done == total else ""
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total}{end}")
            sys.stderr.flush()
    return show


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if not 1 <= args.batch_size <= MAX_BATCH:
            raise UsageError(f"--batch-size {args.batch_size}: must be in 1..{MAX_BATCH}")
        if args.output and not args.output.endswith((".csv", ".jsonl")):
            raise UsageError(f"--output {args.output!r}: name a .csv or a .jsonl file")
        if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
            raise UsageError(f"--output {args.output!r}: its folder does not exist")
        counts = run(args, _progress_bar(sys.stderr.isatty()))
    except UsageError as e:
        print(f"predict: error: {e}", file=sys.stderr)
        return 2
    print("predict: {images} image files: {predicted} predicted, {bad} bad (skipped); "
          "{skipped_not_images} other files skipped".format(**counts), file=sys.stderr)
    return 0 if counts["predicted"] else 1


if __name__ == "__main__":
    exit_after_collecting(main())

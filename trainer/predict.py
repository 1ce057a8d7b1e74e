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
serving_default's message, counted and skipped; the others are written, one row per image: the
path and the top-k class names with their probabilities, to --output (CSV, or
JSON lines for a .jsonl name) or to stdout as CSV. A summary line on stderr
gives the counts. A progress bar shows on stderr when it is a terminal.

Nothing of the training stack is imported (no Horovod, no Keras model code).

Exit codes: 0 done (bad files skipped and counted); 2 bad arguments, a missing
or unreadable model, or no image files; 1 anything else, or no file predicted.
"""

import argparse
import csv
import json
import logging
import os
import sys

import numpy as np
import tensorflow as tf

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
SIGNATURE = "serving_default"
IMAGES_SIGNATURE = "serving_images"
NOT_AN_IMAGE = "not a JPEG, PNG, GIF or BMP image"

log = logging.getLogger("trainer.predict")


class UsageError(Exception):
    """Bad arguments, model or inputs: one line on stderr, exit code 2."""


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m trainer.predict", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="an export folder (RUN_DIR/export)")
    parser.add_argument("inputs", nargs="+", metavar="IMAGES_OR_FOLDERS", help="image files and folders")
    parser.add_argument("--top-k", type=int, default=3, help="classes per image (default 3)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per call of the model (default 64)")
    parser.add_argument("--output", default="", help="predictions.csv or predictions.jsonl (default: CSV on stdout)")
    return parser.parse_args(argv)


def list_images(inputs: list[str]) -> tuple[list[str], int]:
    """(image files in a stable order, number of other files skipped); a missing input is a UsageError."""
    found, skipped = [], 0
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
            if path.lower().endswith(IMAGE_EXTENSIONS):
                found.append(path)
            else:
                skipped += 1
    return found, skipped


def load_model(path: str, top_k: int):
    """(the bytes signature, class names) of an export; a UsageError if it is missing or too small for top_k."""
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise UsageError(f"--model {path!r}: no SavedModel there (expected RUN_DIR/export)")
    loaded = tf.saved_model.load(path)
    if {SIGNATURE, IMAGES_SIGNATURE} - set(loaded.signatures) or not hasattr(loaded, "preprocess"):
        raise UsageError(f"--model {path!r}: not a serving export of this trainer (no {SIGNATURE} over image bytes)")
    names = json.loads(loaded.metadata().numpy())["class_names"]
    if not 1 <= top_k <= len(names):
        raise UsageError(f"--top-k {top_k}: must be between 1 and the model's {len(names)} classes")
    return loaded, names


def image_batches(preprocess, paths: list[str], batch_size: int) -> tf.data.Dataset:
    """(paths, model inputs) batches, files read and decoded in parallel, a few batches ahead at most.

    `preprocess` is the export's own (the one serving_default maps over its
    input). A file that cannot be read or decoded is left out; its path is
    then missing from the stream, which is how the caller finds it.
    """
    ds = tf.data.Dataset.from_tensor_slices(paths)
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
    return lines[0] if lines else type(error).__name__


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
    paths, not_images = list_images(args.inputs)
    if not paths:
        raise UsageError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {' '.join(args.inputs)}")
    loaded, names = load_model(args.model, args.top_k)
    if not args.output:
        return _predict_all(args, loaded, names, paths, not_images, sys.stdout, progress)
    with open(args.output, "w", newline="", encoding="utf-8") as out:
        return _predict_all(args, loaded, names, paths, not_images, out, progress)


def _predict_all(args, loaded, names, paths, not_images, out, progress) -> dict:
    by_images = loaded.signatures[IMAGES_SIGNATURE]
    writer = RowWriter(out, args.output.endswith(".jsonl"), args.top_k)
    counts = {"images": len(paths), "predicted": 0, "bad": 0, "skipped_not_images": not_images}
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
        progress(counts["predicted"] + counts["bad"], len(paths))
    for missing in expected:
        bad(missing)
    progress(len(paths), len(paths))
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
        if args.batch_size < 1:
            raise UsageError(f"--batch-size {args.batch_size}: must be >= 1")
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
    sys.exit(main())

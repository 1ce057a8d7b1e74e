"""Finds the images to convert: a class-per-subfolder tree, a train/validation
layout of two such trees, or a CSV of `path,label`, always in a fixed order."""

import csv
import logging
import os
from dataclasses import dataclass, field

import numpy as np

from data_pipeline.images import EXTENSIONS
from data_pipeline.metadata import DataError

log = logging.getLogger(__name__)

# Folder names that mark an existing split instead of a class.
LAYOUT_SPLITS = {"train": "train", "validation": "validation", "val": "validation"}


@dataclass(frozen=True, slots=True)  # slots: millions of these are held while planning
class Source:
    path: str
    example_id: str  # path relative to the input root: stable across machines
    label: int
    size: int  # bytes and mtime identify the file's version when resuming
    mtime_ns: int


@dataclass
class Inventory:
    """What a scan found.

    Attributes:
      class_names: label i is class_names[i].
      splits: split name to its sources; only "train" unless the input has
        its own split (layout) or the caller splits later.
      ignored: counts of files passed over, by reason ("hidden", "not_image").
      empty_classes: class names with no image file.
    """

    class_names: list[str]
    splits: dict[str, list[Source]]
    ignored: dict[str, int] = field(default_factory=lambda: {"hidden": 0, "not_image": 0})
    empty_classes: list[str] = field(default_factory=list)


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in EXTENSIONS


def _walk_class(class_dir: str, root: str, ignored: dict[str, int]) -> list[tuple[str, str, os.stat_result]]:
    """(path, id, stat) of every image file under class_dir, nested folders included, sorted by id.

    Linked folders are followed, but not a link back to a folder on the way
    down from `root` (a loop): that would scan forever, or until the path is too long.
    """
    found = []
    above, path = {os.path.realpath(root)}, root
    for part in os.path.relpath(class_dir, root).split(os.sep):
        path = os.path.join(path, part)
        above.add(os.path.realpath(path))
    stack = [(class_dir, frozenset(above))]
    while stack:
        folder, ancestors = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    ignored["hidden"] += 1
                elif entry.is_dir():
                    real = os.path.realpath(entry.path)
                    if real in ancestors:
                        log.warning("skipped %s: it links back to %s, which holds it", entry.path, real)
                    else:
                        stack.append((entry.path, ancestors | {real}))
                elif not _is_image(entry.name):
                    ignored["not_image"] += 1
                else:
                    found.append((entry.path, os.path.relpath(entry.path, root), entry.stat()))
    return sorted(found, key=lambda f: f[1])


def _class_dirs(folder: str) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _check_classes(inv: Inventory, keep_empty: bool) -> Inventory:
    """Drops (or keeps, with a warning) classes without images and renumbers the labels."""
    counts = {i: 0 for i in range(len(inv.class_names))}
    for items in inv.splits.values():
        for s in items:
            counts[s.label] += 1
    empty = [inv.class_names[i] for i, n in counts.items() if n == 0]
    for name in empty:
        log.warning("class %r has no images%s", name, "; kept (--keep-empty-classes)" if keep_empty else "; left out")
    inv.empty_classes = empty
    if keep_empty or not empty:
        return inv
    kept = [n for n in inv.class_names if n not in empty]
    new = {inv.class_names.index(n): i for i, n in enumerate(kept)}
    inv.class_names = kept
    inv.splits = {
        k: [Source(s.path, s.example_id, new[s.label], s.size, s.mtime_ns) for s in v] for k, v in inv.splits.items()
    }
    return inv


def scan_folder(images_dir: str, keep_empty: bool = False) -> Inventory:
    """A class-per-subfolder tree, or `train/` and `validation/` (or `val/`) trees of classes."""
    if not os.path.isdir(images_dir):
        raise DataError(f"image folder {images_dir!r} does not exist")
    top = _class_dirs(images_dir)
    layout = bool(top) and all(d in LAYOUT_SPLITS for d in top) and "train" in top
    roots = {LAYOUT_SPLITS[d]: os.path.join(images_dir, d) for d in top} if layout else {"train": images_dir}
    class_names = sorted({c for r in roots.values() for c in _class_dirs(r)})
    if not class_names:
        raise DataError(f"image folder {images_dir!r} has no class subfolders")
    inv = Inventory(class_names, {})
    for split, root in roots.items():
        items = []
        for label, name in enumerate(class_names):
            if os.path.isdir(os.path.join(root, name)):
                for path, rel, st in _walk_class(os.path.join(root, name), images_dir, inv.ignored):
                    items.append(Source(path, rel, label, st.st_size, st.st_mtime_ns))
        inv.splits[split] = items
    if layout:
        log.info("found an existing split: %s", ", ".join(f"{k}/ ({len(v)} images)" for k, v in inv.splits.items()))
    return _check_classes(inv, keep_empty)


def _label_order(labels: set[str]) -> list[str]:
    # Integer labels (0, 1, ..., 10) keep their numeric order; names sort as text.
    # ASCII digits only: '²' passes isdigit() but not int().
    if all(x.isascii() and x.isdigit() for x in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def scan_csv(csv_path: str) -> Inventory:
    """A CSV of `path,label` rows (a header row is allowed); relative paths are
    taken from the CSV's folder. Rows whose file is missing stay in the list and
    are reported as broken when converted."""
    if not os.path.isfile(csv_path):
        raise DataError(f"CSV file {csv_path!r} does not exist")
    base = os.path.dirname(os.path.abspath(csv_path))
    rows: dict[str, str] = {}
    ignored = {"hidden": 0, "not_image": 0}
    with open(csv_path, newline="", encoding="utf-8") as f:
        try:
            for n, row in enumerate(csv.reader(f), start=1):
                if not row or (n == 1 and [c.strip().lower() for c in row[:2]] == ["path", "label"]):
                    continue
                if len(row) != 2 or not row[0].strip() or not row[1].strip():
                    raise DataError(f"{csv_path!r} line {n}: expected 'path,label', got {','.join(row)!r}")
                rel, label = row[0].strip(), row[1].strip()
                if os.path.basename(rel).startswith("."):
                    ignored["hidden"] += 1
                elif not _is_image(rel):
                    ignored["not_image"] += 1
                elif rows.setdefault(rel, label) != label:
                    raise DataError(
                        f"{csv_path!r} line {n}: {rel!r} is listed with labels {rows[rel]!r} and {label!r}")
        except UnicodeDecodeError as e:
            # Decoded in blocks ahead of the rows: the byte, not a line number, is what is known.
            raise DataError(f"CSV file {csv_path!r}: not UTF-8 (byte {e.object[e.start]:#04x}); "
                            "save it as UTF-8") from None
    if not rows:
        raise DataError(f"CSV file {csv_path!r} lists no image files")
    class_names = _label_order(set(rows.values()))
    index = {name: i for i, name in enumerate(class_names)}
    items = []
    for rel, label in sorted(rows.items()):
        path = os.path.normpath(os.path.join(base, rel))
        try:
            st = os.stat(path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, 0
        items.append(Source(path, os.path.normpath(rel), index[label], size, mtime))
    return Inventory(class_names, {"train": items}, ignored)


def stratified_split(sources: list[Source], val_fraction: float, seed: int) -> tuple[list[Source], list[Source]]:
    """Puts round(n * val_fraction) images of each class into validation, chosen by `seed`."""
    by_class: dict[int, list[Source]] = {}
    for s in sources:
        by_class.setdefault(s.label, []).append(s)
    train, val = [], []
    for label in sorted(by_class):
        items = by_class[label]
        order = np.random.default_rng([seed, label]).permutation(len(items))
        n_val = int(round(len(items) * val_fraction))
        if val_fraction > 0 and len(items) >= 2:
            n_val = min(max(n_val, 1), len(items) - 1)  # every class on both sides of the split
        val.extend(items[i] for i in order[:n_val])
        train.extend(items[i] for i in order[n_val:])
    return train, val

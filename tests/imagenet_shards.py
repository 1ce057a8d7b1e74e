"""Small shards in the layout of the TPU / Model Garden ImageNet converter (imagenet_to_gcs.py), written by TensorFlow.

Each record is the tf.train.Example that converter builds: the JPEG's bytes
as stored, its height and width, `RGB`, 3 channels, the label counted from 1
in sorted-synset order, the synset, `JPEG` and the file's base name; plus
`image/class/text`, which the Inception converter (build_imagenet_data.py)
writes as well. Files are named `train-00000-of-00002`, without extension.
"""

from pathlib import Path

import numpy as np

# Three real ImageNet synsets, in the converter's (sorted) label order: labels 1, 2, 3.
SYNSETS = ("n01440764", "n01443537", "n01484850")
TEXTS = ("tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark, white shark")
COLOURS = ((200, 30, 30), (30, 180, 40), (40, 60, 210))


def jpeg(label: int, rng: np.random.Generator, height: int, width: int) -> bytes:
    """A noisy solid colour per class, with a darker square at a random place: easy to tell apart, not trivial."""
    import tensorflow as tf

    pixels = np.clip(np.array(COLOURS[label - 1]) + rng.normal(0, 20, (height, width, 3)), 0, 255)
    top, left = rng.integers(0, height - 6), rng.integers(0, width - 6)
    pixels[top:top + 6, left:left + 6] *= 0.5
    return tf.io.encode_jpeg(pixels.astype(np.uint8), format="rgb", quality=90).numpy()


def example(encoded: bytes, label: int, filename: str) -> bytes:
    """The converter's _convert_to_example (with the Inception converter's image/class/text)."""
    import tensorflow as tf

    height, width, _ = tf.image.extract_jpeg_shape(encoded).numpy()

    def ints(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v)]))

    def strings(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    return tf.train.Example(features=tf.train.Features(feature={
        "image/height": ints(height), "image/width": ints(width), "image/colorspace": strings(b"RGB"),
        "image/channels": ints(3), "image/class/label": ints(label),
        "image/class/synset": strings(SYNSETS[label - 1].encode()),
        "image/class/text": strings(TEXTS[label - 1].encode()), "image/format": strings(b"JPEG"),
        "image/filename": strings(filename.encode()), "image/encoded": strings(encoded),
    })).SerializeToString()


def write_shards(folder: Path, train_per_class: int = 16, val_per_class: int = 6, train_shards: int = 2,
                 seed: int = 0) -> dict[str, list[tuple[bytes, int]]]:
    """Writes train-0000i-of-0000N and validation-00000-of-00001; returns each split's (JPEG, label) in file order."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, per_class, num_shards in (("train", train_per_class, train_shards), ("validation", val_per_class, 1)):
        labels = [label for label in (1, 2, 3) for _ in range(per_class)]
        rng.shuffle(labels)  # the converter shuffles the training files; its validation files are in name order
        # ImageNet's images differ in size: two sizes here, so metadata.json has no image_shape.
        items = [(jpeg(label, rng, *((20, 24) if i % 2 else (24, 20))), label) for i, label in enumerate(labels)]
        chunk = -(-len(items) // num_shards)
        for shard in range(num_shards):
            with tf.io.TFRecordWriter(str(folder / f"{split}-{shard:05d}-of-{num_shards:05d}")) as writer:
                for i, (encoded, label) in enumerate(items[shard * chunk:(shard + 1) * chunk], shard * chunk):
                    name = f"{SYNSETS[label - 1]}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{i + 1:08d}.JPEG"
                    writer.write(example(encoded, label, name))
        written[split] = items
    return written


def write_synsets(path: Path, synsets=SYNSETS) -> Path:
    path.write_text("".join(f"{s}\n" for s in synsets))
    return path

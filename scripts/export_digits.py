"""Writes scikit-learn's bundled handwritten digits as an ordinary image folder.

    python scripts/export_digits.py OUT_DIR

1,797 real 8x8 grayscale images, one PNG each, in OUT_DIR/<digit>/. The folder
is then converted by the same build_shards that users run on their own data.
"""

import os
import sys

import numpy as np

from data_pipeline import atomic


def export(out_dir: str) -> int:
    # Pillow, not TensorFlow: the same lossless PNGs, and a start without TensorFlow's banners.
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    with atomic.staged_dir(out_dir, mode=0o755) as tmp:
        for i, (image, label) in enumerate(zip(digits.images, digits.target)):
            # Pixel values are 0..16; stretch them to 0..255.
            pixels = np.round(image * (255.0 / 16.0)).astype(np.uint8)
            class_dir = os.path.join(tmp, str(label))
            os.makedirs(class_dir, exist_ok=True)
            Image.fromarray(pixels).save(os.path.join(class_dir, f"digit-{i:04d}.png"))
    return len(digits.images)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python scripts/export_digits.py OUT_DIR", file=sys.stderr)
        return 2
    if os.path.exists(argv[0]):
        print(f"export_digits: error: {argv[0]!r} already exists", file=sys.stderr)
        return 2
    print(f"wrote {export(argv[0])} digit images to {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fixtures shared by the tests; shared plain helpers live in helpers.py."""

import sys
from pathlib import Path

import pytest

# The worktree first: tests import the project and scripts/ from this checkout, not an installed copy.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


@pytest.fixture(scope="session")
def digits_images(tmp_path_factory) -> Path:
    """scikit-learn's digits as a PNG folder, written by the same script `make run` uses."""
    import export_digits

    out = tmp_path_factory.mktemp("digits") / "images"
    export_digits.export(str(out))
    return out


@pytest.fixture(scope="session")
def digits_shards(digits_images, tmp_path_factory) -> Path:
    from data_pipeline.build_shards import build
    from data_pipeline.images import ImageOptions

    out = tmp_path_factory.mktemp("digits-shards") / "shards"
    # Grayscale records, as `make run` builds them (scripts/run_digits.py).
    build(str(digits_images), str(out), num_shards=4, val_fraction=0.2, seed=0, image_options=ImageOptions(channels=1))
    return out

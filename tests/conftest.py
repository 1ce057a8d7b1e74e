import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def run(argv, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    """Runs a command from the repository root and captures its output as text."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2", **kwargs.pop("env", {})}
    return subprocess.run(
        [str(a) for a in argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kwargs
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` now (a server started next may take it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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

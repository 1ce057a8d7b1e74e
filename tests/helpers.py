"""Helpers the tests share: the repository root, running a command from it, a free port.

Kept apart from conftest.py, which pytest loads by itself and which holds only
fixtures: a test module imports these names explicitly (`from helpers import run`).
"""

import os
import socket
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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

"""The main job (`make run`): digits image folder -> shards -> 2-rank training -> summary.

    python scripts/run_digits.py [launcher options, e.g. --set train.epochs=5]

The image folder and the shards are built on the first run and reused after
that. A finished run is not trained again: the trainer says so and shows its
summary.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = os.path.join("data", "digits", "images")
SHARDS = os.path.join("data", "digits", "shards")


def step(argv: list[str]) -> None:
    print("+ " + " ".join(argv[1:] if argv[0] == sys.executable else argv), flush=True)
    code = subprocess.call(argv)
    if code:
        sys.exit(code)


def main(extra: list[str]) -> int:
    os.chdir(ROOT)
    if not os.path.isdir(IMAGES):
        step([sys.executable, "scripts/export_digits.py", IMAGES])
    if not os.path.isfile(os.path.join(SHARDS, "metadata.json")):
        step([sys.executable, "-m", "data_pipeline.build_shards", "--images", IMAGES, "--out", SHARDS,
              "--num-shards", "8", "--val-fraction", "0.2", "--seed", "0", "--channels", "1"])
    return subprocess.call([sys.executable, "-m", "launch", "--np", "2", "--config", "configs/digits.yaml", *extra])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

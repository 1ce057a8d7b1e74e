"""Prints requirement lines from setup.cfg, the one list of this project's dependencies.

    python3 scripts/requirements.py install cpu test     # install_requires, then the named extras
    python3 scripts/requirements.py --without horovod --without mpi4py install cpu
    python3 scripts/requirements.py --only mpi4py install

`install` stands for [options] install_requires, any other word for that extra.
scripts/setup.sh installs from these lists in the order the builds need (see
there); the GPU set-up in docs/clusters.md uses them too. Standard library
only: it runs before the venv holds anything.
"""

import argparse
import configparser
import re
from pathlib import Path

SETUP_CFG = Path(__file__).resolve().parents[1] / "setup.cfg"


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement line (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group(0)).lower()


def requirements(groups: list[str], setup_cfg: Path = SETUP_CFG) -> list[str]:
    """The requirement lines of `groups` in order, each once."""
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(setup_cfg, encoding="utf-8")
    out = []
    for group in groups:
        text = cfg["options"]["install_requires"] if group == "install" else cfg["options.extras_require"][group]
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line and line not in out:
                out.append(line)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="+", help="`install` or the name of an extra")
    parser.add_argument("--without", action="append", default=[], help="leave out this distribution")
    parser.add_argument("--only", action="append", default=[], help="keep only this distribution")
    args = parser.parse_args(argv)
    without = {_name(n) for n in args.without}
    only = {_name(n) for n in args.only}
    for line in requirements(args.groups):
        if _name(line) not in without and (not only or _name(line) in only):
            print(line)


if __name__ == "__main__":
    main()

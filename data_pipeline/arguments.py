"""The command-line parser of every entry point: a bad argument is one line, exit 2, as any other bad input."""

import argparse


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser without the usage block before its error line (`--help` still shows it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

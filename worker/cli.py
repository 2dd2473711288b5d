"""The ``purge-worker`` command line (filled in by the pipeline)."""

from __future__ import annotations

import argparse

from worker import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="purge-worker")
    parser.add_argument("--version", action="version", version=__version__)
    parser.parse_args(argv)
    return 0

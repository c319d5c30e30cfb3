"""`latentpi collect` (not implemented yet)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser


def run(args: argparse.Namespace) -> int:
    del args
    print("latentpi collect: not implemented yet in this version", file=sys.stderr)
    return 2

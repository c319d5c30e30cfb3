"""The `latentpi` command: one entry point, subcommands provided by whichever side is installed.

The protocol distribution owns this dispatcher so that a machine with only the server or only the
client still has the command; each subcommand lives in its side's `cli` module and, when that side
is not installed, says so instead of failing with an import error.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    module: str  # module with `add_arguments(parser)` and `run(args) -> int`
    distribution: str


SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand(
        "serve",
        "run the GPU policy server (websocket + HTTP)",
        "latentpi.server.cli.serve",
        "latentpi-server",
    ),
    Subcommand(
        "parity",
        "check the model against openpi reference files",
        "latentpi.server.cli.parity",
        "latentpi-server",
    ),
    Subcommand(
        "units",
        "the tokens each FFN unit of a layer promotes (value-vector lens)",
        "latentpi.server.cli.units",
        "latentpi-server",
    ),
    Subcommand(
        "collect",
        "run LIBERO rollouts and record latents to HDF5",
        "latentpi.client.cli.collect",
        "latentpi-client",
    ),
    Subcommand(
        "analyze",
        "analyze collected HDF5 files and write a report",
        "latentpi.client.cli.analyze",
        "latentpi-client",
    ),
    Subcommand(
        "demo",
        "tiny server + short LIBERO collection + report, end to end",
        "latentpi.client.cli.demo",
        "latentpi-client",
    ),
)


def _load(sub: Subcommand) -> object | None:
    """The subcommand's module, or None when its side is not installed (import errors inside an
    installed side surface as they are)."""
    side = ".".join(sub.module.split(".")[:2])
    try:
        if importlib.util.find_spec(side) is None:
            return None
    except ModuleNotFoundError:
        return None
    return importlib.import_module(sub.module)


def build_parser() -> tuple[
    argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], int]]
]:
    parser = argparse.ArgumentParser(
        prog="latentpi", description="latent collection for pi0-family policies on LIBERO"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    runners: dict[str, Callable[[argparse.Namespace], int]] = {}
    for sub in SUBCOMMANDS:
        sub_parser = subparsers.add_parser(sub.name, help=sub.help, description=sub.help)
        module = _load(sub)
        if module is None:
            runners[sub.name] = _not_installed(sub)
            continue
        module.add_arguments(sub_parser)  # type: ignore[attr-defined]
        runners[sub.name] = module.run  # type: ignore[attr-defined]
    return parser, runners


def _not_installed(sub: Subcommand) -> Callable[[argparse.Namespace], int]:
    def run(_: argparse.Namespace) -> int:
        print(
            f"latentpi {sub.name}: not available in this installation "
            f"(install the {sub.distribution} distribution: pip install {sub.distribution})",
            file=sys.stderr,
        )
        return 2

    run.not_installed = True  # type: ignore[attr-defined]
    return run


def main(argv: Sequence[str] | None = None) -> None:
    parser, runners = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        sys.exit(2)
    installed = not getattr(runners[args.command], "not_installed", False)
    if extra and installed:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    sys.exit(runners[args.command](args))

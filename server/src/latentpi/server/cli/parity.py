"""`latentpi parity FILE.npz...`: our model against openpi's numbers; non-zero exit outside tolerance."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "files",
        nargs="+",
        metavar="FILE.npz",
        help="reference files (see the shared reference README)",
    )
    parser.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="load params from this orbax checkpoint (a checkpoint dir or its params/) instead of each file's",
    )


def run(args: argparse.Namespace) -> int:
    from latentpi.protocol.errors import ValidationError
    from latentpi.server.model.capture import CompiledSampler
    from latentpi.server.model.checkpoint import CheckpointError
    from latentpi.server.parity import check_file, read_reference

    failed = 0
    samplers: dict[object, object] = {}  # one compiled sampler per model config
    for path in args.files:
        try:
            config = read_reference(path).config
            sampler = samplers.setdefault(config, CompiledSampler(config))
            report = check_file(path, checkpoint=args.checkpoint, sampler=sampler)
        except (OSError, ValidationError, CheckpointError, ValueError) as error:
            print(f"{path}: cannot check: {error}", file=sys.stderr)
            failed += 1
            continue
        print(report.table())
        failed += not report.ok
    return 1 if failed else 0

"""`latentpi demo`: the whole pipeline on one CPU machine in a few minutes.

An embedded `pi0_tiny` server (random weights, so the robot fails: the demo shows the pipeline, not the policy), a short real
LIBERO collection with every kind of latent (all layers and positions of both experts, every
denoising step, attention mass) in bfloat16, then `latentpi analyze`; prints the report's path.
Running it again resumes: completed episodes are kept and only the report is rebuilt.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Everything the report can show (attention per head: which heads read the prompt), kept small by
# the tiny model: ~1 MB per recorded step.
DEMO_SPEC = {"preset": "full", "attention": "per_head", "dtype": "bfloat16"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder")
    parser.add_argument("--suite", default="libero_spatial", help="LIBERO suite")
    parser.add_argument("--tasks", default="0:2", help="task ids, Python-style A:B")
    parser.add_argument("--trials", type=int, default=2, help="episodes per task")
    parser.add_argument("--max-steps", type=int, default=40, help="policy steps per episode")
    parser.add_argument("--stride", type=int, default=5, help="record latents every STRIDE steps")
    parser.add_argument("--workers", type=int, default=2, help="environment processes")
    parser.add_argument("--config", default="pi0_tiny", choices=("pi0_tiny", "pi05_tiny"))


def run(args: argparse.Namespace) -> int:
    from latentpi.client.analysis.report import build_report
    from latentpi.client.collect import CollectOptions, collect
    from latentpi.client.collect.progress import print_summary
    from latentpi.protocol.errors import ValidationError

    args.out.mkdir(parents=True, exist_ok=True)
    spec_path = args.out / "latent_spec.json"
    spec_path.write_text(json.dumps(DEMO_SPEC))
    options = CollectOptions(
        suite=args.suite,
        out=args.out / "data",
        tasks=args.tasks,
        trials=args.trials,
        max_steps=args.max_steps,
        stride=args.stride,
        config=args.config,
        workers=args.workers,
        latents=str(spec_path),
    )
    start = time.monotonic()
    print(
        f"[demo] collecting: {args.suite} tasks {args.tasks}, {args.trials} trials, {args.max_steps} steps, "
        f"embedded {args.config} server (random weights: expect every episode to fail)"
    )
    try:
        result = collect(options)
    except ValidationError as error:
        print(f"latentpi demo: {error}", file=sys.stderr)
        return 2
    print_summary(result.tasks, sys.stdout)
    print(f"[demo] analyzing ({time.monotonic() - start:.0f} s so far)")
    page = build_report(options.out, args.out / "report")
    print(f"[demo] done in {time.monotonic() - start:.0f} s. Report: {Path(page).resolve()}")
    return 0

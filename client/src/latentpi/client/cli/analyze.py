"""`latentpi analyze DIR --out REPORT`: the HTML report, its figure files, summary.json and
summary.csv of a collection folder (docs/analysis.md §6)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="a collection folder (DIR/<suite>/task_*.h5) or one task file")
    parser.add_argument(
        "--out", required=True, help="folder for index.html, figures, summary.json / .csv"
    )
    parser.add_argument(
        "--expert",
        default="text_only",
        choices=("text_only", "expert_0", "expert_1"),
        help="whose representation the drift and the probes use (default: text_only)",
    )
    parser.add_argument(
        "--shuffles",
        type=int,
        default=200,
        help="shuffled-label repeats per probe (default 200: smallest p = 1/201 < 0.005)",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=100,
        help="episode-resampled repeats of each cross-validation for the 95%% interval",
    )
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from latentpi.client.analysis.probes import ProbeConfig
    from latentpi.client.analysis.report import ReportConfig, build_report
    from latentpi.protocol.errors import ValidationError

    try:
        config = ReportConfig(
            args.expert,
            ProbeConfig(n_shuffles=args.shuffles, n_bootstrap=args.bootstrap, seed=args.seed),
        )
        page = build_report(args.dir, args.out, config)
    except ValidationError as error:
        print(f"latentpi analyze: {error}", file=sys.stderr)
        return 2
    print(page)
    return 0

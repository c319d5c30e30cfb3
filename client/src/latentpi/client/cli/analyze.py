"""`latentpi analyze DIR --out REPORT`: the HTML report, its figure files, summary.json and
summary.csv of a collection folder (docs/analysis.md §6).

`latentpi analyze --compare BASELINE_DIR CONDITION_DIR [CONDITION_DIR ...] --out REPORT`: each
condition's collection against the baseline's, episode by episode (docs/analysis.md, "Comparing
conditions")."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "dir", nargs="?", help="a collection folder (DIR/<suite>/task_*.h5) or one task file"
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="DIR",
        help="compare conditions instead: BASELINE_DIR then one or more CONDITION_DIRs (collected "
        "with the same --seed; episodes pair by suite, task and episode index)",
    )
    parser.add_argument(
        "--out", required=True, help="folder for index.html, figures, summary.json / .csv"
    )
    parser.add_argument(
        "--expert",
        default=None,
        choices=("text_only", "expert_0", "expert_1"),
        help="whose representation the drift and the probes use (default: text_only)",
    )
    parser.add_argument(
        "--shuffles",
        type=int,
        default=None,
        help="shuffled-label repeats per probe (default 200: smallest p = 1/201 < 0.005)",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=None,
        help="episode-resampled repeats of each cross-validation for the 95%% interval",
    )
    parser.add_argument("--seed", type=int, default=None, help="the probes' resampling seed (0)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="with --compare: end-effector distance (metres) beyond which a pair's paths have "
        "diverged (default 0.01)",
    )


def run(args: argparse.Namespace) -> int:
    from latentpi.protocol.errors import ValidationError

    try:
        page = _compare(args) if args.compare is not None else _report(args)
    except ValidationError as error:
        print(f"latentpi analyze: {error}", file=sys.stderr)
        return 2
    print(page)
    return 0


def _report(args: argparse.Namespace) -> object:
    from latentpi.client.analysis.probes import ProbeConfig
    from latentpi.client.analysis.report import ReportConfig, build_report
    from latentpi.protocol.errors import ValidationError

    if args.dir is None:
        raise ValidationError(
            "DIR", "a collection folder, or --compare BASELINE_DIR CONDITION_DIR", None
        )
    if args.tolerance is not None:
        raise ValidationError("--tolerance", "only with --compare", args.tolerance)
    config = ReportConfig(
        args.expert or "text_only",
        ProbeConfig(
            n_shuffles=200 if args.shuffles is None else args.shuffles,
            n_bootstrap=100 if args.bootstrap is None else args.bootstrap,
            seed=args.seed or 0,
        ),
    )
    return build_report(args.dir, args.out, config)


def _compare(args: argparse.Namespace) -> object:
    from latentpi.client.analysis.compare_report import (
        DEFAULT_TOLERANCE,
        CompareConfig,
        build_comparison,
    )
    from latentpi.protocol.errors import ValidationError

    if args.dir is not None:
        raise ValidationError(
            "DIR",
            "no positional folder with --compare (list every folder after --compare)",
            args.dir,
        )
    if len(args.compare) < 2:
        raise ValidationError(
            "--compare", "BASELINE_DIR and at least one CONDITION_DIR", args.compare
        )
    for option in ("expert", "shuffles", "bootstrap", "seed"):
        if getattr(args, option) is not None:  # the report's options: --compare has no probes
            raise ValidationError(f"--{option}", "no value with --compare", getattr(args, option))
    tolerance = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    baseline, *conditions = args.compare
    return build_comparison(baseline, conditions, args.out, CompareConfig(tolerance))

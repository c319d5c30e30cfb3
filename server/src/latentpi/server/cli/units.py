"""`latentpi units`: the tokens each FFN unit of a layer promotes (value-vector lens), to pick units
to steer with a `scale_units` intervention (docs/interventions.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CONFIG_NAMES = ("pi0_libero", "pi05_libero", "pi0_tiny", "pi05_tiny")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", required=True, choices=CONFIG_NAMES, help="serving configuration"
    )
    parser.add_argument(
        "--checkpoint", help="checkpoint directory, file:// or gs:// (default: the config's)"
    )
    parser.add_argument("--layer", type=int, required=True, help="expert 0 layer (0..depth-1)")
    parser.add_argument("--top-k", type=int, default=10, help="tokens per unit (default 10)")
    parser.add_argument("--units", help="comma-separated unit indices (default: every unit)")
    parser.add_argument("--json", type=Path, help="also write the table here as JSON")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from latentpi.server.lens import load_lens_params, value_vector_lens
    from latentpi.server.serving import load_tokenizer, serving_config

    config = serving_config(args.config).with_checkpoint(args.checkpoint)
    try:
        units = None if args.units is None else np.array([int(u) for u in args.units.split(",")])
    except ValueError:
        print(
            f"latentpi units: --units: expected integers, received {args.units!r}", file=sys.stderr
        )
        return 2
    try:
        lens = value_vector_lens(load_lens_params(config), args.layer, units, args.top_k)
    except ValueError as error:
        print(f"latentpi units: {error}", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(config)
    rows = [
        {
            "unit": int(unit),
            "tokens": [tokenizer.decode([int(t)]) for t in ids],
            "token_ids": ids.tolist(),
            "scores": [round(float(s), 4) for s in scores],
        }
        for unit, ids, scores in zip(lens.units, lens.token_ids, lens.scores, strict=True)
    ]
    print(
        f"{config.name}, expert 0 layer {args.layer}: top {args.top_k} tokens of each value vector"
    )
    for row in rows:
        print(
            f"{row['unit']:>6}  "
            + "  ".join(f"{t!r}:{s:.3g}" for t, s in zip(row["tokens"], row["scores"], strict=True))
        )
    if args.json:
        args.json.write_text(
            json.dumps({"config": config.name, "layer": args.layer, "units": rows}, indent=1)
        )
    return 0

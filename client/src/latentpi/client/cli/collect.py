"""`latentpi collect`: real LIBERO rollouts through a policy server, latents into HDF5 (docs/collect.md)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from latentpi.client.libero_env import MAX_STEPS, SUITES

EXIT_FAILED = 1  # the run started and stopped on an error (server refused, unreachable, ...)
EXIT_USAGE = 2  # bad arguments: nothing was started
EXIT_INTERRUPTED = 130


def add_arguments(parser: argparse.ArgumentParser) -> None:
    horizons = ", ".join(f"{suite} {steps}" for suite, steps in MAX_STEPS.items())
    parser.add_argument("--suite", required=True, choices=SUITES, help="LIBERO suite")
    parser.add_argument(
        "--tasks",
        default=None,
        help="task ids (Python-style A:B, end excluded, or A) or task names, comma-separated "
        "(default: all)",
    )
    parser.add_argument(
        "--trials", type=int, default=50, help="episodes per task (init states 0..N-1)"
    )
    parser.add_argument(
        "--episodes",
        default=None,
        help="only these of the trials, A:B or A (default: all); episode k is the same whichever run does it",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help=f"policy steps per episode (default: {horizons})",
    )
    parser.add_argument(
        "--stride", type=int, default=5, help="collect latents at every STRIDE-th policy step"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (DIR/<suite>/task_*.h5)"
    )
    parser.add_argument(
        "--server",
        action="append",
        default=None,
        help="ws://HOST:PORT of a running server, or 'embedded' (default): start one here; "
        "repeat for several servers (--backend ray)",
    )
    parser.add_argument(
        "--backend",
        default="local",
        choices=("local", "ray"),
        help="local: worker processes here; ray: episodes on a Ray cluster (default local)",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        help="the Ray cluster: auto, HOST:PORT (default: start a local one)",
    )
    parser.add_argument(
        "--config",
        default="pi0_tiny",
        help="the embedded server's configuration (default pi0_tiny)",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help="the server's API key (visible in ps: prefer --api-key-file or $LATENTPI_API_KEY; "
        "default: $LATENTPI_API_KEY, $LATENTPI_API_KEY_FILE)",
    )
    parser.add_argument(
        "--api-key-file", type=Path, default=None, help="the server's API key, read from a file"
    )
    parser.add_argument(
        "--tls-ca",
        type=Path,
        default=None,
        help="trust the wss:// server's certificate if signed by a CA in this PEM file "
        "(default: $LATENTPI_TLS_CA, else the system's CAs)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="environment processes (one task each)"
    )
    parser.add_argument(
        "--latents", default="default", help="a preset name or a spec.json file (default: default)"
    )
    parser.add_argument(
        "--replan-steps", type=int, default=5, help="actions executed per query (openpi: 5)"
    )
    parser.add_argument(
        "--num-steps-wait",
        type=int,
        default=10,
        help="settle steps with the dummy action before the first query (openpi: 10)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=7,
        help="run seed: each episode's env seed and noise seeds derive from it (default 7)",
    )
    parser.add_argument(
        "--error-retries",
        type=int,
        default=1,
        help="times an episode whose simulation raised is redone before it is recorded as failed",
    )
    parser.add_argument("--save-images", action="store_true", help="also store the images sent")
    parser.add_argument(
        "--video", action="store_true", help="an mp4 per episode in OUT/<suite>/videos/"
    )
    parser.add_argument(
        "--retry-timeout", type=float, default=300.0, help="seconds to wait for a lost server"
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        help="seconds a server may take to answer one request before it counts as lost "
        "(default: no limit; 300 with --backend ray)",
    )
    parser.add_argument(
        "--compression", default="lzf", choices=("lzf", "gzip", "none"), help="HDF5 compression"
    )
    _add_condition_arguments(parser)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug")


def _add_condition_arguments(parser: argparse.ArgumentParser) -> None:
    """Collection under intervention (docs/collect.md, "Conditions")."""
    parser.add_argument(
        "--intervene",
        type=Path,
        default=None,
        help="a JSON file with the interventions list sent with every query (arrays inline or "
        'in the .npz next to it: {"npz": "name"}; docs/interventions.md)',
    )
    parser.add_argument(
        "--prompt-variant",
        default=None,
        metavar="TEXT",
        help="drive the episodes with this prompt instead of the instruction; {task} is the "
        "instruction ('' = the null prompt, 'do not {task}', ...)",
    )
    parser.add_argument(
        "--counterfactual-prompt",
        action="append",
        default=None,
        metavar="TEXT",
        help="also record, per query, the actions this prompt would give at the same "
        "observation and noise (repeatable, at most 16; {task} as above)",
    )
    parser.add_argument(
        "--condition",
        default=None,
        metavar="NAME",
        help="the condition's label in the files (default: baseline, or the intervene file's "
        "stem and the prompt variant)",
    )


def run(args: argparse.Namespace) -> int:
    from latentpi.client.collect import CollectError, CollectOptions, collect
    from latentpi.client.collect.progress import print_summary
    from latentpi.client.policy_client import ServerChanged, ServerRejected, ServerUnavailable
    from latentpi.protocol.errors import ValidationError

    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        api_key = _server_access(args)
    except ValueError as error:
        print(f"latentpi collect: {error}", file=sys.stderr)
        return EXIT_USAGE
    options = CollectOptions(
        suite=args.suite,
        out=args.out,
        tasks=args.tasks,
        trials=args.trials,
        episodes=args.episodes,
        max_steps=args.max_steps,
        stride=args.stride,
        server=(args.server or ["embedded"])[0],
        more_servers=tuple((args.server or [])[1:]),
        backend=args.backend,
        ray_address=args.ray_address,
        config=args.config,
        api_key=api_key,
        workers=args.workers,
        latents=args.latents,
        seed=args.seed,
        replan_steps=args.replan_steps,
        num_steps_wait=args.num_steps_wait,
        error_retries=args.error_retries,
        save_images=args.save_images,
        video=args.video,
        retry_timeout_s=args.retry_timeout,
        request_timeout_s=args.request_timeout,
        compression=args.compression,
        intervene=args.intervene,
        prompt_variant=args.prompt_variant,
        counterfactual_prompts=tuple(args.counterfactual_prompt or ()),
        condition=args.condition,
    )
    try:
        result = collect(options)
    except ValidationError as error:
        print(f"latentpi collect: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (ServerRejected, ServerUnavailable, ServerChanged, CollectError, RuntimeError) as error:
        kind = getattr(error, "kind", type(error).__name__)
        print(f"latentpi collect: stopped ({kind}): {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("latentpi collect: interrupted (run the same command to resume)", file=sys.stderr)
        return EXIT_INTERRUPTED
    print_summary(result.tasks, sys.stdout)
    if result.redone:
        print(
            f"{result.redone} episode(s) redone after a lost connection or a simulation error",
            file=sys.stdout,
        )
    errors = sum(row.errors for row in result.tasks)
    if errors:
        print(f"{errors} episode(s) recorded as failed: the simulation raised", file=sys.stdout)
    print(f"success table: {options.out / options.suite / 'success.csv'} (and .json)")
    for warning in result.warnings:  # again at the end, where they are seen
        print(f"latentpi collect: warning: {warning}", file=sys.stderr)
    return 0


def _server_access(args: argparse.Namespace) -> str | None:
    """The API key; `--tls-ca` checked and exported, so worker processes (and a local Ray
    cluster's) trust the same CAs."""
    from latentpi.client.policy_client import ENV_TLS_CA, tls_context
    from latentpi.protocol.api_key import resolve_api_key

    if args.tls_ca is not None:
        tls_context("wss://", args.tls_ca)  # raises, naming the file, if it is not a CA file
        os.environ[ENV_TLS_CA] = str(args.tls_ca.resolve())
    return resolve_api_key(args.api_key, args.api_key_file)

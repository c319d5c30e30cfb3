"""`latentpi serve`: the policy server (websocket at `/`, `GET /healthz`, `GET /metrics`)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from latentpi.protocol.latent_spec import LatentSpec

if TYPE_CHECKING:
    from latentpi.server.embedded import RunningServer
    from latentpi.server.settings import ServerSettings

logger = logging.getLogger("latentpi.server.serve")
CONFIG_NAMES = ("pi0_libero", "pi05_libero", "pi0_tiny", "pi05_tiny")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", required=True, choices=CONFIG_NAMES, help="serving configuration"
    )
    parser.add_argument(
        "--checkpoint", help="checkpoint directory, file:// or gs:// (default: the config's)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="bind address (default 127.0.0.1: loopback only)"
    )
    parser.add_argument(
        "--port", type=int, default=8000, help="port (0 picks a free one; see --ready-file)"
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help="require this key (visible in ps: prefer --api-key-file or $LATENTPI_API_KEY; "
        "default: $LATENTPI_API_KEY, $LATENTPI_API_KEY_FILE, else none)",
    )
    parser.add_argument(
        "--api-key-file", type=Path, default=None, help="require the key in this file (mode 600)"
    )
    parser.add_argument(
        "--tls-cert", type=Path, default=None, help="serve wss:// with this PEM certificate chain"
    )
    parser.add_argument(
        "--tls-key", type=Path, default=None, help="the certificate's PEM private key"
    )
    parser.add_argument(
        "--max-batch", type=int, default=8, help="largest batch of concurrent requests"
    )
    parser.add_argument(
        "--batch-window-ms", type=float, default=5.0, help="how long a batch waits to fill"
    )
    parser.add_argument(
        "--max-programs",
        type=int,
        default=256,
        help="compiled programs kept, least recently used dropped first (default 256)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="requests waiting for the model; more are answered 'overloaded' (default 256)",
    )
    parser.add_argument(
        "--max-frame-bytes", type=int, default=None, help="largest request frame (else 64 MiB)"
    )
    parser.add_argument(
        "--max-response-bytes",
        type=int,
        default=None,
        help="most latent bytes one response may carry, prompt variants included (else 1 GiB)",
    )
    _add_connection_arguments(parser)
    parser.add_argument(
        "--warmup-batch-sizes",
        default="1",
        help="batch sizes compiled at start-up: comma-separated, or 'all' (every padded size)",
    )
    parser.add_argument(
        "--warmup-latents",
        action="append",
        default=[],
        metavar="SPEC",
        help="also compile this latent spec at start-up (a preset name or a JSON map); repeatable",
    )
    parser.add_argument(
        "--strict-prompts",
        action="store_true",
        help="refuse prompts longer than the model's max_token_len (default: truncate and warn, as openpi)",
    )
    parser.add_argument(
        "--batch-invariant",
        choices=("auto", "on", "off"),
        default="auto",
        help="run batches row by row so that a request's numbers never depend on its batch "
        "(default auto: on for CPU, off on accelerators, where it costs batching's throughput)",
    )
    parser.add_argument(
        "--ready-file", type=Path, help="write {url, port, pid} as JSON here once serving"
    )
    parser.add_argument(
        "--parent-pid", type=int, help="exit when this process is gone (embedded mode)"
    )
    parser.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error")
    )


def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """What one peer may hold and for how long (docs/server.md, "Connection limits")."""
    from latentpi.server.settings import ServerSettings

    defaults = ServerSettings()
    parser.add_argument(
        "--max-connections",
        type=int,
        default=defaults.max_connections,
        help="open websocket connections; more are refused with HTTP 503 "
        f"(default {defaults.max_connections})",
    )
    parser.add_argument(
        "--handshake-timeout-s",
        type=float,
        default=defaults.handshake_timeout_s,
        help="a new connection's time to send its request (default %(default)g)",
    )
    parser.add_argument(
        "--idle-timeout-s",
        type=float,
        default=defaults.idle_timeout_s,
        help="close a websocket after this long without a request; 0: never (default %(default)g)",
    )
    parser.add_argument(
        "--frame-timeout-s",
        type=float,
        default=defaults.frame_timeout_s,
        help="close a websocket whose started frame is not finished in this time "
        "(default %(default)g)",
    )
    parser.add_argument(
        "--send-timeout-s",
        type=float,
        default=defaults.send_timeout_s,
        help="cut off a peer that takes none of our bytes for this long (default %(default)g)",
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from latentpi.protocol.api_key import ApiKeyError, resolve_api_key
    from latentpi.server.embedded import start_server
    from latentpi.server.engine_factory import build_engine
    from latentpi.server.serving import serving_config
    from latentpi.server.settings import (
        DEFAULT_MAX_FRAME_BYTES,
        DEFAULT_MAX_RESPONSE_BYTES,
        ServerSettings,
    )

    try:
        api_key = resolve_api_key(args.api_key, args.api_key_file)
    except ApiKeyError as error:
        print(f"latentpi serve: {error}", file=sys.stderr)
        return 2
    try:
        settings = ServerSettings(
            host=args.host,
            port=args.port,
            api_key=api_key,
            tls_certfile=args.tls_cert,
            tls_keyfile=args.tls_key,
            max_batch=args.max_batch,
            batch_window_ms=args.batch_window_ms,
            max_queue=args.max_queue,
            max_programs=args.max_programs,
            max_frame_bytes=args.max_frame_bytes or DEFAULT_MAX_FRAME_BYTES,
            max_response_bytes=args.max_response_bytes or DEFAULT_MAX_RESPONSE_BYTES,
            warmup_batch_sizes=_batch_sizes(args.warmup_batch_sizes, args.max_batch),
            warmup_specs=tuple(_latent_spec(text) for text in args.warmup_latents),
            strict_prompts=args.strict_prompts,
            batch_invariant={"auto": None, "on": True, "off": False}[args.batch_invariant],
            max_connections=args.max_connections,
            handshake_timeout_s=args.handshake_timeout_s,
            idle_timeout_s=args.idle_timeout_s or None,
            frame_timeout_s=args.frame_timeout_s,
            send_timeout_s=args.send_timeout_s,
        )
    except ValueError as error:
        option, _, detail = str(error).partition(":")
        print(f"latentpi serve: --{option.replace('_', '-')}:{detail}", file=sys.stderr)
        return 2
    _warn_if_exposed(settings)
    config = serving_config(args.config).with_checkpoint(args.checkpoint)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    logger.info("loading %s (%s)", config.name, config.checkpoint or "random weights")
    running = start_server(lambda: build_engine(config, settings), settings, wait=False)
    if args.parent_pid:
        threading.Thread(target=_watch_parent, args=(args.parent_pid, stop), daemon=True).start()
    try:
        ready = _wait_ready(running, stop)
    except RuntimeError as error:
        logger.error("server did not start: %s", error)
        running.stop()
        return 1
    if not ready:
        logger.info("stopped while loading the model")
        logging.shutdown()
        # The load thread may be inside XLA: tearing the interpreter down under it can abort, and
        # waiting for it can take minutes. Nothing is served yet, so nothing is lost.
        os._exit(0)
    logger.info(
        "serving %s at %s (api key %s, tls %s)",
        config.name,
        running.url,
        "required" if api_key else "off",
        "on" if settings.tls else "off",
    )
    if args.ready_file:
        _write_ready_file(args.ready_file, running.url, running.port)
    while not stop.wait(0.5):
        if not running.thread.is_alive():
            return 1
    running.stop()
    return 0


def _warn_if_exposed(settings: ServerSettings) -> None:
    """Anyone who can reach a non-loopback address can run the model and read its latents."""
    if _is_loopback(settings.host):
        return
    if settings.api_key is None:
        logger.warning(
            "listening on %s without an API key: anyone who reaches it can use the server "
            "(see docs/security.md)",
            settings.host,
        )
    if not settings.tls:
        logger.warning(
            "listening on %s without TLS: requests, latents and the API key travel in clear",
            settings.host,
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: assume it is reachable
        return False


def _wait_ready(running: RunningServer, stop: threading.Event) -> bool:
    """True once the model is served, False when told to stop first; RuntimeError if loading
    failed or the server died."""
    while not stop.is_set():
        try:
            running.wait_ready(timeout_s=0.5)
        except TimeoutError:
            continue
        return True
    return False


def _batch_sizes(text: str, max_batch: int) -> tuple[int, ...]:
    if text == "all":
        return tuple(range(1, max_batch + 1))
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(
            f"warmup_batch_sizes: expected 'all' or comma-separated integers, received {text!r}"
        ) from None


def _latent_spec(text: str) -> LatentSpec:
    """A preset name or a JSON map, as `collect --latents` and requests accept."""
    try:
        return LatentSpec.from_wire(json.loads(text) if text.lstrip().startswith("{") else text)
    except (ValueError, TypeError) as error:
        raise ValueError(f"warmup_latents: {error}") from None


def _watch_parent(pid: int, stop: threading.Event) -> None:
    """Set `stop` once process `pid` is gone. For our own parent, reparenting tells (a dead but
    unreaped parent still answers kill 0); for any other process, kill 0 failing does."""
    is_parent = os.getppid() == pid
    while not stop.wait(1.0):
        if (os.getppid() != pid) if is_parent else not _alive(pid):
            logger.warning("parent process %d is gone: stopping", pid)
            stop.set()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _write_ready_file(path: Path, url: str, port: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"url": url, "port": port, "pid": os.getpid()}))
    os.replace(tmp, path)

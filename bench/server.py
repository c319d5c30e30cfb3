"""Policy server speed on loopback: transport against raw TCP, client codec against openpi-client,
and pi0_tiny throughput with 16 concurrent clients against 1.

Every server runs in its own process (this script with --serve KIND), as deployed, so the clients
here never share its GIL.

Part 1, transport (no model time): the real app (websocket, decode, validation, batcher, FramePacker)
around an engine that answers a fixed response of the full pi0's default-latent shapes (bfloat16
prompt states at 19 layers + the action expert at the last step, ~5.7 MB) to a LIBERO observation
(~0.3 MB), one client, sequential round trips. Baseline: the same request and response bytes over
a raw TCP socket (length-prefixed, no parsing). "websockets library alone" answers the same bytes
from a bare `websockets` server: the floor of any server on this websocket stack. The client codec
rows time encode(request) + decode(response) only: latentpi's codec against openpi-client's
msgpack_numpy on the same bytes.

Part 2, pi0_tiny on this CPU: default-latent requests from 1 client, then from 16 concurrent
clients (one thread and connection each), after the server compiled every padded batch size; then
16 clients against a server that never batches (--max-batch 1).
Throughput ratio against 1 client; latency percentiles are per request, client side.

Medians and percentiles of repeated calls in this run. No GPU numbers: this machine has none.

Run: .venv/bin/python bench/server.py [--repeats N] [--requests-per-client N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from openpi_client import msgpack_numpy as openpi
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from websockets.sync.client import connect

from latentpi.protocol.codec import packb, unpackb
from latentpi.protocol.latent_layout import latent_layouts
from latentpi.protocol.latent_spec import DEFAULT_PRESET, LatentSpec, preset
from latentpi.protocol.messages import PolicyRequest, PolicyResponse, ServerMetadata
from latentpi.server.embedded import start_server
from latentpi.server.settings import ServerSettings

# openpi-client 0.1.2 calls websockets.sync.client.connect outside a context manager.
warnings.filterwarnings("ignore", "connect\\(\\) must be used", DeprecationWarning)

CONCURRENT_CLIENTS = 16


def observation(seed: int = 0, **extra: Any) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/state": rng.normal(size=8),
        "prompt": "put both the alphabet soup and the tomato sauce in the basket",
        **extra,
    }


# -- part 1: transport --------------------------------------------------------------------------
def pi0_metadata() -> ServerMetadata:
    from latentpi.server.model import configs

    model = configs.pi0("bfloat16")
    return ServerMetadata(
        model=model.variant,
        token_layout=configs.token_layout(model),
        depth=(model.expert_0.depth, model.expert_1.depth),
        width=(model.expert_0.width, model.expert_1.width),
        num_heads=model.expert_0.num_heads,
        action_horizon=model.action_horizon,
        action_dim=model.action_dim,
        num_steps=model.num_steps,
    )


@dataclass(frozen=True)
class Replay:
    group: LatentSpec | None


class ReplayEngine:
    """The app's engine interface answering one fixed response: all but model time."""

    def __init__(self, metadata: ServerMetadata) -> None:
        self._metadata = metadata
        spec = preset(DEFAULT_PRESET)
        layouts = latent_layouts(spec, metadata.shape)
        rng = np.random.default_rng(0)
        latents = {
            name: (
                rng.normal(size=entry.shape).astype(ml_dtypes.bfloat16)
                if entry.dtype == "bfloat16"
                else np.ones(entry.shape, entry.dtype)
            )
            for name, entry in layouts.items()
        }
        actions = rng.normal(size=(metadata.action_horizon, 7)).astype(np.float32)
        self.response = PolicyResponse(actions, latents, layouts, spec).to_wire()

    def metadata(self) -> dict[str, Any]:
        return self._metadata.to_wire()

    def prepare(self, request: PolicyRequest) -> Replay:
        return Replay(request.latent_spec)

    def run_batch(self, items: Sequence[Replay]) -> list[dict[str, Any]]:
        return [dict(self.response) for _ in items]


def serve_raw_tcp(response: bytes, port_file: Path) -> None:
    """Reads one length-prefixed request, answers `response` length-prefixed, until EOF."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        write_port(port_file, listener.getsockname()[1])
        connection, _ = listener.accept()
        with connection:
            header = bytearray(8)
            while read_exactly(connection, header):
                body = bytearray(struct.unpack("<Q", header)[0])
                read_exactly(connection, body)
                connection.sendall(struct.pack("<Q", len(response)) + response)


def serve_websockets_floor(response: bytes, port_file: Path) -> None:
    """The websockets library alone: metadata, then `response` for every frame, no parsing."""
    from websockets.sync.server import ServerConnection, serve

    def handler(connection: ServerConnection) -> None:
        connection.send(b"metadata")
        for _ in connection:
            connection.send(response)

    with serve(handler, "127.0.0.1", 0, compression=None, max_size=None) as server:
        write_port(port_file, server.socket.getsockname()[1])
        server.serve_forever()


def serve_app(engine: Any, settings: ServerSettings, port_file: Path) -> None:
    with start_server(lambda: engine, settings) as server:
        write_port(port_file, server.port)
        threading.Event().wait()  # until the parent terminates this process


def write_port(port_file: Path, port: int) -> None:
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(str(port))
    tmp.rename(port_file)


@contextlib.contextmanager
def child_server(kind: str, *extra: str) -> Iterator[int]:
    """This script with --serve KIND in its own process (as deployed: no GIL shared with the
    clients); yields its port once it listens."""
    with tempfile.TemporaryDirectory() as folder:
        port_file = Path(folder) / "port"
        command = [sys.executable, __file__, "--serve", kind, "--port-file", str(port_file), *extra]
        process = subprocess.Popen(command)
        try:
            while not port_file.exists():
                if process.poll() is not None:
                    raise RuntimeError(f"--serve {kind} exited with {process.returncode}")
                time.sleep(0.05)
            yield int(port_file.read_text())
        finally:
            process.terminate()
            process.wait(30)


def read_exactly(connection: socket.socket, buffer: bytearray) -> bool:
    view, got = memoryview(buffer), 0
    while got < len(buffer):
        count = connection.recv_into(view[got:])
        if count == 0:
            return False
        got += count
    return True


def response_frame(engine: ReplayEngine) -> bytes:
    return packb({**engine.response, "server_timing": {"infer_ms": 1.0}})


def transport_rows(repeats: int) -> tuple[list[tuple[str, float]], int]:
    """Every path's round trips interleaved (one of each per repeat, in shuffled order), so that
    load from other processes on this shared machine hits all rows alike."""
    request = observation(collect_latents=True)
    request_frame = packb(request)
    reply = response_frame(ReplayEngine(pi0_metadata()))
    with contextlib.ExitStack() as stack:
        raw_port = stack.enter_context(child_server("raw"))
        floor_port = stack.enter_context(child_server("websockets"))
        # One server per client: a second open connection would (rightly) make the batcher wait
        # out its window for a request from it.
        app_port = stack.enter_context(child_server("replay"))
        stock_port = stack.enter_context(child_server("replay"))
        sock = stack.enter_context(socket.create_connection(("127.0.0.1", raw_port)))
        floor = stack.enter_context(connect(f"ws://127.0.0.1:{floor_port}", **WS_OPTIONS))
        ours = stack.enter_context(connect(f"ws://127.0.0.1:{app_port}", **WS_OPTIONS))
        floor.recv(), ours.recv()  # metadata
        policy = WebsocketClientPolicy(f"ws://127.0.0.1:{stock_port}")
        stack.callback(policy._ws.close)  # the stock client has no close()
        answer, header = bytearray(len(reply)), bytearray(8)

        def raw() -> None:
            sock.sendall(struct.pack("<Q", len(request_frame)) + request_frame)
            read_exactly(sock, header)
            read_exactly(sock, answer)

        paths: list[tuple[str, Callable[[], object]]] = [
            ("raw TCP, same bytes (baseline)", raw),
            ("websockets library alone, same bytes", lambda: round_trip(floor, request)),
            ("latentpi server, latentpi client codec", lambda: round_trip(ours, request)),
            ("latentpi server, stock openpi-client", lambda: policy.infer(request)),
            ("client codec only: latentpi", lambda: (packb(request), unpackb(reply))),
            (
                "client codec only: openpi-client",
                lambda: (openpi.packb(request), openpi.unpackb(reply)),
            ),
        ]
        return interleaved_medians(paths, repeats), len(request_frame) + len(reply)


WS_OPTIONS: dict[str, Any] = {"compression": None, "max_size": None}


def round_trip(connection: Any, request: dict[str, Any]) -> object:
    connection.send(packb(request))
    return unpackb(connection.recv())


def interleaved_medians(
    paths: Sequence[tuple[str, Callable[[], object]]], repeats: int
) -> list[tuple[str, float]]:
    times: dict[str, list[float]] = {name: [] for name, _ in paths}
    order = np.random.default_rng(0)
    for repeat in range(repeats + 1):
        for index in order.permutation(len(paths)):  # no path always follows the same one
            name, function = paths[index]
            start = time.perf_counter()
            function()
            if repeat:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    return [(name, statistics.median(times[name]) * 1000) for name, _ in paths]


def print_transport(rows: list[tuple[str, float]], nbytes: int) -> None:
    print(
        f"Part 1: one default-latent round trip on loopback ({nbytes / 1e6:.2f} MB request+response)"
    )
    print(f"{'path':<42} {'median':>10} {'MB/s':>8} {'x raw TCP thr.':>15}")
    baseline = rows[0][1]
    for name, ms in rows:
        print(f"{name:<42} {ms:7.2f} ms {nbytes / ms / 1e3:8.0f} {baseline / ms:14.2f}x")
    codec = {name: ms for name, ms in rows}
    ratio = codec["client codec only: openpi-client"] / codec["client codec only: latentpi"]
    print(f"client codec: latentpi is {ratio:.2f}x openpi-client's speed on the same bytes")


# -- part 2: pi0_tiny throughput ----------------------------------------------------------------
def tiny_engine(settings: ServerSettings) -> Any:
    """pi0_tiny with the default spec compiled at every padded batch size, so nothing compiles
    while the clients are timed."""
    from latentpi.server.engine_factory import build_engine
    from latentpi.server.serving import serving_config

    engine = build_engine(serving_config("pi0_tiny"), settings)
    prepared = engine.prepare(PolicyRequest.from_wire(observation(collect_latents=True)))
    for size in settings.batch_sizes:
        engine.run_batch([prepared] * size)
    return engine


def client_latencies(url: str, seed: int, count: int, barrier: threading.Barrier) -> list[float]:
    policy = WebsocketClientPolicy(url)
    request = observation(seed, collect_latents=True)
    barrier.wait()
    latencies = []
    for _ in range(count):
        start = time.perf_counter()
        policy.infer(request)
        latencies.append(time.perf_counter() - start)
    policy._ws.close()
    return latencies


def run_clients(url: str, clients: int, per_client: int) -> tuple[float, list[float]]:
    """Wall time from the moment all clients are connected, and every request's latency."""
    results: list[list[float]] = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)

    def run(index: int) -> None:
        results[index] = client_latencies(url, index, per_client, barrier)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return wall, [latency for latencies in results for latency in latencies]


def batch_stats(http_url: str) -> tuple[float, float]:
    """(model calls, requests in them) from the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{http_url}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }
    return samples["latentpi_batch_size_count"], samples["latentpi_batch_size_sum"]


ThroughputRow = tuple[str, int, int, float, list[float], float]


def throughput_rows(per_client: int) -> list[ThroughputRow]:
    """1 client and 16 clients against a batching server (--max-batch 16), then 16 clients
    against one that runs every request alone (--max-batch 1)."""
    runs = (
        ("pi0_tiny", "max-batch 16", ((1, per_client * 4), (CONCURRENT_CLIENTS, per_client))),
        ("pi0_tiny_unbatched", "max-batch 1", ((CONCURRENT_CLIENTS, per_client),)),
    )
    rows = []
    for kind, label, loads in runs:
        with child_server(kind) as port:
            url, http_url = f"ws://127.0.0.1:{port}", f"http://127.0.0.1:{port}"
            run_clients(url, 1, 2)  # warm the connection path
            for clients, count in loads:
                calls_before, rows_before = batch_stats(http_url)
                wall, latencies = run_clients(url, clients, count)
                calls, served = batch_stats(http_url)
                mean_batch = (served - rows_before) / max(calls - calls_before, 1)
                rows.append((label, clients, len(latencies), wall, latencies, mean_batch))
    return rows


def print_throughput(rows: list[ThroughputRow]) -> None:
    print("\nPart 2: pi0_tiny, default latents, CPU, server in its own process")
    print(
        f"{'server':<13} {'clients':>7} {'requests':>8} {'req/s':>7} {'x 1 client':>10} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'mean batch':>10}"
    )
    baseline = rows[0][2] / rows[0][3]
    for label, clients, count, wall, latencies, mean_batch in rows:
        rate = count / wall
        p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99])
        print(
            f"{label:<13} {clients:>7} {count:>8} {rate:7.1f} {rate / baseline:9.2f}x "
            f"{p50:8.1f} {p99:8.1f} {mean_batch:10.1f}"
        )


def serve(kind: str, port_file: Path) -> None:
    if kind == "raw":
        serve_raw_tcp(response_frame(ReplayEngine(pi0_metadata())), port_file)
    elif kind == "websockets":
        serve_websockets_floor(response_frame(ReplayEngine(pi0_metadata())), port_file)
    elif kind == "replay":
        serve_app(ReplayEngine(pi0_metadata()), ServerSettings(port=0), port_file)
    else:
        max_batch = 1 if kind == "pi0_tiny_unbatched" else CONCURRENT_CLIENTS
        settings = ServerSettings(port=0, max_batch=max_batch)
        serve_app(tiny_engine(settings), settings, port_file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=41, help="round trips per transport row")
    parser.add_argument(
        "--requests-per-client", type=int, default=5, help="per client with 16 clients (x4 alone)"
    )
    parser.add_argument(
        "--serve", choices=("raw", "websockets", "replay", "pi0_tiny", "pi0_tiny_unbatched")
    )
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port_file)
        return
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}, Python {platform.python_version()}; no GPU\n"
    )
    rows, nbytes = transport_rows(args.repeats)
    print_transport(rows, nbytes)
    print_throughput(throughput_rows(args.requests_per_client))


if __name__ == "__main__":
    main()

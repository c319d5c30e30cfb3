"""Hostile peers at scale against a real `latentpi serve --config pi0_tiny` subprocess, while one
stock openpi-client keeps calling `infer` (a fixed noise seed: every answer must equal its first).

Scenarios, one after another on the same server, each for `--seconds`:
- baseline: the well-behaved client alone;
- never-reading: peers asking for every latent in float32 (~1.2 MB answers), never reading;
- half-open: TCP connections that never send a request, and websockets that never send a frame;
- idle beyond the limit: `--idle` websocket handshakes against `--max-connections` (the rest must
  get HTTP 503), held open; afterwards a new stock client must get in once slots are freed;
- flood: connect/close loops (TCP only, and with the handshake) from two threads;
- dribblers: frames sent one byte at a time.
Columns: the well-behaved client's p50/p99 latency during the scenario and its ratio to the
baseline's, its errors, what the server dropped (latentpi_connections_dropped_total by reason),
and the server's RSS before and after. Timeouts are shortened so that each limit shows within a
scenario (--handshake-timeout-s 2, --idle-timeout-s 120, --frame-timeout-s 2, --send-timeout-s 2).

The peers are tests/server/hostile.py's (the same ones tests/server/test_hostile_peers.py uses).

Run: .venv/bin/python bench/hostile_peers.py                   (short)
     .venv/bin/python bench/hostile_peers.py --idle 5000 --max-connections 2000 --half-open 2000 \
         --seconds 20                                          (thousands)
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import re
import socket
import sys
import threading
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from threading import Event
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "server"))  # the hostile peers live with the tests

from hostile import (  # noqa: E402
    SteadyClient,
    frame,
    handshake,
    open_idle,
    raise_file_limit,
    tcp,
)

from latentpi.client.server_process import EmbeddedServer  # noqa: E402
from latentpi.protocol.codec import packb  # noqa: E402

warnings.filterwarnings("ignore", "connect\\(\\) must be used", DeprecationWarning)
STARTUP_S = 600.0
TIMEOUTS = {"handshake": 2.0, "idle": 120.0, "frame": 2.0, "send": 2.0}


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    pid: int

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def dropped(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://{self.host}:{self.port}/metrics", timeout=30) as r:
            text = r.read().decode()
        pattern = r'^latentpi_connections_dropped_total\{reason="(\w+)"\} (\S+)$'
        return {m[1]: float(m[2]) for m in re.finditer(pattern, text, re.MULTILINE)}


@contextlib.contextmanager
def latentpi_serve(max_connections: int) -> Iterator[Server]:
    extra = [
        *("--log-level", "error", "--max-batch", "1"),
        *("--max-connections", str(max_connections)),
        *("--handshake-timeout-s", str(TIMEOUTS["handshake"])),
        *("--idle-timeout-s", str(TIMEOUTS["idle"])),
        *("--frame-timeout-s", str(TIMEOUTS["frame"])),
        *("--send-timeout-s", str(TIMEOUTS["send"])),
    ]
    with EmbeddedServer("pi0_tiny", extra_args=extra, startup_timeout_s=STARTUP_S) as server:
        yield Server("127.0.0.1", server.port, server.pid)


# -- hostile peers ----------------------------------------------------------------------------------
def never_reading(server: Server, count: int, ready: Event, stop: Event, notes: list[str]) -> None:
    request = frame(packb(observation(1, side=64, latent_spec="full-float32")))
    peers = []
    for _ in range(count):
        sock = tcp(server.host, server.port, rcvbuf=4096)
        handshake(sock, server.host, server.port)
        sock.settimeout(0.05)
        peers.append(sock)
    ready.set()
    sent = 0
    while not stop.is_set():
        for sock in peers:
            with contextlib.suppress(OSError):
                sock.sendall(request)
                sent += 1
    deadline = time.monotonic() + 120  # go on until the server cut each one off
    while peers and time.monotonic() < deadline:
        for sock in list(peers):
            try:
                sock.sendall(request)
                sent += 1
            except TimeoutError:
                pass
            except OSError:
                peers.remove(sock)
                sock.close()
    notes.append(f"{count} peers sent {sent} requests; {count - len(peers)} cut off")
    for sock in peers:
        sock.close()


def half_open(server: Server, count: int, ready: Event, stop: Event, notes: list[str]) -> None:
    """`count` TCP connections that never send a request, reopened as the server drops them,
    and `count` websockets that never send a frame."""
    silent_ws: list[socket.socket] = []
    statuses = open_idle(server.host, server.port, count, silent_ws)
    opened = 0
    tcp_only: list[socket.socket] = []
    while not stop.is_set():
        for sock in tcp_only:
            sock.close()
        tcp_only = [tcp(server.host, server.port) for _ in range(count)]
        opened += count
        ready.set()
        stop.wait(TIMEOUTS["handshake"] + 0.5)
    notes.append(f"{opened} silent TCP, {statuses.count(101)} silent websockets")
    for sock in (*tcp_only, *silent_ws):
        sock.close()


def idle_beyond_limit(
    server: Server, count: int, ready: Event, stop: Event, notes: list[str]
) -> None:
    held: list[socket.socket] = []
    statuses = open_idle(server.host, server.port, count, held)
    notes.append(f"{statuses.count(101)} admitted, {statuses.count(503)} refused with 503")
    ready.set()
    stop.wait()
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    for sock in held[:10]:
        sock.close()
    time.sleep(1.0)
    late = WebsocketClientPolicy(server.url)  # gets in once slots are free
    late.infer(observation(2))
    late._ws.close()
    notes.append("a new client got in after 10 were closed")
    for sock in held[10:]:
        sock.close()


def flood(server: Server, _: int, ready: Event, stop: Event, notes: list[str]) -> None:
    counts = [0, 0]

    def loop(with_handshake: bool) -> None:
        while not stop.is_set():
            try:
                sock = tcp(server.host, server.port)
                if with_handshake:
                    handshake(sock, server.host, server.port)
                sock.close()
            except OSError:
                continue
            counts[with_handshake] += 1

    threads = [threading.Thread(target=loop, args=(flag,)) for flag in (False, True)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    ready.set()
    for thread in threads:
        thread.join()
    rate = sum(counts) / (time.monotonic() - start)
    notes.append(f"{counts[0]} TCP + {counts[1]} handshakes, {rate:.0f} connections/s")


def dribblers(server: Server, count: int, ready: Event, stop: Event, notes: list[str]) -> None:
    whole = frame(packb(observation(3, side=64)))
    peers: dict[socket.socket, int] = {}
    started = 0
    while not stop.is_set():
        while len(peers) < count:
            sock = tcp(server.host, server.port)
            handshake(sock, server.host, server.port)
            peers[sock] = 0
            started += 1
        for sock, sent in list(peers.items()):
            try:
                sock.sendall(whole[sent : sent + 1])
                peers[sock] = sent + 1
            except OSError:
                sock.close()
                del peers[sock]  # cut off: a new one takes its place
        ready.set()
        stop.wait(0.05)
    notes.append(f"{started} dribblers (one byte each every 50 ms)")
    for sock in peers:
        sock.close()


def run_peer(
    peer: Scenario, server: Server, count: int, ready: Event, stop: Event, queue: Any
) -> None:
    notes: list[str] = []
    try:
        peer(server, count, ready, stop, notes)
    except Exception as error:  # reported in the table
        notes.append(f"peer failed: {type(error).__name__}: {error}")
    finally:
        ready.set()
        queue.put(notes)


# -- the run ----------------------------------------------------------------------------------------
def observation(seed: int, side: int = 224, latent_spec: str | None = None) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    obs: dict[str, Any] = {
        "observation/image": rng.integers(0, 256, (side, side, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (side, side, 3), dtype=np.uint8),
        "observation/state": rng.normal(size=8),
        "prompt": "put the black bowl on the plate",
    }
    if latent_spec == "full-float32":
        obs["latent_spec"] = {"preset": "full", "dtype": "float32"}
    return obs


@dataclass
class Row:
    scenario: str
    latencies_s: list[float]
    errors: int
    dropped: dict[str, float]
    rss_before: float
    rss_after: float
    notes: list[str]


Scenario = Callable[[Server, int, Event, Event, list[str]], None]


def run_scenario(
    name: str,
    server: Server,
    steady: SteadyClient,
    peer: Scenario | None,
    count: int,
    seconds: float,
) -> Row:
    rss_before, dropped_before = server.rss_mb(), server.dropped()
    context = multiprocessing.get_context("spawn")  # own process: no GIL shared with the client
    ready, stop, queue = context.Event(), context.Event(), context.Queue()
    process = None
    if peer is not None:
        args = (peer, server, count, ready, stop, queue)
        process = context.Process(target=run_peer, args=args, daemon=True)
        process.start()
        ready.wait(600)  # the hostile population is in place: measure from here
    first, errors_before = len(steady.latencies_s), len(steady.errors)
    time.sleep(seconds)
    latencies = steady.latencies_s[first:]
    stop.set()
    notes: list[str] = []
    if process is not None:
        notes = queue.get(timeout=300)
        process.join(60)
    time.sleep(1.0)
    after = server.dropped()
    dropped = {k: v - dropped_before.get(k, 0) for k, v in after.items()}
    errors = len(steady.errors) - errors_before
    row = Row(
        name,
        latencies,
        errors,
        {k: v for k, v in dropped.items() if v},
        rss_before,
        server.rss_mb(),
        notes,
    )
    print(f"  {name}: {len(latencies)} calls, {notes}", flush=True)
    return row


def warm_up(server: Server) -> None:
    """Compile what the peers will ask for (the full float32 spec) before anything is measured."""
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    policy = WebsocketClientPolicy(server.url)
    policy.infer(observation(1, side=64, latent_spec="full-float32"))
    policy.infer(observation(3, side=64))
    policy._ws.close()


def print_table(rows: list[Row], args: argparse.Namespace) -> None:
    base50 = float(np.percentile(rows[0].latencies_s, 50))
    base99 = float(np.percentile(rows[0].latencies_s, 99))
    load = os.getloadavg()
    print(
        f"\nhostile peers against pi0_tiny (latentpi serve --max-batch 1 --max-connections "
        f"{args.max_connections}), {args.seconds:g} s each, load average {load[0]:.1f} / "
        f"{load[1]:.1f} / {load[2]:.1f}, {os.cpu_count()} CPUs"
    )
    print(
        "| scenario | stock-client calls | p50 ms | p99 ms | p50 ratio | p99 ratio | errors "
        "| dropped by the server | server RSS MB before → after | peers |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |")
    for row in rows:
        p50 = float(np.percentile(row.latencies_s, 50)) if row.latencies_s else float("nan")
        p99 = float(np.percentile(row.latencies_s, 99)) if row.latencies_s else float("nan")
        dropped = ", ".join(f"{k} {v:.0f}" for k, v in sorted(row.dropped.items())) or "—"
        print(
            f"| {row.scenario} | {len(row.latencies_s)} | {p50 * 1000:.0f} | {p99 * 1000:.0f} | "
            f"{p50 / base50:.2f} | {p99 / base99:.2f} | {row.errors} | {dropped} | "
            f"{row.rss_before:.0f} → {row.rss_after:.0f} | {'; '.join(row.notes)} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="per scenario")
    parser.add_argument("--max-connections", type=int, default=500)
    parser.add_argument("--idle", type=int, default=800, help="idle websockets (vs the limit)")
    parser.add_argument("--half-open", type=int, default=200)
    parser.add_argument("--never-readers", type=int, default=4)
    parser.add_argument("--dribblers", type=int, default=50)
    args = parser.parse_args()
    raise_file_limit(4 * (args.idle + 2 * args.half_open) + 1024)
    scenarios: list[tuple[str, Scenario | None, int]] = [
        ("baseline", None, 0),
        ("never-reading", never_reading, args.never_readers),
        ("half-open", half_open, args.half_open),
        ("idle beyond the limit", idle_beyond_limit, args.idle),
        ("connection flood", flood, 0),
        ("dribblers", dribblers, args.dribblers),
    ]
    with latentpi_serve(args.max_connections) as server:
        warm_up(server)
        steady = SteadyClient(server.url, observation(0)).__enter__()
        rows = [
            run_scenario(name, server, steady, peer, count, args.seconds)
            for name, peer, count in scenarios
        ]
        steady.calls_after(2)
        steady.stop()
    print_table(rows, args)
    return 1 if any(row.errors for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

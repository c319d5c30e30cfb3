"""Soak: N clients against a real `latentpi serve --config pi0_tiny` subprocess for M minutes.

Each client is a thread with its own connection; even-numbered ones are the stock openpi-client,
odd-numbered ones latentpi's client. Every client cycles through the same mix of requests: of
every 20, 12 plain, 5 with the default latents, 2 with an intervention (a steering vector added to
the prompt at layer 0, with latents) and 1 with two prompt variants. Recorded: every error,
client-side latency per request (p50/p99, overall and by kind), and the server's RSS sampled every
second; the RSS slope (MB/min) is a least-squares fit over the samples after the warm-up (the
first quarter of the run, at least 20 s: first compiles of each spec, allocator arenas filling).

Baseline: one client alone (the same mix) for `--baseline-s` before the soak, in the same run;
the ratio column is the soak's latency over the baseline's.

`--leak-mb-per-s X` adds a deliberate leak to check that the slope would catch one: a peer that
opens a connection every second and sends X MB of a frame it never finishes (the server holds
those bytes; the frame timeout is set beyond the run).

Run: .venv/bin/python bench/soak.py                          (short: 4 clients, 0.5 min)
     .venv/bin/python bench/soak.py --clients 16 --minutes 10 (the full soak)
     .venv/bin/python bench/soak.py --json out.json           (results for tests/server/test_soak.py)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import struct
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from latentpi.client.server_process import EmbeddedServer

# openpi-client 0.1.2 calls websockets.sync.client.connect outside a context manager.
warnings.filterwarnings("ignore", "connect\\(\\) must be used", DeprecationWarning)

KINDS = ("plain", "latents", "intervention", "variants")
MIX = ("plain",) * 12 + ("latents",) * 5 + ("intervention",) * 2 + ("variants",)
STARTUP_S = 600.0


@dataclass
class ClientLog:
    latencies_s: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    errors: list[str] = field(default_factory=list)


@dataclass
class SoakResult:
    clients: int
    seconds: float
    requests: dict[str, int]
    errors: list[str]
    p50_ms: dict[str, float]
    p99_ms: dict[str, float]
    baseline_p50_ms: float
    baseline_p99_ms: float
    rss_mb: list[tuple[float, float]]  # (seconds since the soak started, MB)
    warmup_s: float
    rss_slope_mb_per_min: float
    server_errors: dict[str, float]
    load_average: tuple[float, float, float]


# -- the server -------------------------------------------------------------------------------------
@contextlib.contextmanager
def latentpi_serve(extra: list[str]) -> Iterator[tuple[str, int]]:
    """`latentpi serve --config pi0_tiny` on a free port; yields (url, pid)."""
    with EmbeddedServer("pi0_tiny", extra_args=extra, startup_timeout_s=STARTUP_S) as server:
        yield server.url, server.pid


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def server_errors(url: str) -> dict[str, float]:
    import re
    import urllib.request

    with urllib.request.urlopen(f"{url.replace('ws://', 'http://')}/metrics", timeout=10) as r:
        text = r.read().decode()
    found = re.finditer(r'^latentpi_errors_total\{kind="(\w+)"\} (\S+)$', text, re.MULTILINE)
    return {m[1]: float(m[2]) for m in found}


# -- the clients ------------------------------------------------------------------------------------
def observation(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/state": rng.normal(size=8),
        "prompt": "put the black bowl on the plate",
    }


def request(kind: str, seed: int, width: int) -> dict[str, Any]:
    obs = observation(seed)
    if kind == "latents":
        obs["collect_latents"] = True
    elif kind == "intervention":
        vector = np.random.default_rng(seed).normal(size=width).astype(np.float32)
        site = {"expert": 0, "point": "residual", "layers": [0], "segment": "prompt"}
        obs["interventions"] = [{"op": "add", "site": site, "scale": 0.5, "vector": vector}]
        obs["collect_latents"] = True
    elif kind == "variants":
        obs["prompt_variants"] = ["", "turn on the stove"]
    return obs


def connect(url: str, index: int) -> Any:
    if index % 2 == 0:
        from openpi_client.websocket_client_policy import WebsocketClientPolicy

        return WebsocketClientPolicy(url)
    from latentpi.client.policy_client import LatentpiPolicyClient

    return LatentpiPolicyClient(url)


def close(policy: Any) -> None:
    with contextlib.suppress(Exception):
        if hasattr(policy, "close"):
            policy.close()
        else:
            policy._ws.close()  # the stock client has no close()


def run_client(url: str, index: int, until: float, log: ClientLog) -> None:
    try:
        policy = connect(url, index)
    except Exception as error:
        log.errors.append(f"client {index}: connect: {type(error).__name__}: {error}")
        return
    try:
        width = policy.get_server_metadata()["width"]["expert_0"]
        count = index * 7  # clients start at different places in the mix
        while time.monotonic() < until:
            kind = MIX[count % len(MIX)]
            obs = request(kind, seed=count, width=width)
            start = time.monotonic()
            try:
                response = policy.infer(obs)
            except Exception as error:
                log.errors.append(f"client {index} ({kind}): {type(error).__name__}: {error}")
                return
            log.latencies_s[kind].append(time.monotonic() - start)
            if response["actions"].shape != (50, 7):
                log.errors.append(f"client {index} ({kind}): actions {response['actions'].shape}")
            count += 1
    finally:
        close(policy)


def run_clients(url: str, clients: int, seconds: float) -> list[ClientLog]:
    logs = [ClientLog() for _ in range(clients)]
    until = time.monotonic() + seconds
    threads = [
        threading.Thread(target=run_client, args=(url, i, until, logs[i]), daemon=True)
        for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 600)
    return logs


# -- a deliberate leak (to show the slope would catch one) -----------------------------------------
def leak(url: str, mb_per_s: float, until: float, held: list[socket.socket]) -> None:
    """Every second a new connection starts a frame and sends `mb_per_s` MB of it, never
    finishing: the server buffers those bytes for as long as the connection stays."""
    host, port = url.removeprefix("ws://").split(":")
    chunk = int(mb_per_s * 1024 * 1024)
    while time.monotonic() < until:
        sock = socket.create_connection((host, int(port)))
        sock.sendall(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        header = struct.pack("!BBQ", 0x82, 0x80 | 127, 2 * chunk) + b"\0\0\0\0"
        sock.sendall(header + os.urandom(chunk))  # half of the announced payload
        held.append(sock)
        time.sleep(1.0)


# -- measuring ----------------------------------------------------------------------------------------
def sample_rss(
    pid: int, start: float, stop: threading.Event, into: list[tuple[float, float]]
) -> None:
    while not stop.is_set():
        with contextlib.suppress(OSError, RuntimeError):
            into.append((time.monotonic() - start, rss_mb(pid)))
        stop.wait(1.0)


def slope_mb_per_min(samples: list[tuple[float, float]], after_s: float) -> float:
    kept = [(t, mb) for t, mb in samples if t >= after_s]
    if len(kept) < 3:
        return float("nan")
    t, mb = np.array(kept).T
    return float(np.polyfit(t / 60, mb, 1)[0])


def percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q) * 1000) if values else float("nan")


def soak(clients: int, minutes: float, baseline_s: float, leak_mb_per_s: float) -> SoakResult:
    seconds = minutes * 60
    warmup_s = max(20.0, seconds / 4)
    frame_timeout = ["--frame-timeout-s", str(seconds + 600)] if leak_mb_per_s else []
    extra = ["--max-batch", "1", *frame_timeout]  # on a CPU, one row per call serves best
    with latentpi_serve(extra) as (url, pid):
        baseline = run_clients(url, 1, baseline_s)
        samples: list[tuple[float, float]] = []
        stop = threading.Event()
        start = time.monotonic()
        sampler = threading.Thread(target=sample_rss, args=(pid, start, stop, samples))
        sampler.start()
        held: list[socket.socket] = []
        if leak_mb_per_s:
            args = (url, leak_mb_per_s, start + seconds, held)
            threading.Thread(target=leak, args=args, daemon=True).start()
        logs = run_clients(url, clients, seconds)
        stop.set()
        sampler.join()
        for sock in held:
            sock.close()
        errors_seen = server_errors(url)
    return summarize(clients, seconds, warmup_s, baseline, logs, samples, errors_seen)


def summarize(
    clients: int,
    seconds: float,
    warmup_s: float,
    baseline: list[ClientLog],
    logs: list[ClientLog],
    samples: list[tuple[float, float]],
    errors_seen: dict[str, float],
) -> SoakResult:
    by_kind = {k: [x for log in logs for x in log.latencies_s[k]] for k in KINDS}
    by_kind["all"] = [x for k in KINDS for x in by_kind[k]]
    alone = [x for log in baseline for k in KINDS for x in log.latencies_s[k]]
    return SoakResult(
        clients=clients,
        seconds=seconds,
        requests={k: len(v) for k, v in by_kind.items()},
        errors=[e for log in (*baseline, *logs) for e in log.errors],
        p50_ms={k: percentile_ms(v, 50) for k, v in by_kind.items()},
        p99_ms={k: percentile_ms(v, 99) for k, v in by_kind.items()},
        baseline_p50_ms=percentile_ms(alone, 50),
        baseline_p99_ms=percentile_ms(alone, 99),
        rss_mb=samples,
        warmup_s=warmup_s,
        rss_slope_mb_per_min=slope_mb_per_min(samples, warmup_s),
        server_errors=errors_seen,
        load_average=os.getloadavg(),
    )


def print_table(result: SoakResult) -> None:
    print(
        f"\nsoak: {result.clients} clients x {result.seconds / 60:g} min against pi0_tiny "
        f"(latentpi serve --max-batch 1), load average {result.load_average[0]:.1f} / "
        f"{result.load_average[1]:.1f} / {result.load_average[2]:.1f}, {os.cpu_count()} CPUs"
    )
    print(
        f"| kind | requests | p50 ms | p99 ms | p50 / 1 client ({result.baseline_p50_ms:.0f} ms) |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for kind in (*KINDS, "all"):
        ratio = result.p50_ms[kind] / result.baseline_p50_ms
        print(
            f"| {kind} | {result.requests[kind]} | {result.p50_ms[kind]:.0f} | "
            f"{result.p99_ms[kind]:.0f} | {ratio:.2f} |"
        )
    rss = result.rss_mb
    after = [mb for t, mb in rss if t >= result.warmup_s]
    print(
        f"\nerrors: {len(result.errors)} client-side, server metrics {result.server_errors or '{}'}"
        f"\nserver RSS: {rss[0][1]:.0f} MB at the start, {after[0] if after else float('nan'):.0f}"
        f" MB after the {result.warmup_s:.0f} s warm-up, {rss[-1][1]:.0f} MB at the end, "
        f"max {max(mb for _, mb in rss):.0f} MB; slope after warm-up "
        f"{result.rss_slope_mb_per_min:+.2f} MB/min ({len(after)} samples)"
    )
    for error in result.errors[:10]:
        print("  error:", error)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--minutes", type=float, default=0.5)
    parser.add_argument("--baseline-s", type=float, default=10.0)
    parser.add_argument("--leak-mb-per-s", type=float, default=0.0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    result = soak(args.clients, args.minutes, args.baseline_s, args.leak_mb_per_s)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(asdict(result)))
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())

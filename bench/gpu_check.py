"""Everything a lent accelerator should answer, in one run: one table on stdout, every row in JSON.

For each model (full-size pi0 and pi0.5 in bfloat16; `--cpu-smoke`: pi0_tiny and pi05_tiny):
  1. random weights saved as an openpi checkpoint, then loaded through the real serving path
     (`build_engine` → orbax restore straight to the device): seconds, parameter bytes per device,
     and a check that a warmed-up call moves no parameter (`transfer_guard("disallow")`);
  2. ms per call (median, p90) of `PolicyEngine.run_batch` — the model call plus the host work the
     server does — for plain inference and the `default`, `full` and `attention` latent presets at
     batch 1 and 8, the ratio to plain at the same batch, the first call (compile) and the device's
     peak memory after the variant (a process-wide high-water mark, where the backend reports it);
  3. capture changes nothing: bit-identical actions with and without each preset, and a request's
     row of a batch against the same request alone (vectorized batches; on CPU the server runs
     batches row by row, which is exact by construction);
  4. (first model only) a real server on loopback: requests/s and latency p50 / p99 for 1 client,
     then 16 concurrent clients, each on its own websocket connection.
Steps run in order of importance; one that would overrun `--budget-s` is recorded as skipped.

    python bench/gpu_check.py --out gpu_check.json          # on the device (≤ 10 minutes)
    python bench/gpu_check.py --cpu-smoke --out smoke.json  # here, under a minute (a test runs it)

bench/gpu_check.sh wraps it for the device machine (installs the carried wheels first); see
docs/benchmarks.md, "GPU rows".
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

VARIANTS = ("plain", "default", "full", "attention")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run measures."""

    configs: tuple[str, ...]
    batches: tuple[int, ...]
    variants: tuple[str, ...]
    calls: int
    clients: int
    requests_per_client: int
    budget_s: float


FULL = Plan(("pi0_libero", "pi05_libero"), (1, 8), VARIANTS, 20, 16, 8, 540.0)
SMOKE = Plan(("pi0_tiny", "pi05_tiny"), (1, 2), ("plain", "default"), 2, 4, 2, 150.0)


class Report:
    """Rows of results, printed as they come and written as JSON at the end (and after each row,
    so a run killed at its time limit still leaves what it measured)."""

    def __init__(self, out: Path | None, plan: Plan) -> None:
        self.out, self.rows, self.started = out, [], time.monotonic()
        self.plan = plan
        self.meta: dict[str, Any] = {}

    def left_s(self) -> float:
        return self.plan.budget_s - (time.monotonic() - self.started)

    def add(self, kind: str, **fields: Any) -> None:
        row = {"kind": kind, **fields}
        self.rows.append(row)
        print(" ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
        self.write()

    def skip(self, kind: str, why: str, **fields: Any) -> None:
        self.add(kind, skipped=why, **fields)

    def write(self) -> None:
        if self.out is not None:
            document = {"meta": self.meta, "rows": self.rows}
            self.out.write_text(json.dumps(document, indent=1, default=str))


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# -- 1. load through the real path ----------------------------------------------------------------
def load_engine(name: str, report: Report, folder: Path) -> Any:
    from latentpi.server import device as _device
    from latentpi.server.engine_factory import build_engine, save_random_checkpoint
    from latentpi.server.serving import serving_config
    from latentpi.server.settings import ServerSettings

    # The tiny SentencePiece model stands in for PaliGemma's (not downloadable here): its ids all
    # fall inside the full-size embedding, and tokenization is not what is measured.
    config = dataclasses.replace(serving_config(name), tokenizer=None)
    start = time.monotonic()
    root = save_random_checkpoint(config, folder / name)
    saved_s = time.monotonic() - start
    gc.collect()  # the saved tree's device copy is gone before the served one is restored
    start = time.monotonic()
    engine = build_engine(
        dataclasses.replace(config, checkpoint=str(root)), ServerSettings(port=0), warmup=False
    )
    loaded_s = time.monotonic() - start
    bytes_by_place = {f"{d}/{k}": n for (d, k), n in engine.device_report().param_bytes.items()}
    report.add(
        "load",
        model=name,
        save_s=saved_s,
        load_s=loaded_s,
        param_bytes=bytes_by_place,
        batch_invariant=engine.batch_invariant,
        memory=_device.memory_stats(engine.device),
    )
    return engine


def check_no_parameter_transfer(engine: Any, report: Report, name: str) -> None:
    import jax

    from latentpi.server import device as _device
    from latentpi.server.engine import _stack_observation

    item = engine.prepare(request(0))
    obs, noise = _stack_observation([item]), np.stack([item.noise])
    engine.sampler.sample_actions(engine.params, obs, noise)
    compiled = engine.sampler.compiled(engine.params, obs, noise)
    on_device = jax.device_put((obs, noise), _device.device_sharding(engine.device))
    try:
        with jax.transfer_guard_host_to_device("disallow"):
            jax.block_until_ready(compiled(engine.params, *on_device))
        moved = False
    except Exception as error:  # XlaRuntimeError names the array it refused to copy
        moved = str(error).splitlines()[0][:200]
    report.add("residency", model=name, parameters_moved_per_call=moved)


# -- 2. and 3. ms per call, capture changes nothing ---------------------------------------------
def request(seed: int, variant: str = "plain") -> Any:
    from latentpi.protocol.messages import PolicyRequest

    rng = np.random.default_rng(seed)
    extra = {} if variant == "plain" else {"latent_spec": variant}
    return PolicyRequest.from_wire(
        {
            "observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
            "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
            "observation/state": rng.normal(size=8),
            "prompt": "put both the alphabet soup and the tomato sauce in the basket",
            "noise_seed": 1000 + seed,
            **extra,
        }
    )


def time_variants(engine: Any, report: Report, name: str, plan: Plan) -> None:
    from latentpi.server import device as _device

    first_actions: dict[tuple[int, str], np.ndarray] = {}
    for batch in plan.batches:
        plain_ms = None
        for variant in plan.variants:
            estimate = _estimate_s(report, name, plan.calls)
            if report.left_s() < estimate:
                report.skip("latency", "budget", model=name, batch=batch, variant=variant)
                continue
            items = [engine.prepare(request(i, variant)) for i in range(batch)]
            start = time.monotonic()
            first = engine.run_batch(items)
            compile_s = time.monotonic() - start
            times = [_timed(functools.partial(engine.run_batch, items)) for _ in range(plan.calls)]
            median = statistics.median(times)
            plain_ms = median if variant == "plain" else plain_ms
            first_actions[(batch, variant)] = first[0]["actions"]
            report.add(
                "latency",
                model=name,
                batch=batch,
                variant=variant,
                median_ms=median,
                p90_ms=float(np.percentile(times, 90)),
                vs_plain=median / plain_ms if plain_ms else None,
                first_call_s=compile_s,
                peak_bytes=_device.memory_stats(engine.device).get("peak_bytes_in_use"),
            )
    check_capture_changes_nothing(first_actions, report, name)


def _estimate_s(report: Report, name: str, calls: int) -> float:
    """A variant's cost from the previous one of this model (compile + calls), 0 at first."""
    done = [r for r in report.rows if r.get("model") == name and "median_ms" in r]
    if not done:
        return 0.0
    last = done[-1]
    return last["first_call_s"] + calls * last["median_ms"] / 1000


def check_capture_changes_nothing(
    actions: dict[tuple[int, str], np.ndarray], report: Report, name: str
) -> None:
    """Row 0 of every (batch, variant) is the same request with the same noise."""
    base_batch = min((b for b, _ in actions), default=None)
    reference = actions.get((base_batch, "plain"))
    if reference is None:
        return
    for (batch, variant), got in sorted(actions.items()):
        if (batch, variant) == (base_batch, "plain"):
            continue
        report.add(
            "capture_changes_nothing",
            model=name,
            compared=f"batch {batch} {variant} row 0 vs batch {base_batch} plain",
            bit_identical=bool(np.array_equal(got, reference)),
            max_abs_diff=float(np.abs(got - reference).max()),
        )


def _timed(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1000


# -- 4. a real server, 16 clients against 1 -------------------------------------------------------
def serve_clients(engine: Any, report: Report, name: str, plan: Plan) -> None:
    from latentpi.server.embedded import start_server
    from latentpi.server.settings import ServerSettings

    sizes = engine.settings.batch_sizes
    engine.warmup((None,), sizes)  # every padded size the clients can make, compiled first
    with start_server(lambda: engine, ServerSettings(port=0, max_batch=max(sizes))) as server:
        for clients in (1, plan.clients):
            if report.left_s() < 30:
                report.skip("server", "budget", model=name, clients=clients)
                continue
            latencies, wall_s = _drive(server.url, clients, plan.requests_per_client)
            report.add(
                "server",
                model=name,
                clients=clients,
                requests_per_s=len(latencies) / wall_s,
                p50_ms=float(np.percentile(latencies, 50)),
                p99_ms=float(np.percentile(latencies, 99)),
            )
    one = [r for r in report.rows if r["kind"] == "server" and r.get("clients") == 1]
    many = [r for r in report.rows if r["kind"] == "server" and r.get("clients") == plan.clients]
    if one and many and "requests_per_s" in many[0] and "requests_per_s" in one[0]:
        ratio = many[0]["requests_per_s"] / one[0]["requests_per_s"]
        report.add("server_ratio", model=name, throughput_vs_1_client=ratio)


def _drive(url: str, clients: int, per_client: int) -> tuple[list[float], float]:
    """Each client on its own thread and connection, released together; latencies in ms."""
    from websockets.sync.client import connect

    from latentpi.protocol.codec import packb, unpackb

    frames = [packb(request(i).to_wire()) for i in range(clients)]
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock, barrier = threading.Lock(), threading.Barrier(clients + 1)

    def client(index: int) -> None:
        try:
            with connect(url, max_size=None, compression=None) as ws:
                ws.recv()  # metadata
                barrier.wait(60)
                for _ in range(per_client):
                    start = time.perf_counter()
                    ws.send(frames[index])
                    reply = unpackb(ws.recv())
                    assert "actions" in reply, reply
                    with lock:
                        latencies.append((time.perf_counter() - start) * 1000)
        except BaseException as error:
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait(60)
    start = time.monotonic()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} clients failed: {errors[0]!r}")
    return latencies, time.monotonic() - start


# -- the run --------------------------------------------------------------------------------------
def run(plan: Plan, out: Path | None) -> Report:
    import jax

    from latentpi.server import device as _device
    from latentpi.server.engine_factory import default_compile_cache, enable_compile_cache

    enable_compile_cache(default_compile_cache())  # the random init compiles before the engine
    report = Report(out, plan)
    report.meta = {"device": _device.describe(_device.serving_device()), "plan": plan.__dict__}
    print(f"device: {report.meta['device']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="latentpi-gpu-check-") as folder:
        for index, name in enumerate(plan.configs):
            if report.left_s() < 60:
                report.skip("load", "budget", model=name)
                continue
            engine = load_engine(name, report, Path(folder))
            check_no_parameter_transfer(engine, report, name)
            time_variants(engine, report, name, plan)
            if index == 0:
                serve_clients(engine, report, name, plan)
            del engine
            gc.collect()
            jax.clear_caches()
    report.meta["total_s"] = time.monotonic() - report.started
    report.write()
    return report


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    print(f"\n{'model':<12} {'batch':>5} {'variant':<10} {'median ms':>10} {'p90 ms':>8} "
          f"{'vs plain':>8} {'first s':>8} {'peak GiB':>9}")  # fmt: skip
    for row in rows:
        if row["kind"] != "latency" or "skipped" in row:
            continue
        peak = row["peak_bytes"] / 2**30 if row.get("peak_bytes") else float("nan")
        print(f"{row['model']:<12} {row['batch']:>5} {row['variant']:<10} {row['median_ms']:>10.1f} "
              f"{row['p90_ms']:>8.1f} {row['vs_plain']:>7.2f}x {row['first_call_s']:>8.1f} "
              f"{peak:>9.2f}")  # fmt: skip
    for row in rows:
        if row["kind"] in (
            "residency",
            "capture_changes_nothing",
            "server",
            "server_ratio",
            "load",
        ):
            print(" ".join(f"{k}={_fmt(v)}" for k, v in row.items()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny configs on the CPU")
    parser.add_argument("--out", type=Path, help="write every row here as JSON")
    parser.add_argument("--budget-s", type=float, help="stop starting steps after this long")
    args = parser.parse_args(argv)
    plan = SMOKE if args.cpu_smoke else FULL
    if args.budget_s is not None:
        plan = dataclasses.replace(plan, budget_s=args.budget_s)
    report = run(plan, args.out)
    print_table(report.rows)
    moved = [r for r in report.rows if r["kind"] == "residency" and r["parameters_moved_per_call"]]
    return 1 if moved else 0


if __name__ == "__main__":
    sys.exit(main())

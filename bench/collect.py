"""Collection speed, client memory, bytes per preset and HDF5 write throughput (docs/benchmarks.md).

    .venv/bin/python bench/collect.py                      # a few minutes on 2 cores, pi0_tiny
    .venv/bin/python bench/collect.py --server ws://H:P --max-steps 100 --trials 4 --rss-episodes 20

1. steps/s: `collect` with 1 and 2 workers (and, with --ray, the Ray backend with 1, 2 and 4
   actors on a local Ray) against a serial loop written like openpi's examples/libero/main.py (one
   process, openpi-client's WebsocketClientPolicy, latents requested at the same stride, nothing
   stored), same tasks, trials and server. Medians over --repeats.
2. client memory: peak RSS of a collecting process and its growth from episode 2 to the last
   (one task, --rss-episodes trials, in a subprocess of its own).
3. bytes per episode and per task for each preset, measured from the files written (pi0_tiny's
   shapes; full-size models: docs/data-format.md), extrapolated to 50 trials of the full horizon.
4. HDF5 write MB/s through the episode writer (real responses) against a raw sequential write of
   the same bytes to a plain file (both fsynced once at the end).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from latentpi.client.collect import CollectOptions, collect
from latentpi.client.collect.events import EpisodeDone
from latentpi.client.libero_env import (
    DUMMY_ACTION,
    LiberoObservation,
    close_env,
    list_tasks,
    load_init_states,
    make_env,
)
from latentpi.client.rollout import EpisodeResult, Sample, is_sampled
from latentpi.client.server_process import EmbeddedServer
from latentpi.client.storage import TaskHeader, TaskWriter
from latentpi.protocol.latent_spec import PRESETS
from latentpi.protocol.messages import PolicyResponse

SUITE = "libero_object"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", help="ws://HOST:PORT (default: an embedded pi0_tiny)")
    parser.add_argument("--tasks", type=int, default=2, help="tasks for the speed runs")
    parser.add_argument("--trials", type=int, default=2, help="trials per task for the speed runs")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--stride", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="speed runs per variant (median)")
    parser.add_argument("--rss-episodes", type=int, default=10)
    parser.add_argument("--short-steps", type=int, default=10, help="max steps for 2. and 3.")
    parser.add_argument("--write-mb", type=float, default=100.0, help="episode size for 4.")
    parser.add_argument("--skip", nargs="*", default=(), choices=("speed", "rss", "bytes", "write"))
    parser.add_argument(
        "--ray", action="store_true", help="also the Ray backend (1, 2, 4 actors, local Ray)"
    )
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        _rss_child(args)
        return
    if args.server:
        _run(args, args.server)
        return
    print("starting an embedded pi0_tiny server ...", file=sys.stderr)
    with EmbeddedServer("pi0_tiny") as server:
        _run(args, server.url)


def _run(args: argparse.Namespace, url: str) -> None:
    if "speed" not in args.skip:
        _speed(args, url)
    if "rss" not in args.skip:
        _rss(args, url)
    if "bytes" not in args.skip:
        _bytes(args, url)
    if "write" not in args.skip:
        _write(args, url)


def _options(out: Path, url: str, args: argparse.Namespace, **changes: Any) -> CollectOptions:
    base = CollectOptions(
        suite=SUITE,
        out=out,
        tasks=f"0:{args.tasks}",
        trials=args.trials,
        max_steps=args.max_steps,
        stride=args.stride,
        server=url,
    )
    return replace(base, **changes)


# -- 1. steps per second ---------------------------------------------------------------------------
def _speed(args: argparse.Namespace, url: str) -> None:
    """Two rates per variant: over the whole wall time, and from the first episode's start (after
    process start-up, imports and the first environment's construction) to the end."""
    list_tasks(SUITE)  # LIBERO's imports, once, outside every timing
    _warm_batches(url)
    if args.ray:  # one local Ray for every Ray row, with a CPU slot for each of 4 actors
        import ray

        ray.init(num_cpus=4, logging_level="WARNING", log_to_driver=False)
    runs: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for _ in range(args.repeats):
        runs["serial loop (openpi example)"].append(_openpi_loop(args, url))
        for workers in (1, 2):
            name = f"collect, {workers} worker{'s' * (workers > 1)}"
            runs[name].append(_collect_rates(args, url, workers))
        for actors in (1, 2, 4) if args.ray else ():
            name = f"collect --backend ray, {actors} actor{'s' * (actors > 1)}"
            runs[name].append(_collect_rates(args, url, actors, backend="ray"))
    base_wall, base_steady = (
        statistics.median(r[i] for r in runs[next(iter(runs))]) for i in (0, 1)
    )
    print(
        f"\n## steps/s ({args.tasks} tasks x {args.trials} trials x {args.max_steps}+10 steps,"
        f" stride {args.stride}, {os.cpu_count()} cores, median of {args.repeats})\n"
    )
    print("| variant | env steps/s, wall | x serial | env steps/s, after start-up | x serial |")
    print("| --- | --- | --- | --- | --- |")
    for name, values in runs.items():
        wall, steady = (statistics.median(v[i] for v in values) for i in (0, 1))
        print(
            f"| {name} | {wall:.2f} | {wall / base_wall:.2f} | {steady:.2f} | "
            f"{steady / base_steady:.2f} |"
        )


def _collect_rates(
    args: argparse.Namespace, url: str, workers: int, backend: str = "local"
) -> tuple[float, float]:
    done: list[tuple[float, EpisodeDone]] = []

    def on_event(event: object) -> None:
        if isinstance(event, EpisodeDone):
            done.append((time.monotonic(), event))

    with tempfile.TemporaryDirectory() as out:
        start = time.monotonic()
        options = _options(Path(out), url, args, workers=workers, backend=backend)
        collect(options, on_event=on_event, progress=False)
        end = time.monotonic()
    steps = sum(event.env_steps for _, event in done)
    first = min(at - event.duration_s for at, event in done)
    return steps / (end - start), steps / (end - first)


def _warm_batches(url: str, clients: int = 2, rounds: int = 4) -> None:
    """The server compiles each batch size on first use (its warm-up covers batch 1 only): send
    concurrent requests, plain and with latents, so that no timing below includes a compile."""
    import threading

    from latentpi.client.policy_client import LatentpiPolicyClient

    request = LiberoObservation(
        np.zeros((224, 224, 3), np.uint8), np.zeros((224, 224, 3), np.uint8), np.zeros(8)
    ).to_request("warm up")
    barrier = threading.Barrier(clients)

    def hammer() -> None:
        with LatentpiPolicyClient(url) as client:
            for i in range(rounds):
                barrier.wait()
                client.infer(request | ({"collect_latents": True} if i % 2 else {}))

    threads = [threading.Thread(target=hammer) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _openpi_loop(args: argparse.Namespace, url: str) -> tuple[float, float]:
    """openpi's examples/libero/main.py, as written there: one env per task, seed 7, settle 10
    steps, query every 5 steps; the latent request at the same stride, the response dropped."""
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    start, steps, first = time.monotonic(), 0, None
    policy = WebsocketClientPolicy(url)
    for task in list_tasks(SUITE)[: args.tasks]:
        env = make_env(task, seed=7)
        init_states = load_init_states(task)
        for trial in range(args.trials):
            first = time.monotonic() if first is None else first
            env.reset()
            obs = env.set_init_state(init_states[trial])
            plan: collections.deque[np.ndarray] = collections.deque()
            for t in range(args.max_steps + 10):
                if t < 10:
                    obs, _, done, _ = env.step(list(DUMMY_ACTION))
                    steps += 1
                    continue
                if not plan:
                    element = LiberoObservation.from_env(obs).to_request(task.instruction)
                    if is_sampled(t - 10, args.stride, 5):
                        element |= {"collect_latents": True, "latent_spec": "default"}
                    plan.extend(policy.infer(element)["actions"][:5])
                obs, _, done, _ = env.step(plan.popleft().tolist())
                steps += 1
                if done:
                    break
        close_env(env)
    end = time.monotonic()
    assert first is not None
    return steps / (end - start), steps / (end - first)


# -- 2. client memory --------------------------------------------------------------------------
def _rss(args: argparse.Namespace, url: str) -> None:
    with tempfile.TemporaryDirectory() as out:
        report = Path(out) / "rss.json"
        command = [sys.executable, __file__, "--rss-child", str(report), "--server", url]
        command += [
            "--short-steps",
            str(args.short_steps),
            "--rss-episodes",
            str(args.rss_episodes),
        ]
        subprocess.run(command, check=True)
        rss = json.loads(report.read_text())
    per_episode, peak = rss["per_episode_mb"], rss["peak_mb"]
    growth = (per_episode[-1] - per_episode[1]) / per_episode[1]
    print(
        f"\n## client memory (one task, {len(per_episode)} episodes of {args.short_steps} steps)\n"
    )
    print("| peak RSS MB | RSS after episode 2 MB | after the last MB | growth 2 -> last |")
    print("| --- | --- | --- | --- |")
    print(f"| {peak:.0f} | {per_episode[1]:.0f} | {per_episode[-1]:.0f} | {growth:+.2%} |")


def _rss_child(args: argparse.Namespace) -> None:
    per_episode: list[float] = []

    def on_event(event: object) -> None:
        if isinstance(event, EpisodeDone):
            per_episode.append(_status_mb("VmRSS"))

    with tempfile.TemporaryDirectory() as out:
        options = CollectOptions(
            suite=SUITE,
            out=Path(out),
            tasks="0",
            trials=args.rss_episodes,
            max_steps=args.short_steps,
            stride=args.stride,
            server=args.server,
        )
        collect(options, on_event=on_event, progress=False)
    report = {"per_episode_mb": per_episode, "peak_mb": _status_mb("VmHWM")}
    args.rss_child.write_text(json.dumps(report))


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


# -- 3. bytes per preset --------------------------------------------------------------------------
def _bytes(args: argparse.Namespace, url: str) -> None:
    print(
        f"\n## bytes per preset (pi0_tiny, one episode of {args.short_steps} steps, stride {args.stride})\n"
    )
    print("| preset | samples | KB / sample (file) | MB / task (50 trials, 280 steps, stride 5) |")
    print("| --- | --- | --- | --- |")
    for name in PRESETS:
        with tempfile.TemporaryDirectory() as out:
            result = collect(
                _options(
                    Path(out),
                    url,
                    args,
                    tasks="0",
                    trials=1,
                    latents=name,
                    max_steps=args.short_steps,
                ),
                progress=False,
            )
            row = result.tasks[0]
            samples = -(-args.short_steps // args.stride)
            per_sample = row.size_bytes / samples
            per_task = per_sample * 50 * (280 // 5)
            print(f"| {name} | {samples} | {per_sample / 1e3:.1f} | {per_task / 1e6:.1f} |")


# -- 4. write throughput ------------------------------------------------------------------------
def _write(args: argparse.Namespace, url: str) -> None:
    """Real responses (pi0_tiny; the synthetic full-size shape of the `default` preset too), written
    as one episode of ~--write-mb MB through the episode writer (incl. its publish: fsync, rename,
    index) and as raw bytes to a plain file (one fsync). Medians over --repeats."""
    from latentpi.client.policy_client import LatentpiPolicyClient

    task = list_tasks(SUITE)[0]
    with LatentpiPolicyClient(url) as client:
        metadata = client.metadata
        request = LiberoObservation(
            np.zeros((224, 224, 3), np.uint8), np.zeros((224, 224, 3), np.uint8), np.zeros(8)
        ).to_request(task.instruction)
        samples = {}
        for preset in ("default", "full"):
            wire = client.infer(request | {"collect_latents": True, "latent_spec": preset})
            response = PolicyResponse.from_wire(wire)
            samples[f"{preset} (pi0_tiny)"] = Sample(
                0, response.actions, np.zeros(8), response.latents, response.latent_layout
            )
    samples["default (pi0 full size)"] = _full_size_default()
    print(f"\n## HDF5 write throughput (one episode of ~{args.write_mb} MB, fsync once)\n")
    print(
        "| sample | compression | KB / sample | samples | episode writer MB/s | raw MB/s | x raw |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, sample in samples.items():
        nbytes = sum(a.nbytes for a in _sample_bytes(sample))
        count = max(2, min(5000, int(args.write_mb * 1e6 // nbytes)))
        for compression in ("none", "lzf"):
            h5 = statistics.median(
                _h5_write(task, metadata, sample, count, compression) for _ in range(args.repeats)
            )
            raw = statistics.median(_raw_write(sample, count) for _ in range(args.repeats))
            total = nbytes * count / 1e6
            print(
                f"| {name} | {compression} | {nbytes / 1e3:.1f} | {count} | {total / h5:.0f} | "
                f"{total / raw:.0f} | {raw / h5:.2f} |"
            )


def _full_size_default() -> Sample:
    """The `default` preset's arrays for full-size pi0 (docs/data-format.md: 5.7 MB per sample)."""
    import ml_dtypes

    rng = np.random.default_rng(0)

    def bf16(*shape: int) -> np.ndarray:
        return rng.normal(size=shape).astype(np.float32).astype(ml_dtypes.bfloat16)

    latents = {
        "expert_1_hidden_states": bf16(1, 19, 51, 1024),
        "text_only_hidden_states": bf16(19, 48, 2048),
        "prompt_mask": np.arange(48) < 12,
    }
    return Sample(0, np.zeros((50, 7), np.float32), np.zeros(8), latents, {})


def _sample_bytes(sample: Sample) -> list[np.ndarray]:
    arrays = [np.asarray(sample.timestep, np.int32), sample.actions, sample.state]
    return [np.ascontiguousarray(a) for a in [*arrays, *sample.latents.values()]]


def _h5_write(task: Any, metadata: dict, sample: Sample, count: int, compression: str) -> float:
    header = TaskHeader(
        task.suite, task.task_id, task.name, task.instruction, task.bddl_file,
        "pi0_tiny", "bench", PRESETS["default"], metadata,
    )  # fmt: skip
    with (
        tempfile.TemporaryDirectory() as out,
        TaskWriter(Path(out) / "task.h5", header, compression=compression) as writer,
    ):
        start = time.monotonic()
        with writer.episode(0, init_state_idx=0, seed=7) as episode:
            for _ in range(count):
                episode.add(sample)
            episode.finish(EpisodeResult(False, count, count, count, 0.0, 0))
        return time.monotonic() - start


def _raw_write(sample: Sample, count: int) -> float:
    arrays = _sample_bytes(sample)
    with tempfile.TemporaryDirectory() as out:
        path = Path(out) / "raw.bin"
        start = time.monotonic()
        with open(path, "wb") as f:
            for _ in range(count):
                for array in arrays:
                    f.write(array.tobytes())
            f.flush()
            os.fsync(f.fileno())
        return time.monotonic() - start


if __name__ == "__main__":
    main()

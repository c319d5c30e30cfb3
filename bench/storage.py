"""HDF5 storage: bytes per sample for every latent preset (computed), and compression measured.

Part 1 computes, from the protocol's own `latent_layouts`, the uncompressed bytes one sampled step
adds to a task file for each preset on pi0 and pi0.5 (latents + actions + state + timestep; images
excluded, +2 x 150,528 bytes with --record-images), and per task for 50 episodes at the suites'
horizon with stride 5 (one sample per query).

Part 2 writes the same synthetic episodes with each compression and reports the medians of repeated
runs: write time per sample, bytes on disk per sample, time to read one layer of one sample, each
as a ratio against no compression measured in the same run. The data are bfloat16 hidden states
with per-channel scales (log-normal, like transformer residual streams) and a component shared
across positions, so shuffle+compression sees realistic exponent structure; real checkpoints'
numbers will differ (measure with a real collection).

Run: .venv/bin/python bench/storage.py [--samples 12] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from latentpi.client.rollout import EpisodeResult, Sample
from latentpi.client.storage import TaskFile, TaskHeader, TaskWriter
from latentpi.protocol import PRESETS, TokenLayout, preset
from latentpi.protocol.latent_layout import ModelShape, latent_layouts

IMAGE_SLOTS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


def model_shape(prompt: int, horizon: int, state_token: bool) -> ModelShape:
    expert_0 = tuple((slot, 256 * i, 256 * (i + 1)) for i, slot in enumerate(IMAGE_SLOTS))
    expert_0 += (("prompt", 768, 768 + prompt),)
    offset = 1 if state_token else 0
    expert_1 = ((("state", 0, 1),) if state_token else ()) + (
        ("actions", offset, offset + horizon),
    )
    return ModelShape(
        TokenLayout(expert_0, expert_1), depth=18, width=(2048, 1024), num_heads=8, num_steps=10
    )


MODELS = {
    "pi0": (model_shape(48, 50, True), 50),
    "pi05": (model_shape(200, 10, False), 10),
}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "bool": 1}
HORIZONS = {"libero_spatial": 220, "libero_10": 520}


def sample_bytes(preset_name: str, model: str) -> int:
    shape, horizon = MODELS[model]
    layouts = latent_layouts(preset(preset_name), shape)
    latents = sum(
        math.prod(layout.shape) * DTYPE_BYTES[layout.dtype] for layout in layouts.values()
    )
    return latents + horizon * 7 * 8 + 8 * 8 + 4  # actions float64, state float64, timestep int32


def print_sizes() -> None:
    print(
        "Bytes per sampled step (uncompressed) and per task (50 episodes, every step of stride 5 sampled)"
    )
    print(
        f"{'preset':<10}{'model':<7}{'MB/sample':>11}{'GB/task spatial':>17}{'GB/task libero_10':>19}"
    )
    for name in PRESETS:
        for model in MODELS:
            size = sample_bytes(name, model)
            per_task = [size * (steps // 5) * 50 / 1e9 for steps in HORIZONS.values()]
            print(
                f"{name:<10}{model:<7}{size / 1e6:>11.3f}{per_task[0]:>17.2f}{per_task[1]:>19.2f}"
            )


def synthetic_sample(rng: np.random.Generator, index: int, layouts: dict) -> Sample:
    latents = {}
    for name, layout in layouts.items():
        if layout.dtype == "bool":
            latents[name] = np.arange(layout.shape[0]) < 17
            continue
        width = layout.shape[-1]
        scale = np.exp(rng.normal(0.0, 1.0, size=width)).astype(np.float32)
        shared = rng.normal(size=(*layout.shape[:-2], 1, width)).astype(np.float32)
        noise = rng.normal(size=layout.shape).astype(np.float32)
        latents[name] = ((shared + 0.5 * noise) * scale).astype(ml_dtypes.bfloat16)
    return Sample(index * 5, rng.normal(size=(50, 7)), rng.normal(size=8), latents, layouts)


def header() -> TaskHeader:
    return TaskHeader(
        "libero_spatial", 0, "bench", "bench", "x.bddl", "pi0", "synthetic", preset("default")
    )


def measure(compression: str, samples: list[Sample], folder: Path) -> tuple[float, float, float]:
    path = folder / f"{compression}.h5"
    start = time.perf_counter()
    with (
        TaskWriter(path, header(), compression=compression) as writer,
        writer.episode(0, init_state_idx=0, seed=7) as out,
    ):
        for sample in samples:
            out.add(sample)
        out.finish(EpisodeResult(False, 5 * len(samples), len(samples), len(samples), 0.0, 0))
    write_s = (time.perf_counter() - start) / len(samples)
    disk = sum(p.stat().st_size for p in folder.rglob("*.h5") if compression in str(p)) / len(
        samples
    )
    with TaskFile(path) as task:
        array = task.episodes[0]["text_only_hidden_states"]
        start = time.perf_counter()
        for index in range(len(samples)):
            array[index, -1]
        read_s = (time.perf_counter() - start) / len(samples)
    return write_s, disk, read_s


def print_compression(count: int, repeats: int) -> None:
    rng = np.random.default_rng(0)
    layouts = latent_layouts(preset("default"), MODELS["pi0"][0])
    samples = [synthetic_sample(rng, index, layouts) for index in range(count)]
    results: dict[str, list[tuple[float, float, float]]] = {c: [] for c in ("none", "lzf", "gzip")}
    for _ in range(repeats):
        for compression in results:
            with tempfile.TemporaryDirectory() as folder:
                results[compression].append(measure(compression, samples, Path(folder)))
    median = {
        c: tuple(statistics.median(r[i] for r in runs) for i in range(3))
        for c, runs in results.items()
    }
    base = median["none"]
    print(
        f"\nCompression, preset 'default' on pi0 ({count} samples, median of {repeats}; ratios vs none)"
    )
    header_row = f"{'compression':<14}{'write ms':>10}{'x none':>8}{'MB/sample':>11}{'x none':>8}{'read layer ms':>15}{'x none':>8}"
    print(header_row)
    for name, (write_s, disk, read_s) in median.items():
        label = "gzip level 1" if name == "gzip" else name
        print(
            f"{label:<14}{write_s * 1e3:>10.1f}{write_s / base[0]:>8.2f}{disk / 1e6:>11.3f}"
            f"{disk / base[1]:>8.2f}{read_s * 1e3:>15.2f}{read_s / base[2]:>8.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print_sizes()
    print_compression(args.samples, args.repeats)


if __name__ == "__main__":
    main()

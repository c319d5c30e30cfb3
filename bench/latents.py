"""Cost of latent capture: plain inference vs the `default`, `full` and `attention` presets.

Claim: the `default` preset (prompt states of expert 0 at every layer + expert 1 at the last step,
bfloat16) costs at most 1.10x plain inference, because selection, pooling and casts happen inside
the compiled sampler and only the requested arrays leave the device.

Runs on the CPU by default with a CPU-sized model: `pi0_tiny` / `pi05_tiny` (the shared reference
sizes: Gemma width 64 / 32, depth 3, a 2-layer SigLIP of width 48, full 224x224 images so the token
counts are the real ones: 816 / 968 prefix tokens) with random weights. Each variant is compiled once,
then timed over `--calls` calls (actions and latents fetched to the host), interleaved round-robin so
machine load hits every variant alike; the table shows medians and ratios against plain measured in
the same run. On a GPU (`--config pi0 --dtype bfloat16`) the same script measures the real model.

    .venv/bin/python bench/latents.py [--config pi0_tiny] [--batch 1] [--calls 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

VARIANTS = ("plain", "default", "full", "attention")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", default="pi0_tiny", choices=["pi0_tiny", "pi05_tiny", "pi0", "pi05"]
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()

    import jax
    import numpy as np

    from latentpi.protocol.latent_spec import preset
    from latentpi.server.model import capture, configs
    from latentpi.server.model.pi0 import Observation, init_params

    config = configs.NAMED[args.config](args.dtype)
    params = init_params(config, jax.random.key(0))
    if args.dtype == "bfloat16":
        params = jax.tree.map(lambda p: p.astype(jax.numpy.bfloat16), params)
    rng = np.random.default_rng(0)
    batch, height, width = args.batch, *config.vision.image_size
    prompt_mask = np.arange(config.max_token_len)[None] < rng.integers(
        5, config.max_token_len, (batch, 1)
    )
    obs = Observation(
        images={
            s: rng.integers(0, 256, (batch, height, width, 3), np.uint8) for s in config.image_slots
        },
        image_masks={s: np.array([s != "right_wrist_0_rgb"] * batch) for s in config.image_slots},
        state=rng.standard_normal((batch, config.action_dim)).astype(np.float32),
        tokenized_prompt=np.where(prompt_mask, rng.integers(1, 1000, prompt_mask.shape), 0).astype(
            np.int32
        ),
        tokenized_prompt_mask=prompt_mask,
    )
    noise = rng.standard_normal((batch, config.action_horizon, config.action_dim)).astype(
        np.float32
    )
    sampler = capture.CompiledSampler(config)
    specs = {name: None if name == "plain" else preset(name) for name in VARIANTS}

    compile_s, latent_bytes = {}, {}
    for name, spec in specs.items():
        start = time.perf_counter()
        _, latents = sampler.sample_actions(params, obs, noise, spec)
        compile_s[name] = time.perf_counter() - start
        latent_bytes[name] = sum(value.nbytes for value in latents.values())
    times: dict[str, list[float]] = {name: [] for name in specs}
    for _ in range(args.calls):
        for name, spec in specs.items():
            start = time.perf_counter()
            sampler.sample_actions(params, obs, noise, spec)
            times[name].append((time.perf_counter() - start) * 1e3)

    base = statistics.median(times["plain"])
    print(
        f"{args.config} ({args.dtype}), batch {batch}, {args.calls} calls each, device {jax.devices()[0].platform}"
    )
    print(
        f"{'variant':<10} {'median ms':>10} {'vs plain':>9} {'latent KiB':>11} {'first call s':>13}"
    )
    for name in specs:
        median = statistics.median(times[name])
        print(
            f"{name:<10} {median:>10.1f} {median / base:>8.2f}x {latent_bytes[name] / 1024:>11.1f} {compile_s[name]:>13.1f}"
        )


if __name__ == "__main__":
    main()

"""Cost of interventions: each op against plain inference, and recompiles when only values change.

Claim: an intervention costs at most 1.15x plain inference (the edit is a select per layer at its
site, inside the same compiled program), and new values (vectors, scales, patches) never recompile.

`pi0_tiny` / `pi05_tiny` with random weights on this CPU (see bench/latents.py for the sizes),
batch 1, vectorized (no row-by-row map). Every variant is compiled once, then timed over `--calls`
calls, interleaved round-robin so that machine load hits every variant alike; medians and ratios
against plain from the same run. The recompile count runs `add` with `--values` different vectors
and scales and counts the sampler's compiled functions before and after.

    .venv/bin/python bench/interventions.py [--config pi0_tiny] [--calls 15] [--values 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def interventions(config: Any, rng: np.random.Generator) -> dict[str, list[Any]]:
    """One intervention per op, at a site typical of its use."""
    from latentpi.protocol.interventions import Intervention, Site

    w0, w1 = config.expert_0.width, config.expert_1.width
    return {
        "plain": [],
        "add (expert 0 prompt, 2 layers)": [
            Intervention(
                "add",
                Site(0, "residual", layers=(1, 2), segment="prompt"),
                scale=2.0,
                vector=rng.standard_normal(w0).astype(np.float32),
            )
        ],
        "set (expert 1 residual, all)": [
            Intervention(
                "set",
                Site(1, "residual", layers=(2,)),
                value=rng.standard_normal(w1).astype(np.float32),
            )
        ],
        "ablate (expert 1 attn_out)": [Intervention("ablate", Site(1, "attn_out", layers=(0,)))],
        "scale_units (expert 0 mlp)": [
            Intervention(
                "scale_units",
                Site(0, "mlp_hidden", layers=(1,)),
                units=(0, 3, 7),
                factors=np.array([4.0, 4.0, 0.0], np.float32),
            )
        ],
        "attention_knockout (actions→prompt)": [
            Intervention("attention_knockout", query=(1, "actions"), key=(0, "prompt"))
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="pi0_tiny", choices=["pi0_tiny", "pi05_tiny"])
    parser.add_argument("--calls", type=int, default=15)
    parser.add_argument("--values", type=int, default=5)
    args = parser.parse_args()

    import jax

    from latentpi.server.model import capture, configs
    from latentpi.server.model.intervene import model_dims, plan_of, stack_values
    from latentpi.server.model.pi0 import init_params

    config = configs.NAMED[args.config]("float32")
    params = jax.device_put(init_params(config, jax.random.key(0)), jax.devices()[0])
    rng = np.random.default_rng(0)
    obs, noise = _inputs(config, rng)
    sampler = capture.CompiledSampler(config)
    dims = model_dims(config)

    def call_for(entries: list[Any]) -> Callable[[], Any]:
        if not entries:
            return lambda: sampler.sample_actions(params, obs, noise)
        resolved = [entry.resolve(dims, i) for i, entry in enumerate(entries)]
        plan = plan_of(config, resolved)
        values = stack_values([tuple(entry.values() for entry in resolved)])
        return lambda: sampler.sample_actions(params, obs, noise, edits=plan, edit_values=values)

    calls = {name: call_for(entries) for name, entries in interventions(config, rng).items()}
    first_s = {name: _seconds(call) for name, call in calls.items()}  # compiles
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.calls):
        for name, call in calls.items():
            times[name].append(_seconds(call) * 1000)
    recompiles = _recompiles_for_new_values(config, sampler, params, obs, noise, args.values)

    base = statistics.median(times["plain"])
    print(f"{args.config}, batch 1, {args.calls} calls each, device {jax.devices()[0].platform}")
    print(f"{'variant':<38} {'median ms':>10} {'vs plain':>9} {'first call s':>13}")
    for name in calls:
        median = statistics.median(times[name])
        print(f"{name:<38} {median:>10.1f} {median / base:>8.2f}x {first_s[name]:>13.1f}")
    print(f"compiled functions added by {args.values} new add values: {recompiles}")


def _recompiles_for_new_values(
    config: Any, sampler: Any, params: Any, obs: Any, noise: Any, count: int
) -> int:
    from latentpi.protocol.interventions import Intervention, Site
    from latentpi.server.model.intervene import model_dims, plan_of, stack_values

    rng = np.random.default_rng(1)
    before = len(sampler.cached_keys())
    for _ in range(count):
        entry = Intervention(
            "add",
            Site(0, "residual", layers=(1, 2), segment="prompt"),
            scale=float(rng.uniform(-5, 5)),
            vector=rng.standard_normal(config.expert_0.width).astype(np.float32),
        ).resolve(model_dims(config))
        values = stack_values([(entry.values(),)])
        sampler.sample_actions(
            params, obs, noise, edits=plan_of(config, [entry]), edit_values=values
        )
    return len(sampler.cached_keys()) - before


def _inputs(config: Any, rng: np.random.Generator) -> tuple[Any, np.ndarray]:
    from latentpi.server.model.pi0 import Observation

    height, width = config.vision.image_size
    prompt_mask = np.arange(config.max_token_len)[None] < 12
    obs = Observation(
        images={
            s: rng.integers(0, 256, (1, height, width, 3), np.uint8) for s in config.image_slots
        },
        image_masks={s: np.array([s != "right_wrist_0_rgb"]) for s in config.image_slots},
        state=rng.standard_normal((1, config.action_dim)).astype(np.float32),
        tokenized_prompt=np.where(prompt_mask, rng.integers(1, 500, prompt_mask.shape), 0).astype(
            np.int32
        ),
        tokenized_prompt_mask=prompt_mask,
    )
    noise = rng.standard_normal((1, config.action_horizon, config.action_dim)).astype(np.float32)
    return obs, noise


def _seconds(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()

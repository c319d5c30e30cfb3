"""Build a `PolicyEngine` from a named serving config: weights, tokenizer, norm stats, compile."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

from latentpi.protocol.latent_spec import DEFAULT_PRESET, preset
from latentpi.server.engine import PolicyEngine
from latentpi.server.serving import ServingConfig, load_tokenizer, tiny_norm_stats
from latentpi.server.settings import ServerSettings

logger = logging.getLogger(__name__)


def default_compile_cache() -> Path:
    """Where compiled XLA programs persist across processes ($LATENTPI_COMPILE_CACHE to move it,
    "off" to disable): a restarted tiny server starts in ~10 s instead of ~60 s on 2 cores."""
    return Path(
        os.environ.get("LATENTPI_COMPILE_CACHE", Path.home() / ".cache" / "latentpi" / "xla")
    )


def enable_compile_cache(path: Path | None) -> None:
    import jax

    if path is None or str(path) == "off":
        return
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def load_weights(config: ServingConfig, device: Any = None) -> Any:
    """The config's weights as committed arrays on `device` (default: the serving device), in the
    model dtype; a checkpoint is restored straight to the device, in bounded groups."""
    import jax

    from latentpi.server import device as _device
    from latentpi.server.model.checkpoint import load_params
    from latentpi.server.model.pi0 import init_params, param_shapes

    device = device or _device.serving_device()
    if config.checkpoint is None:
        # jit: eager flax init dispatches op by op and is ~10x slower even for tiny models.
        params = jax.jit(init_params, static_argnums=(0,))(
            config.model, jax.random.key(config.seed)
        )
        if config.model.dtype == "bfloat16":
            params = jax.tree.map(lambda x: x.astype("bfloat16"), params)
        params = _device.place(params, device)
    else:
        params = load_params(
            config.checkpoint,
            dtype=config.model.dtype,
            expected=param_shapes(config.model),
            sharding=_device.device_sharding(device),
        )
    _device.check_resident(params, device)
    return params


def save_random_checkpoint(config: ServingConfig, out_dir: str | os.PathLike[str]) -> Path:
    """The config's seeded random weights and the tiny norm stats, written as an openpi checkpoint
    (`params/` + `assets/<asset_id>/norm_stats.json`): lets tests and the GPU check load a model of
    any size through the real checkpoint path. Returns the checkpoint directory."""
    from latentpi.server.model.checkpoint import save_params
    from latentpi.server.norm_stats import save_norm_stats

    root = Path(out_dir)
    random = dataclasses.replace(config, checkpoint=None)
    save_params(root / "params", load_weights(random))
    save_norm_stats(root, tiny_norm_stats(), config.asset_id)
    return root


def load_norm_stats_for(config: ServingConfig) -> Any:
    if config.checkpoint is None:
        return tiny_norm_stats()
    from latentpi.server.download import maybe_download
    from latentpi.server.norm_stats import load_norm_stats

    return load_norm_stats(maybe_download(config.checkpoint), config.asset_id)


def build_engine(
    config: ServingConfig,
    settings: ServerSettings,
    *,
    warmup: bool = True,
    compile_cache: Path | None = None,
) -> PolicyEngine:
    """Load weights, tokenizer and norm stats; compile what `settings` asks to warm up.

    compile_cache: None uses `default_compile_cache()`; Path("off") disables it."""
    from latentpi.server.policy.libero import LiberoPolicyTransform

    enable_compile_cache(compile_cache or default_compile_cache())
    start = time.monotonic()
    transform = LiberoPolicyTransform(
        variant=config.model.variant,
        norm_stats=load_norm_stats_for(config),
        tokenizer=load_tokenizer(config, reject_overflow=settings.strict_prompts),
        action_horizon=config.model.action_horizon,
        max_token_len=config.model.max_token_len,
        action_dim=config.model.action_dim,
    )
    engine = PolicyEngine(
        model=config.model,
        params=load_weights(config),
        transform=transform,
        settings=settings,
        config_summary=config.summary(),
        seed=config.seed,
    )
    logger.info("loaded %s in %.1f s", config.name, time.monotonic() - start)
    if warmup:
        specs = (None, preset(DEFAULT_PRESET), *settings.warmup_specs)
        engine.warmup(tuple(dict.fromkeys(specs)), settings.warmup_batch_sizes)
        logger.info("compiled %s in %.1f s total", config.name, time.monotonic() - start)
    return engine

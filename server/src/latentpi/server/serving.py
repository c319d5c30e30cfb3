"""Named serving configurations (`latentpi serve --config NAME`) and how each becomes an engine.

`pi0_libero` / `pi05_libero` are openpi's LIBERO policies: full-size models, openpi's public
checkpoints, PaliGemma's tokenizer, bfloat16. `pi0_tiny` / `pi05_tiny` are the same policies around
small models with seeded random weights, a tokenizer trained on the spot and fixed norm stats: they
start on a 2-core CPU in seconds and are what tests, the demo and CI use. With random weights the
robot does not solve tasks — they exist to exercise the whole pipeline.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from latentpi.server.model import configs as model_configs
from latentpi.server.model.configs import ModelConfig
from latentpi.server.norm_stats import NormStats

logger = logging.getLogger(__name__)

LIBERO_ASSET_ID = "physical-intelligence/libero"
TINY_VOCAB_SIZE = 512


@dataclass(frozen=True)
class ServingConfig:
    name: str
    model: ModelConfig
    checkpoint: str | None  # None: seeded random weights
    tokenizer: str | None  # None: a tiny SentencePiece model trained at start-up
    asset_id: str = LIBERO_ASSET_ID
    seed: int = 0

    def with_checkpoint(self, checkpoint: str | None) -> ServingConfig:
        return self if checkpoint is None else dataclasses.replace(self, checkpoint=checkpoint)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "variant": self.model.variant,
            "dtype": self.model.dtype,
            "checkpoint": self.checkpoint or f"random weights (seed {self.seed})",
            "tokenizer": self.tokenizer or "tiny SentencePiece model trained at start-up",
            "asset_id": self.asset_id,
            "max_token_len": self.model.max_token_len,
            "prefix_len": self.model.prefix_len,
            "suffix_len": self.model.suffix_len,
        }


def _tiny(model: ModelConfig, name: str) -> ServingConfig:
    return ServingConfig(
        name=name,
        model=dataclasses.replace(model, vocab_size=TINY_VOCAB_SIZE),
        checkpoint=None,
        tokenizer=None,
    )


SERVING_CONFIGS: dict[str, ServingConfig] = {
    "pi0_libero": ServingConfig(
        "pi0_libero",
        model_configs.pi0("bfloat16"),
        checkpoint="gs://openpi-assets/checkpoints/pi0_libero",
        tokenizer="gs://big_vision/paligemma_tokenizer.model",
    ),
    "pi05_libero": ServingConfig(
        "pi05_libero",
        model_configs.pi05("bfloat16"),
        checkpoint="gs://openpi-assets/checkpoints/pi05_libero",
        tokenizer="gs://big_vision/paligemma_tokenizer.model",
    ),
    "pi0_tiny": _tiny(model_configs.pi0_tiny(), "pi0_tiny"),
    "pi05_tiny": _tiny(model_configs.pi05_tiny(), "pi05_tiny"),
}


def serving_config(name: str) -> ServingConfig:
    if name not in SERVING_CONFIGS:
        raise ValueError(
            f"--config: expected one of {', '.join(SERVING_CONFIGS)}, received {name!r}"
        )
    return SERVING_CONFIGS[name]


def tiny_norm_stats(state_dim: int = 8, action_dim: int = 7) -> dict[str, NormStats]:
    """Fixed LIBERO-like statistics for random-weight models: actions of moderate size, a state
    around the robot's usual pose. Quantiles are given so pi0.5's normalization works too."""

    def stats(dim: int, scale: float) -> NormStats:
        mean = np.zeros(dim, np.float32)
        std = np.full(dim, scale, np.float32)
        return NormStats(mean=mean, std=std, q01=mean - 2 * std, q99=mean + 2 * std)

    return {"state": stats(state_dim, 1.0), "actions": stats(action_dim, 0.3)}


def load_tokenizer(config: ServingConfig, *, reject_overflow: bool = False) -> Any:
    """The config's tokenizer; prompts over max_token_len are truncated with a warning (openpi's
    behaviour) unless `reject_overflow`."""
    from latentpi.server.policy.tokenizer import PromptTokenizer, train_tiny_tokenizer

    max_len = config.model.max_token_len
    if config.tokenizer is not None:
        return PromptTokenizer.from_file(config.tokenizer, max_len, reject_overflow=reject_overflow)
    with tempfile.TemporaryDirectory(prefix="latentpi-tokenizer-") as folder:
        path = train_tiny_tokenizer(folder, vocab_size=config.model.vocab_size)
        return PromptTokenizer.from_file(path, max_len, reject_overflow=reject_overflow)

"""Shared builders for protocol tests: a LIBERO observation and pi0's model shape."""

from __future__ import annotations

import numpy as np
import pytest

from latentpi.protocol.latent_spec import TokenLayout
from latentpi.protocol.messages import ServerMetadata

PI0_LAYOUT = TokenLayout(
    expert_0=(
        ("base_0_rgb", 0, 256),
        ("left_wrist_0_rgb", 256, 512),
        ("right_wrist_0_rgb", 512, 768),
        ("prompt", 768, 816),
    ),
    expert_1=(("state", 0, 1), ("actions", 1, 51)),
)
PI05_LAYOUT = TokenLayout(
    expert_0=(
        ("base_0_rgb", 0, 256),
        ("left_wrist_0_rgb", 256, 512),
        ("right_wrist_0_rgb", 512, 768),
        ("prompt", 768, 968),
    ),
    expert_1=(("actions", 0, 10),),
)


def pi0_metadata() -> ServerMetadata:
    return ServerMetadata(
        model="pi0",
        token_layout=PI0_LAYOUT,
        depth=(18, 18),
        width=(2048, 1024),
        num_heads=8,
        action_horizon=50,
        action_dim=7,
        num_steps=10,
        config={"checkpoint": "gs://openpi-assets/checkpoints/pi0_libero", "dtype": "bfloat16"},
    )


def pi05_metadata() -> ServerMetadata:
    return ServerMetadata(
        model="pi05", token_layout=PI05_LAYOUT, depth=(18, 18), width=(2048, 1024), num_heads=8,
        action_horizon=10, action_dim=7, num_steps=10,
    )  # fmt: skip


def libero_wire(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/state": rng.normal(size=8),
        "prompt": "put the black bowl on the plate",
    }


@pytest.fixture
def wire() -> dict:
    return libero_wire()

"""The parameter tree of full-size pi0 / pi0.5 is exactly openpi's (paths and shapes), checked
without allocating anything (jax.eval_shape)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from latentpi.protocol.errors import ValidationError
from latentpi.server.model import configs
from latentpi.server.model.pi0 import param_shapes

REFERENCE = Path("/work/shared/reference")


def _reference_tree(name: str) -> dict[str, tuple[int, ...]]:
    tree = {}
    for line in (REFERENCE / f"params_{name}.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        path, shape, *_ = line.split("\t")
        tree[path] = tuple(ast.literal_eval(shape))
    return tree


def _flat(shapes) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return {"/".join(key.key for key in path): tuple(leaf.shape) for path, leaf in leaves}


@pytest.mark.parametrize("name", ["pi0", "pi05"])
def test_full_size_tree_matches_openpi(name: str) -> None:
    ours = _flat(param_shapes(configs.NAMED[name]()))
    reference = _reference_tree(name)
    assert sorted(set(reference) - set(ours)) == []
    assert sorted(set(ours) - set(reference)) == []
    assert {path: shape for path, shape in ours.items() if reference[path] != shape} == {}


@pytest.mark.parametrize("name, total", [("pi0", 3_238_048_528), ("pi05", 3_353_433_872)])
def test_full_size_parameter_count(name: str, total: int) -> None:
    shapes = param_shapes(configs.NAMED[name]())
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes)) == total


@pytest.mark.parametrize("name", ["pi0_tiny", "pi05_tiny"])
def test_tiny_configs_match_reference_meta(name: str) -> None:
    with np.load(REFERENCE / f"{name}.npz") as data:
        meta = json.loads(bytes(data["meta_json"]).decode())
        stored = {
            key[len("params/") :]: data[key].shape
            for key in data.files
            if key.startswith("params/")
        }
    config = configs.ModelConfig.from_meta(meta)
    assert config == configs.NAMED[name]()
    assert (config.prefix_len, config.suffix_len) == (meta["prefix_len"], meta["suffix_len"])
    ours = _flat(param_shapes(config))
    embedding = "PaliGemma/llm/embedder/input_embedding"
    assert {path for path in stored if not path.startswith(embedding)} | {embedding} == set(ours)
    assert {
        path: shape for path, shape in stored.items() if path in ours and ours[path] != shape
    } == {}


def test_token_layout_from_config() -> None:
    layout = configs.token_layout(configs.pi0())
    assert layout.expert_0 == (
        ("base_0_rgb", 0, 256),
        ("left_wrist_0_rgb", 256, 512),
        ("right_wrist_0_rgb", 512, 768),
        ("prompt", 768, 816),
    )
    assert layout.expert_1 == (("state", 0, 1), ("actions", 1, 51))
    layout_05 = configs.token_layout(configs.pi05())
    assert layout_05.span(0, "prompt") == (768, 968)
    assert layout_05.expert_1 == (("actions", 0, 10),)
    # Nothing is hard-coded: a different image size and horizon move every segment.
    small = configs.ModelConfig(
        "pi0",
        configs.TINY_EXPERT_0,
        configs.TINY_EXPERT_1,
        configs.VisionConfig(
            width=8, depth=1, mlp_dim=8, num_heads=2, patch_size=(4, 4), image_size=(16, 16)
        ),
        action_horizon=3,
        max_token_len=5,
    )
    assert configs.token_layout(small).expert_0[-1] == ("prompt", 48, 53)
    assert configs.token_layout(small).length(1) == small.suffix_len == 4


def test_config_errors_name_the_field() -> None:
    meta = {"model": "pi0", "expert_0": {"width": 8}}
    with pytest.raises(
        ValidationError, match=r"meta_json\.vision: expected a Mapping, received None"
    ):
        configs.ModelConfig.from_meta(meta)
    meta["vision"] = {"width": 8, "depth": 1, "mlp_dim": 8, "num_heads": 2, "patch_size": [14, 14]}
    with pytest.raises(ValidationError, match=r"meta_json\.expert_0\.depth"):
        configs.ModelConfig.from_meta(meta)
    mismatched = configs.GemmaConfig(
        width=32, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=1, head_dim=16
    )
    with pytest.raises(ValidationError, match=r"model\.expert_1\.depth: expected 3"):
        configs.ModelConfig("pi0", configs.TINY_EXPERT_0, mismatched, configs.TINY_VISION)

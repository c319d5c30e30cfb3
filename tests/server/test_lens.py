"""The value-vector lens (`latentpi units`): a unit whose value vector is planted along one token's
embedding promotes that token first; scores equal an independent numpy computation; only the two
leaves it reads are restored from a checkpoint."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from latentpi.server.engine_factory import load_weights, save_random_checkpoint
from latentpi.server.lens import EMBEDDING, MLP_OUT, load_lens_params, value_vector_lens
from latentpi.server.serving import serving_config

LATENTPI = str(Path(sys.executable).with_name("latentpi"))


@pytest.fixture(scope="module")
def params() -> dict:
    return jax.device_get(load_weights(serving_config("pi0_tiny")))


def leaf(params: dict, path: tuple[str, ...]) -> np.ndarray:
    for key in path:
        params = params[key]
    return np.asarray(params)


def test_a_value_vector_along_a_token_embedding_promotes_that_token(params: dict) -> None:
    embedding = leaf(params, EMBEDDING)
    linear = leaf(params, MLP_OUT).copy()
    planted = {3: 101, 17: 250}  # unit -> token
    for unit, token in planted.items():
        linear[1, unit] = 20 * embedding[token] / np.linalg.norm(embedding[token])
    edited = {
        "PaliGemma": {
            "llm": {
                "embedder": {"input_embedding": embedding},
                "layers": {"mlp": {"linear": linear}},
            }
        }
    }
    lens = value_vector_lens(edited, layer=1, units=np.array(list(planted)), top_k=3)
    assert lens.token_ids[:, 0].tolist() == list(planted.values())


def test_scores_equal_an_independent_computation(params: dict) -> None:
    embedding, linear = leaf(params, EMBEDDING), leaf(params, MLP_OUT)
    lens = value_vector_lens(params, layer=2, units=np.array([0, 9, 63]), top_k=5)
    for row, unit in enumerate(lens.units):
        logits = embedding.astype(np.float64) @ linear[2, unit].astype(np.float64)
        best = np.argsort(-logits)[:5]
        assert lens.token_ids[row].tolist() == best.tolist()
        np.testing.assert_allclose(lens.scores[row], logits[best], rtol=1e-4, atol=1e-6)
    assert value_vector_lens(params, layer=0, top_k=2).units.size == linear.shape[1]  # all units


def test_bad_layer_units_and_top_k_are_named(params: dict) -> None:
    with pytest.raises(ValueError, match=r"--layer: expected 0\.\.2"):
        value_vector_lens(params, layer=3)
    with pytest.raises(ValueError, match=r"--units: expected indices in \[0, 128\)"):
        value_vector_lens(params, layer=0, units=np.array([128]))
    with pytest.raises(ValueError, match="--top-k"):
        value_vector_lens(params, layer=0, top_k=0)


def test_only_the_lens_leaves_are_read_from_a_checkpoint(tmp_path: Path, params: dict) -> None:
    tiny = serving_config("pi0_tiny")
    root = save_random_checkpoint(tiny, tmp_path / "ckpt")
    loaded = load_lens_params(dataclasses.replace(tiny, checkpoint=str(root)))
    assert sorted(
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(loaded)
    ) == [
        "['PaliGemma']['llm']['embedder']['input_embedding']",
        "['PaliGemma']['llm']['layers']['mlp']['linear']",
    ]
    np.testing.assert_array_equal(np.asarray(leaf(loaded, MLP_OUT)), leaf(params, MLP_OUT))


@pytest.mark.slow
def test_units_command_prints_and_writes_the_table(tmp_path: Path) -> None:
    out = tmp_path / "units.json"
    done = subprocess.run(
        [LATENTPI, "units", "--config", "pi0_tiny", "--layer", "1", "--top-k", "3", "--units", "0,5", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    table = json.loads(out.read_text())
    assert [row["unit"] for row in table["units"]] == [0, 5]
    assert all(len(row["tokens"]) == 3 and len(row["token_ids"]) == 3 for row in table["units"])
    assert "expert 0 layer 1" in done.stdout
    bad = subprocess.run(
        [LATENTPI, "units", "--config", "pi0_tiny", "--layer", "9"], capture_output=True, text=True, timeout=300
    )  # fmt: skip
    assert bad.returncode == 2 and "--layer: expected 0..2, received 9" in bad.stderr

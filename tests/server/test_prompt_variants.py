"""`prompt_variants`: the same observation and noise under other prompts in one call, over a real
server with the stock openpi-client; each variant equals a separate call with that prompt, bit for
bit, also when the variants outnumber --max-batch (the rows are chunked)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from loopback import PROMPTS, STOCK_CLIENT_WARNING, Clients, observation, serving, tiny_engine

from latentpi.protocol.latent_layout import LATENT_NAMES
from latentpi.server.embedded import RunningServer

pytestmark = pytest.mark.filterwarnings(STOCK_CLIENT_WARNING)


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with serving(tiny_engine("pi0_tiny")) as running:  # max_batch 8
        yield running


@pytest.fixture
def policy(server: RunningServer) -> Iterator[object]:
    with Clients() as clients:
        yield clients.stock(server)


def test_each_variant_equals_a_separate_call(policy: object) -> None:
    variants = [PROMPTS[1], PROMPTS[2], "do not put the black bowl on the plate"]
    result = policy.infer(  # type: ignore[attr-defined]
        observation(
            0, noise_seed=4, prompt=PROMPTS[0], latent_spec="default", prompt_variants=variants
        )
    )
    own = policy.infer(observation(0, noise_seed=4, prompt=PROMPTS[0], latent_spec="default"))  # type: ignore[attr-defined]
    np.testing.assert_array_equal(result["actions"], own["actions"])
    assert [v["prompt"] for v in result["prompt_variants"]] == variants
    for variant in result["prompt_variants"]:
        alone = policy.infer(  # type: ignore[attr-defined]
            observation(0, noise_seed=4, prompt=variant["prompt"], latent_spec="default")
        )
        np.testing.assert_array_equal(variant["actions"], alone["actions"])
        names = [name for name in LATENT_NAMES if name in alone]
        assert names and [name for name in LATENT_NAMES if name in variant] == names
        for name in names:
            np.testing.assert_array_equal(variant[name], alone[name])
    # The prompt matters: not every variant acts alike.
    assert not np.array_equal(result["prompt_variants"][0]["actions"], result["actions"])


def test_more_variants_than_max_batch_are_chunked(policy: object) -> None:
    variants = ["", *PROMPTS, *PROMPTS, "open the drawer"]  # 10 variants + own = 11 rows > 8
    result = policy.infer(observation(1, noise_seed=2, prompt_variants=variants))  # type: ignore[attr-defined]
    assert len(result["prompt_variants"]) == len(variants)
    # Equal prompts in different chunks give equal actions.
    first, second = result["prompt_variants"][1], result["prompt_variants"][5]
    assert first["prompt"] == second["prompt"]
    np.testing.assert_array_equal(first["actions"], second["actions"])
    empty = result["prompt_variants"][0]
    assert empty["prompt"] == "" and empty["actions"].shape == (50, 7)


def test_the_null_prompt_drives_a_request_as_it_does_a_variant(policy: object) -> None:
    """openpi tokenizes "" (BOS and the newline): a null-prompt rollout sends it as the prompt."""
    null = policy.infer(observation(2, noise_seed=5, prompt=""))  # type: ignore[attr-defined]
    other = policy.infer(observation(2, noise_seed=5, prompt_variants=[""]))  # type: ignore[attr-defined]
    np.testing.assert_array_equal(null["actions"], other["prompt_variants"][0]["actions"])
    assert not np.array_equal(null["actions"], other["actions"])


@pytest.mark.parametrize(
    ("variants", "message"),
    [
        (["x"] * 17, "prompt_variants: expected at most 16 strings"),
        (["fine", 3], "prompt_variants: expected at most 16 strings"),
        ("one prompt", "prompt_variants: expected a list of prompts"),
    ],
    ids=["too many", "not a string", "not a list"],
)
def test_bad_variants_are_named_and_the_connection_survives(
    policy: object, variants: object, message: str
) -> None:
    with pytest.raises(RuntimeError, match="bad request: ") as error:
        policy.infer(observation(2, prompt_variants=variants))  # type: ignore[attr-defined]
    assert message in str(error.value)
    assert policy.infer(observation(2))["actions"].shape == (50, 7)  # type: ignore[attr-defined]

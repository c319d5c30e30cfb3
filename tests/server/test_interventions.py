"""Interventions inside the served model (issue 13), on the tiny float32 engines and over a real
loopback server.

What is proven: a zero-effect intervention of every kind (`add` with scale 0, `scale_units` with
factors 1, `set` with the site's own recorded activations, for both experts and for expert-1 sites
restricted to denoising steps) is bit-identical to no intervention; patching prompt A's expert-0
states into a run with prompt B reproduces A's actions through the KV cache; knocking out every
query segment's attention to the prompt makes the actions independent of the prompt; `add` moves the
captured residual (the tap sees the edited stream) by exactly scale x vector at the site's positions
only; new values never recompile, a new structure compiles once; a batch of same-structure requests
gives each row its solo result; the stock openpi-client gets the record and clean errors.

Residual entry l of `expert_*_hidden_states` is the input of layer l, so the value that reproduces
a run at the residual of layers 0..depth-1 is entries 0..depth-1 of its recording.

Each new intervention structure compiles once (~10-25 s on 2 cores): the tests share a few
structures through module fixtures.
"""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from loopback import STOCK_CLIENT_WARNING, Clients, observation, serving, tiny_engine
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from prometheus_client.parser import text_string_to_metric_families

from latentpi.protocol.latent_layout import LATENT_NAMES
from latentpi.protocol.messages import PolicyRequest
from latentpi.server.embedded import RunningServer, start_server
from latentpi.server.engine import PolicyEngine
from latentpi.server.settings import ServerSettings

pytestmark = pytest.mark.filterwarnings(STOCK_CLIENT_WARNING)

# Two prompts of the same token length (8 with BOS and the end token) and different tokens.
PROMPT_A = "put the bowl on the plate"
PROMPT_B = "pick up the red cup"
FULL = {"preset": "full"}  # float32, every layer, position and step
SEED = 7  # one noise for A and B: only the prompt differs
DEPTH = 3  # the tiny configs
WIDTH_0, WIDTH_1 = 64, 32
PROMPT = slice(768, 816)  # pi0_tiny's prompt segment in expert 0's sequence

Result = dict[str, Any]


def infer(engine: PolicyEngine, obs: dict[str, Any]) -> Result:
    """One request through the engine alone (prepare + a batch of one)."""
    return engine.run_batch([engine.prepare(PolicyRequest.from_wire(obs))])[0]


def obs_a(**extra: Any) -> dict[str, Any]:
    return observation(0, prompt=PROMPT_A, noise_seed=SEED, **extra)


def obs_b(**extra: Any) -> dict[str, Any]:
    return observation(0, prompt=PROMPT_B, noise_seed=SEED, **extra)


def assert_identical(got: Result, expected: Result) -> None:
    """Actions and every latent bit for bit (float32 latents: assert_array_equal is exact)."""
    np.testing.assert_array_equal(got["actions"], expected["actions"])
    names = [name for name in LATENT_NAMES if name in expected]
    assert [name for name in LATENT_NAMES if name in got] == names
    for name in names:
        assert got[name].dtype == expected[name].dtype
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def unit_vector(seed: int, width: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=width).astype(np.float32)
    return v / np.float32(np.linalg.norm(v))


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pi0() -> PolicyEngine:
    return tiny_engine("pi0_tiny")


@pytest.fixture(scope="module")
def recorded(pi0: PolicyEngine) -> dict[str, Result]:
    """Prompts A and B, same images, state and noise, no intervention, every latent in float32."""
    return {"A": infer(pi0, obs_a(latent_spec=FULL)), "B": infer(pi0, obs_b(latent_spec=FULL))}


def test_the_two_prompts_have_the_same_token_length_and_different_actions(
    recorded: dict[str, Result],
) -> None:
    a, b = recorded["A"], recorded["B"]
    np.testing.assert_array_equal(a["prompt_mask"], b["prompt_mask"])
    assert a["prompt_mask"].sum() == 8
    assert a["expert_0_hidden_states"].dtype == np.float32
    assert a["expert_0_hidden_states"].shape == (DEPTH + 1, 816, WIDTH_0)
    assert a["expert_1_hidden_states"].shape == (10, DEPTH + 1, 51, WIDTH_1)
    # the prompt embeddings differ (entry 0), the images' do not
    assert max_diff(a["expert_0_hidden_states"][0, PROMPT], b["expert_0_hidden_states"][0, PROMPT])
    np.testing.assert_array_equal(
        a["expert_0_hidden_states"][0, :768], b["expert_0_hidden_states"][0, :768]
    )
    assert max_diff(a["actions"], b["actions"]) > 1e-3


# -- 1. zero effect -----------------------------------------------------------------------------------
def zero_effect_pi0(a: Result) -> list[dict[str, Any]]:
    """Every op in a zero-effect form, on both experts, at every point; expert-1 sites on chosen
    denoising steps. A `set` goes first at its point so that no later edit hides behind it."""
    rng = np.random.default_rng(1)
    h0, h1 = a["expert_0_hidden_states"], a["expert_1_hidden_states"]
    return [
        # A's own prompt states at every layer (entries 0..depth-1 = the layers' inputs)
        {"op": "set", "site": {"expert": 0, "segment": "prompt"}, "value": h0[:DEPTH, PROMPT]},
        # the action expert's own states at step 3 only
        {"op": "patch", "site": {"expert": 1, "steps": [3]}, "value": h1[3, :DEPTH]},
        {"op": "add", "site": {"expert": 0}, "scale": 0.0,
         "vector": rng.normal(size=WIDTH_0).astype(np.float32)},
        {"op": "add", "site": {"expert": 1, "steps": [2, 5], "layers": [0, 2]}, "scale": 0.0,
         "vector": rng.normal(size=(51, WIDTH_1)).astype(np.float32)},
        {"op": "add", "site": {"expert": 0, "point": "attn_out", "segment": "base_0_rgb"},
         "scale": 0.0, "vector": rng.normal(size=WIDTH_0).astype(np.float32)},
        {"op": "add", "site": {"expert": 1, "point": "attn_out", "segment": "actions"},
         "scale": 0.0, "vector": rng.normal(size=WIDTH_1).astype(np.float32)},
        {"op": "scale_units", "site": {"expert": 0, "point": "mlp_hidden", "segment": "prompt"},
         "units": [0, 5, 127], "factors": np.ones(3, np.float32)},
        {"op": "scale_units", "site": {"expert": 1, "point": "mlp_hidden", "steps": [0, 9]},
         "units": [1, 63], "factors": np.ones(2, np.float32)},
    ]  # fmt: skip


def test_zero_effect_interventions_are_bit_identical_to_none(
    pi0: PolicyEngine, recorded: dict[str, Result]
) -> None:
    interventions = zero_effect_pi0(recorded["A"])
    got = infer(pi0, obs_a(latent_spec=FULL, interventions=interventions))
    assert_identical(got, recorded["A"])
    assert [r["op"] for r in got["interventions"]] == [
        "set", "set", "add", "add", "add", "add", "scale_units", "scale_units",
    ]  # fmt: skip


def test_the_zero_effect_check_can_fail(pi0: PolicyEngine, recorded: dict[str, Result]) -> None:
    """The same structure with other values changes the run: the check above is not vacuous, and
    the step-restricted expert-1 `set` acts only from its step on."""
    a = recorded["A"]
    interventions = zero_effect_pi0(a)
    interventions[1]["value"] = a["expert_1_hidden_states"][4, :DEPTH]  # step 4's states at step 3
    got = infer(pi0, obs_a(latent_spec=FULL, interventions=interventions))
    h1, want = got["expert_1_hidden_states"], a["expert_1_hidden_states"]
    np.testing.assert_array_equal(h1[:3], want[:3])  # steps before the edit are untouched
    np.testing.assert_array_equal(h1[3, :DEPTH], want[4, :DEPTH])  # the tap sees the set values
    assert max_diff(got["actions"], a["actions"]) > 0
    np.testing.assert_array_equal(got["expert_0_hidden_states"], a["expert_0_hidden_states"])


# -- 2. patching --------------------------------------------------------------------------------------
def patch_prompt(source: Result) -> list[dict[str, Any]]:
    return [
        {
            "op": "set",
            "site": {"expert": 0, "segment": "prompt"},
            "value": source["expert_0_hidden_states"][:DEPTH, PROMPT],
        }
    ]


def test_patching_prompt_states_from_a_into_b_reproduces_a(
    pi0: PolicyEngine, recorded: dict[str, Result]
) -> None:
    """Every layer's prompt input from A's run, in a run with prompt B: the prefix KV cache is A's,
    so the action expert sees A's context and returns A's actions."""
    a, b = recorded["A"], recorded["B"]
    patched = infer(pi0, obs_b(interventions=patch_prompt(a)))
    np.testing.assert_allclose(patched["actions"], a["actions"], rtol=0, atol=1e-5)
    assert max_diff(patched["actions"], b["actions"]) > 1e-3
    assert patched["interventions"][0]["site"]["positions"] == [768, 816]
    # and back: B's states into A's run give B's actions
    back = infer(pi0, obs_a(interventions=patch_prompt(b)))
    np.testing.assert_allclose(back["actions"], b["actions"], rtol=0, atol=1e-5)


# -- 3. attention knockout --------------------------------------------------------------------------
def knockouts_of_the_prompt() -> list[dict[str, Any]]:
    """Every query segment but the prompt's own: the prefix is bidirectional (images read the
    prompt) and pi0's state token reads it too."""
    prompt = {"expert": 0, "segment": "prompt"}
    queries = [(1, "actions"), (1, "state")] + [
        (0, slot) for slot in ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
    ]
    return [
        {"op": "attention_knockout", "query": {"expert": e, "segment": s}, "key": prompt}
        for e, s in queries
    ]


def test_knocking_out_attention_to_the_prompt_makes_actions_independent_of_it(
    pi0: PolicyEngine, recorded: dict[str, Result]
) -> None:
    a = infer(pi0, obs_a(interventions=knockouts_of_the_prompt()))
    b = infer(pi0, obs_b(interventions=knockouts_of_the_prompt()))
    np.testing.assert_array_equal(a["actions"], b["actions"])
    assert max_diff(recorded["A"]["actions"], recorded["B"]["actions"]) > 1e-3
    assert max_diff(a["actions"], recorded["A"]["actions"]) > 1e-3  # the knockout acted
    assert a["interventions"][0] == {
        "op": "attention_knockout",
        "query": {"expert": 1, "segment": "actions"},
        "key": {"expert": 0, "segment": "prompt"},
        "layers": list(range(DEPTH)),
        "steps": list(range(10)),
    }
    assert "steps" not in a["interventions"][2]  # expert-0 queries: the prefix pass


def test_knocking_out_the_state_token_makes_actions_independent_of_the_state(
    pi0: PolicyEngine,
) -> None:
    """Expert-1 keys: in the suffix pass they come after the cached prefix keys. With actions ->
    state knocked out, pi0's robot state (only in its state token) no longer reaches the model's
    actions: the served actions then differ only by LIBERO's output transform, which adds the state
    back to the delta dimensions - the same shift at every step of the horizon."""
    knockout = [
        {
            "op": "attention_knockout",
            "query": {"expert": 1, "segment": "actions"},
            "key": {"expert": 1, "segment": "state"},
        }
    ]
    moved = obs_a()
    moved["observation/state"] = moved["observation/state"] + 0.5

    def spread(a: Result, b: Result) -> float:
        """How far b - a is from one shift for the whole horizon."""
        shift = b["actions"] - a["actions"]
        return float(np.abs(shift - shift[0]).max())

    plain = [infer(pi0, obs_a()), infer(pi0, moved)]
    assert spread(*plain) > 1e-3
    knocked = [
        infer(pi0, obs_a(interventions=knockout)),
        infer(pi0, {**moved, "interventions": knockout}),
    ]
    assert spread(*knocked) < 1e-6
    assert max_diff(knocked[0]["actions"], plain[0]["actions"]) > 1e-3


# -- 4. steering --------------------------------------------------------------------------------------
STEER_LAYER = 1
STEER_SITE = {"expert": 0, "layers": [STEER_LAYER], "segment": "prompt", "positions": [2, 5]}
STEER_POSITIONS = slice(770, 773)
STEER_SCALE = 3.0


def steer(vector: np.ndarray, scale: float) -> list[dict[str, Any]]:
    return [{"op": "add", "site": STEER_SITE, "scale": scale, "vector": vector}]


@pytest.fixture(scope="module")
def steered(pi0: PolicyEngine, recorded: dict[str, Result]) -> Result:
    return infer(pi0, obs_a(latent_spec=FULL, interventions=steer(unit_vector(2, WIDTH_0), 3.0)))


def assert_moved(got: Result, base: Result, direction: np.ndarray, scale: float) -> None:
    """The captured residual entry STEER_LAYER moved by scale x direction at the site only."""
    h, h0 = got["expert_0_hidden_states"], base["expert_0_hidden_states"]
    np.testing.assert_array_equal(h[:STEER_LAYER], h0[:STEER_LAYER])
    moved = h[STEER_LAYER, STEER_POSITIONS] - h0[STEER_LAYER, STEER_POSITIONS]
    np.testing.assert_allclose(moved, np.broadcast_to(scale * direction, moved.shape), atol=2e-6)
    readout = (moved.astype(np.float64) @ direction) / float(direction @ direction)
    np.testing.assert_allclose(readout, scale, atol=1e-5)
    others = np.ones(816, bool)
    others[STEER_POSITIONS] = False
    np.testing.assert_array_equal(h[STEER_LAYER, others], h0[STEER_LAYER, others])
    assert max_diff(h[STEER_LAYER + 1], h0[STEER_LAYER + 1]) > 0  # and it flows on
    assert max_diff(got["actions"], base["actions"]) > 0


def test_add_moves_the_residual_read_out_by_the_scale(
    steered: Result, recorded: dict[str, Result]
) -> None:
    assert_moved(steered, recorded["A"], unit_vector(2, WIDTH_0), STEER_SCALE)
    assert steered["interventions"] == [
        {
            "op": "add",
            "site": {"expert": 0, "point": "residual", "layers": [1], "segment": "prompt",
                     "positions": [770, 773]},
            "scale": 3.0,
            "vector_shape": [WIDTH_0],
        }
    ]  # fmt: skip


# -- 5. compilation per structure ---------------------------------------------------------------------
def test_new_values_never_recompile_and_a_new_structure_compiles_once(
    pi0: PolicyEngine, steered: Result, recorded: dict[str, Result]
) -> None:
    keys = pi0.sampler.cached_keys()
    direction = unit_vector(3, WIDTH_0) * np.float32(2.0)  # not a unit vector this time
    again = infer(pi0, obs_a(latent_spec=FULL, interventions=steer(direction, -1.5)))
    assert pi0.sampler.cached_keys() == keys
    assert_moved(again, recorded["A"], direction, -1.5)  # the new values, not stale ones
    other_layers = [{**steer(direction, -1.5)[0], "site": {**STEER_SITE, "layers": [0]}}]
    infer(pi0, obs_a(interventions=other_layers))  # (no capture: a cheaper compile)
    after = pi0.sampler.cached_keys()
    assert len(after) == len(keys) + 1
    (new,) = [key for key in after if key not in keys]
    assert new[-1] is not None and new[-1].edits[0].layers == (0,)
    infer(pi0, obs_a(interventions=[{**other_layers[0], "scale": 4.0}]))  # new values again
    assert len(pi0.sampler.cached_keys()) == len(after)
    # a plain request still uses the function without intervention code
    plain = infer(pi0, obs_a(latent_spec=FULL))
    assert_identical(plain, recorded["A"])
    assert len(pi0.sampler.cached_keys()) == len(after)


# -- 6. batches ---------------------------------------------------------------------------------------
def batch_requests() -> list[dict[str, Any]]:
    """Three requests of one structure with other values, observations and noise."""
    return [
        obs_a(latent_spec=FULL, interventions=steer(unit_vector(2, WIDTH_0), STEER_SCALE)),
        obs_b(latent_spec=FULL, interventions=steer(unit_vector(4, WIDTH_0), -2.0)),
        observation(2, noise_seed=11, latent_spec=FULL, interventions=steer(unit_vector(5, 64), 0)),
    ]


@pytest.fixture(scope="module")
def batched(pi0: PolicyEngine, steered: Result) -> list[Result]:
    prepared = [pi0.prepare(PolicyRequest.from_wire(r)) for r in batch_requests()]
    assert len({p.group for p in prepared}) == 1
    return pi0.run_batch(prepared)  # padded to 4: one compile


def test_a_batch_of_one_structure_gives_every_row_its_solo_result(
    pi0: PolicyEngine, batched: list[Result], steered: Result
) -> None:
    solo = [infer(pi0, request) for request in batch_requests()]
    assert_identical(solo[0], steered)
    for got, expected in zip(batched, solo, strict=True):
        assert_identical(got, expected)
        assert got["interventions"] == expected["interventions"]
    assert [r["interventions"][0]["scale"] for r in batched] == [3.0, -2.0, 0.0]
    # the row with scale 0 is the plain run of its observation
    plain = infer(pi0, observation(2, noise_seed=11, latent_spec=FULL))
    assert_identical(batched[2], plain)


def batch_stats(server: RunningServer) -> tuple[float, float]:
    """(model calls, requests in them) so far."""
    with urllib.request.urlopen(server.http_url + "/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return samples["latentpi_batch_size_count"], samples["latentpi_batch_size_sum"]


def concurrently(server: RunningServer, requests: Sequence[dict[str, Any]]) -> list[Any]:
    policies = [WebsocketClientPolicy(server.url) for _ in requests]
    barrier = threading.Barrier(len(requests))
    results: list[Any] = [None] * len(requests)

    def call(index: int) -> None:
        barrier.wait(30)
        try:
            results[index] = policies[index].infer(requests[index])
        except Exception as error:  # reported by the assertion below
            results[index] = error

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for policy in policies:
        policy._ws.close()  # the stock client has no close()
    assert all(isinstance(result, dict) for result in results), results
    return results


def test_concurrent_stock_clients_with_one_structure_share_a_model_call(
    pi0: PolicyEngine, batched: list[Result]
) -> None:
    settings = ServerSettings(port=0, max_batch=3, batch_window_ms=1500.0)
    with start_server(lambda: pi0, settings) as server:
        calls_before, rows_before = batch_stats(server)
        results = concurrently(server, batch_requests())
        calls, rows = batch_stats(server)
    assert (calls - calls_before, rows - rows_before) == (1, 3)
    for got, expected in zip(results, batched, strict=True):
        assert_identical(got, expected)
        assert got["interventions"] == expected["interventions"]


# -- 7. over the wire ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pi0_server(pi0: PolicyEngine) -> Iterator[RunningServer]:
    with serving(pi0) as server:
        yield server


@pytest.fixture
def clients() -> Iterator[Clients]:
    with Clients() as opened:
        yield opened


def walk(value: Any) -> Iterator[Any]:
    yield value
    if isinstance(value, dict):
        for item in value.values():
            yield from walk(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from walk(item)


def test_stock_client_gets_the_steered_result_and_its_record(
    pi0_server: RunningServer, clients: Clients, steered: Result
) -> None:
    policy = clients.stock(pi0_server)
    got = policy.infer(
        obs_a(latent_spec=FULL, interventions=steer(unit_vector(2, WIDTH_0), STEER_SCALE))
    )
    assert_identical(got, steered)
    assert got["interventions"] == steered["interventions"]
    assert not any(isinstance(v, np.ndarray) for v in walk(got["interventions"]))
    plain = policy.infer(obs_a())
    assert "interventions" not in plain
    assert max_diff(plain["actions"], got["actions"]) > 0


def test_codec_client_sends_bfloat16_vectors(
    pi0: PolicyEngine, pi0_server: RunningServer, clients: Clients
) -> None:
    vector = (unit_vector(6, WIDTH_0) * 3).astype(ml_dtypes.bfloat16)
    got = clients.codec(pi0_server).infer(obs_a(latent_spec=FULL, interventions=steer(vector, 0.5)))
    want = infer(pi0, obs_a(latent_spec=FULL, interventions=steer(vector.astype(np.float32), 0.5)))
    assert_identical(got, want)
    assert got["interventions"][0]["vector_shape"] == [WIDTH_0]


def _add(site: dict[str, Any], vector: Any = None, **extra: Any) -> dict[str, Any]:
    vector = np.ones(WIDTH_0, np.float32) if vector is None else vector
    return {"op": "add", "site": site, "vector": vector, **extra}


# (name, interventions, fragments of the error: "<field>: expected ..." and the received value)
BAD_INTERVENTIONS: list[tuple[str, Any, tuple[str, ...]]] = [
    ("unknown op", [_add({"expert": 0}) | {"op": "steer"}], ("interventions[0].op: expected one of add, set, patch", "'steer'")),
    ("unknown key", [_add({"expert": 0}) | {"vectr": 1}], ("interventions[0].vectr: expected one of",)),
    ("unknown site key", [_add({"expert": 0, "layer": 1})], ("interventions[0].site.layer: expected one of",)),
    ("wrong width", [_add({"expert": 0}, np.ones(WIDTH_1, np.float32))], ("interventions[0].vector: expected shape (64,) or (816, 64) or (3, 816, 64)", "shape (32,)")),
    ("layer out of range", [_add({"expert": 0, "layers": [3]})], ("interventions[0].site.layers: expected indices in [-3, 2]", "received 3 (int)")),
    ("step out of range", [_add({"expert": 1, "steps": [10]}, np.ones(WIDTH_1, np.float32))], ("interventions[0].site.steps: expected indices in [-10, 9]",)),
    ("unknown segment", [_add({"expert": 0, "segment": "nose"})], ("interventions[0].site.segment: expected a segment of expert 0 among base_0_rgb", "'nose'")),
    ("NaN vector", [_add({"expert": 0}, np.full(WIDTH_0, np.nan, np.float32))], ("interventions[0].vector: expected a finite float array", "NaN")),
    ("too many entries", [_add({"expert": 0})] * 17, ("interventions: expected 1 to 16 entries", "17 entries")),
    ("knockout of prefix queries onto the suffix", [{"op": "attention_knockout", "query": {"expert": 0, "segment": "prompt"}, "key": {"expert": 1, "segment": "actions"}}], ("interventions[0].key: expected an expert-0 segment for expert-0 queries",)),
    ("scale_units without matching factors", [{"op": "scale_units", "site": {"expert": 0, "point": "mlp_hidden"}, "units": [1, 2], "factors": np.ones(3, np.float32)}], ("interventions[0].factors: expected one factor per unit", "shape (3,)")),
    ("unit out of range", [{"op": "scale_units", "site": {"expert": 1, "point": "mlp_hidden"}, "units": [64], "factors": np.ones(1, np.float32)}], ("interventions[0].units: expected indices in [0, 64)",)),
    ("positions out of the segment", [_add({"expert": 0, "segment": "prompt", "positions": [40, 49]})], ("interventions[0].site.positions: expected [start, stop] with start < stop <= 48", "[40, 49]")),
    ("unknown point", [_add({"expert": 0, "point": "mlp"})], ("interventions[0].site.point: expected one of residual, attn_out, mlp_hidden", "'mlp'")),
    ("steps for expert 0", [_add({"expert": 0, "steps": [1]})], ("interventions[0].site.steps: expected null for expert 0",)),
    ("value for other layers", [{"op": "set", "site": {"expert": 0, "segment": "prompt", "layers": [0, 1]}, "value": np.ones((3, 48, WIDTH_0), np.float32)}], ("interventions[0].value: expected shape (64,) or (48, 64) or (2, 48, 64)", "shape (3, 48, 64)")),
    ("second entry bad", [_add({"expert": 0}), _add({"expert": 1, "segment": "prompt"}, np.ones(WIDTH_1, np.float32))], ("interventions[1].site.segment: expected a segment of expert 1 among state, actions",)),
    ("not a list", {"op": "add"}, ("interventions: expected a list of intervention maps",)),
    ("scale a string", [_add({"expert": 0}, scale="big")], ("interventions[0].scale: expected a number", "'big'")),
]  # fmt: skip


@pytest.mark.parametrize(
    "interventions, fragments",
    [case[1:] for case in BAD_INTERVENTIONS],
    ids=[case[0] for case in BAD_INTERVENTIONS],
)
def test_bad_interventions_are_named_and_the_connection_keeps_serving(
    interventions: Any, fragments: tuple[str, ...], pi0_server: RunningServer, clients: Clients
) -> None:
    policy = clients.stock(pi0_server)
    with pytest.raises(RuntimeError, match="bad request: ") as error:
        policy.infer(observation(1, interventions=interventions))
    text = str(error.value)
    assert f"bad request: {fragments[0]}" in text, text
    for fragment in fragments[1:]:
        assert fragment in text, text
    assert "Traceback" not in text
    assert policy.infer(observation(1))["actions"].shape == (50, 7)


@pytest.mark.parametrize(
    "site", [{"expert": 1.0}, {"expert": 1, "positions": 3}], ids=["float expert", "int positions"]
)
def test_malformed_sites_are_bad_requests(
    site: dict[str, Any], pi0_server: RunningServer, clients: Clients
) -> None:
    policy = clients.stock(pi0_server)
    with pytest.raises(RuntimeError) as error:
        policy.infer(observation(1, interventions=[_add(site, np.ones(WIDTH_1, np.float32))]))
    assert "bad request: " in str(error.value), str(error.value)
    assert policy.infer(observation(1))["actions"].shape == (50, 7)


# -- the structure: shapes and the listed layer order ---------------------------------------------
def test_a_new_vector_shape_at_the_same_site_is_a_new_structure(
    pi0: PolicyEngine, steered: Result
) -> None:
    direction = unit_vector(2, WIDTH_0)
    per_position = np.tile(direction, (3, 1))
    got = infer(pi0, obs_a(latent_spec=FULL, interventions=steer(per_position, STEER_SCALE)))
    assert_identical(got, steered)


def test_per_layer_values_follow_the_listed_layer_order(
    pi0: PolicyEngine, recorded: dict[str, Result]
) -> None:
    """The patch of A's prompt states into B with the layers listed backwards (the same structure
    as the patch above: no compile) must still reproduce A."""
    a = recorded["A"]
    layers = [2, 1, 0]
    value = a["expert_0_hidden_states"][layers, PROMPT]
    site = {"expert": 0, "segment": "prompt", "layers": layers}
    got = infer(pi0, obs_b(interventions=[{"op": "set", "site": site, "value": value}]))
    np.testing.assert_allclose(got["actions"], a["actions"], rtol=0, atol=1e-5)


# -- 8. pi0.5 ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pi05() -> PolicyEngine:
    return tiny_engine("pi05_tiny")


@pytest.fixture(scope="module")
def pi05_base(pi05: PolicyEngine) -> Result:
    return infer(pi05, obs_a(latent_spec=FULL))


PI05_STEER = {"expert": 1, "layers": [1], "steps": [4], "segment": "actions"}


def pi05_interventions(base: Result, scale: float, factors: float) -> list[dict[str, Any]]:
    """One structure for both pi0.5 tests: a steer of the action expert at step 4, its own states
    set at step 7, FFN units of the prefix scaled."""
    return [
        {"op": "add", "site": PI05_STEER, "scale": scale, "vector": unit_vector(8, WIDTH_1)},
        {"op": "set", "site": {"expert": 1, "steps": [7]},
         "value": base["expert_1_hidden_states"][7, :DEPTH]},
        {"op": "scale_units", "site": {"expert": 0, "point": "mlp_hidden"}, "units": [3, 9],
         "factors": np.full(2, factors, np.float32)},
    ]  # fmt: skip


def test_pi05_zero_effect_is_bit_identical(pi05: PolicyEngine, pi05_base: Result) -> None:
    assert pi05_base["expert_1_hidden_states"].shape == (10, DEPTH + 1, 10, WIDTH_1)
    got = infer(pi05, obs_a(latent_spec=FULL, interventions=pi05_interventions(pi05_base, 0, 1)))
    assert_identical(got, pi05_base)


def test_pi05_steering_the_action_expert_at_one_step(pi05: PolicyEngine, pi05_base: Result) -> None:
    scale, direction = 2.5, unit_vector(8, WIDTH_1)
    got = infer(
        pi05, obs_a(latent_spec=FULL, interventions=pi05_interventions(pi05_base, scale, 1))
    )
    h, h0 = got["expert_1_hidden_states"], pi05_base["expert_1_hidden_states"]
    np.testing.assert_array_equal(
        got["expert_0_hidden_states"], pi05_base["expert_0_hidden_states"]
    )
    np.testing.assert_array_equal(h[:4], h0[:4])  # steps before 4
    np.testing.assert_array_equal(h[4, :1], h0[4, :1])  # layer 0's input at step 4
    moved = h[4, 1] - h0[4, 1]
    np.testing.assert_allclose(moved, np.broadcast_to(scale * direction, moved.shape), atol=2e-6)
    np.testing.assert_allclose(moved.astype(np.float64) @ direction, scale, atol=1e-5)
    assert max_diff(h[4, 2], h0[4, 2]) > 0
    assert max_diff(got["actions"], pi05_base["actions"]) > 1e-4
    assert got["interventions"][0]["site"] == {
        **PI05_STEER,
        "point": "residual",
        "positions": [0, 10],
    }

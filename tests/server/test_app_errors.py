"""Bad input over a real connection: every bad request is answered with an error frame that names
the field, the expected and the received value, and the same connection then serves the next
request; oversized frames close only their own connection (1009); the API key is checked at the
handshake (401)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from loopback import (
    API_KEY,
    SMALL_FRAME_BYTES,
    STOCK_CLIENT_WARNING,
    Clients,
    observation,
    serving,
    tiny_engine,
)
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from latentpi.protocol.codec import packb
from latentpi.protocol.errors import ValidationError
from latentpi.protocol.messages import PolicyRequest
from latentpi.server.embedded import RunningServer, start_server
from latentpi.server.engine import PolicyEngine, PreparedRequest
from latentpi.server.settings import ServerSettings

pytestmark = pytest.mark.filterwarnings(STOCK_CLIENT_WARNING)


@pytest.fixture(scope="module")
def pi0_engine() -> PolicyEngine:
    return tiny_engine("pi0_tiny")


@pytest.fixture(scope="module")
def pi0_server() -> Iterator[RunningServer]:
    with serving(tiny_engine("pi0_tiny")) as server:
        yield server


@pytest.fixture(scope="module")
def guarded_server() -> Iterator[RunningServer]:
    """pi0_tiny behind an API key and a 64 KiB frame limit."""
    with serving(
        tiny_engine("pi0_tiny"), api_key=API_KEY, max_frame_bytes=SMALL_FRAME_BYTES
    ) as server:
        yield server


@pytest.fixture
def clients() -> Iterator[Clients]:
    with Clients() as opened:
        yield opened


TRACEBACK_MARKERS = ("Traceback", 'File "', '.py", line')


@dataclass(frozen=True)
class BadRequest:
    name: str
    changes: dict[str, Any]  # wire keys to set; a value of MISSING removes the key
    message: Sequence[str]  # fragments the error must contain: field, expected, received


MISSING = object()
BAD_REQUESTS = [
    BadRequest(
        "missing state",
        {"observation/state": MISSING},
        ("observation/state: expected present", "nothing (missing key)"),
    ),
    BadRequest(
        "prompt not a str",
        {"prompt": 42},
        ("prompt: expected a str of at most 4096 characters", "received 42 (int)"),
    ),
    BadRequest(
        "prompt too long",
        {"prompt": "x" * 4097},
        ("prompt: expected a str of at most 4096 characters", "received 'xxxx"),
    ),
    BadRequest(
        "collect_latents not a bool",
        {"collect_latents": "yes"},
        ("collect_latents: expected a bool", "received 'yes' (str)"),
    ),
    BadRequest(
        "noise_seed negative",
        {"noise_seed": -3},
        ("noise_seed: expected null or an int in [0,", "received -3 (int)"),
    ),
    BadRequest(
        "image with 4 channels",
        {"observation/image": np.zeros((224, 224, 4), np.uint8)},
        (
            "observation/image: expected a uint8 or float array of shape (H, W, 3) or (3, H, W)",
            "received array of dtype uint8 and shape (224, 224, 4)",
        ),
    ),
    BadRequest(
        "float image outside [0, 1]",
        {"observation/image": np.full((224, 224, 3), 2.0, np.float32)},
        (
            "observation/image: expected uint8 (height, width, 3) or float in [0, 1]",
            "outside [0, 1]",
        ),
    ),
    BadRequest(
        "wrist image without channels",
        {"observation/wrist_image": np.zeros((224, 224), np.uint8)},
        ("observation/wrist_image: expected a uint8 or float array", "shape (224, 224)"),
    ),
    BadRequest(
        "image too tall",
        {"observation/image": np.zeros((4096, 1, 3), np.uint8)},
        ("observation/image: expected", "H, W <= 2048", "shape (4096, 1, 3)"),
    ),
    BadRequest(
        "state of 7",
        {"observation/state": np.zeros(7)},
        ("observation/state: expected a float array of shape (8,)", "shape (7,)"),
    ),
    BadRequest(
        "NaN state",
        {"observation/state": np.array([0, 1, np.nan, 0, 0, 0, 0, 0.0])},
        ("observation/state: expected finite values (no NaN or inf)", "nan"),
    ),
    BadRequest(
        "inf state",
        {"observation/state": np.array([0, 0, 0, 0, 0, 0, 0, -np.inf])},
        ("observation/state: expected finite values (no NaN or inf)", "-inf"),
    ),
    BadRequest(
        "unknown latent spec key",
        {"latent_spec": {"layerz": [0]}},
        ("latent_spec.layerz: expected one of", "'layers'", "received 'layerz' (str)"),
    ),
    BadRequest(
        "unknown preset",
        {"latent_spec": "everything"},
        ("latent_spec: expected a preset name among full, text", "received 'everything'"),
    ),
    BadRequest(
        "layer out of range",
        {"latent_spec": {"preset": "default", "layers": [4]}},  # depth 3: entries 0..3
        ("latent_spec.layers: expected indices in [-4, 3]", "received 4 (int)"),
    ),
    BadRequest(
        "unknown segment",
        {"latent_spec": {"segments_0": ["nose"]}},
        ("latent_spec.segments_0: expected segment names among base_0_rgb", "received 'nose'"),
    ),
]


def bad_observation(case: BadRequest) -> dict[str, Any]:
    obs = observation(0)
    for key, value in case.changes.items():
        if value is MISSING:
            del obs[key]
        else:
            obs[key] = value
    return obs


def assert_clean_error(text: str, fragments: Sequence[str]) -> None:
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"
    for marker in TRACEBACK_MARKERS:
        assert marker not in text


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=lambda case: case.name)
def test_bad_request_is_named_and_connection_survives(
    case: BadRequest, pi0_server: RunningServer, clients: Clients
) -> None:
    policy = clients.stock(pi0_server)
    with pytest.raises(RuntimeError, match="bad request: ") as error:
        policy.infer(bad_observation(case))
    assert_clean_error(str(error.value), case.message)
    assert policy.infer(observation(1))["actions"].shape == (50, 7)


LONG_PROMPT = "pick up the black bowl and put it on the plate " * 8  # > 48 tokens


def test_prompt_over_the_token_limit_is_truncated_with_a_warning_as_openpi_does(
    pi0_engine: PolicyEngine,
    pi0_server: RunningServer,
    clients: Clients,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tokenizer = pi0_engine.transform.tokenizer
    assert not tokenizer.reject_overflow and tokenizer.max_len == 48
    tokens, mask = tokenizer.tokenize(LONG_PROMPT)
    assert mask.all()  # every position filled: cut at 48, BOS first
    assert tokens[0] == tokenizer.bos_id
    assert tokens.tolist() == [tokenizer.bos_id, *tokenizer.encode(LONG_PROMPT.strip())][:48]
    policy = clients.stock(pi0_server)
    with caplog.at_level("WARNING", logger="latentpi.server.policy.tokenizer"):
        actions = policy.infer(observation(0, prompt=LONG_PROMPT, noise_seed=3))["actions"]
    assert "more than max_token_len 48: truncating" in caplog.text
    # Words past the limit change nothing: the model saw the same 48 tokens.
    longer = policy.infer(observation(0, prompt=LONG_PROMPT + " and more", noise_seed=3))
    np.testing.assert_array_equal(longer["actions"], actions)


def test_strict_prompts_refuse_what_does_not_fit() -> None:
    from latentpi.server.engine_factory import build_engine
    from latentpi.server.serving import serving_config

    strict = build_engine(
        serving_config("pi0_tiny"), ServerSettings(strict_prompts=True), warmup=False
    )
    assert strict.transform.tokenizer.reject_overflow
    request = PolicyRequest.from_wire(observation(0, prompt=LONG_PROMPT))
    with pytest.raises(ValidationError, match="prompt: expected at most 48 tokens"):
        strict.prepare(request)
    strict.prepare(PolicyRequest.from_wire(observation(0)))  # a prompt that fits is served


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"\xc1 not msgpack", ("bad frame: ",)),
        (packb(observation(0))[:-100], ("bad frame: ",)),
        (packb([1, 2, 3]), ("request: expected a map of observation fields", "[1, 2, 3]")),
        ("hello", ("frame: expected a binary msgpack frame, received a text frame",)),
    ],
    ids=["garbage", "truncated", "not a map", "text frame"],
)
def test_bad_frame_is_named_and_connection_survives(
    frame: bytes | str,
    message: Sequence[str],
    pi0_server: RunningServer,
    clients: Clients,
) -> None:
    client = clients.codec(pi0_server)
    reply = client.send(frame)
    assert isinstance(reply, str)
    assert_clean_error(reply, message)
    assert client.infer(observation(2))["actions"].shape == (50, 7)


@dataclass(frozen=True)
class MaybeFailing:
    prepared: PreparedRequest
    fail: bool

    @property
    def group(self) -> Any:
        return self.prepared.group


class FailingEngine:
    """The real engine, except that a model call with the prompt "fail" in its batch raises."""

    def __init__(self, engine: PolicyEngine) -> None:
        self.engine = engine

    def metadata(self) -> dict[str, Any]:
        return self.engine.metadata()

    def prepare(self, request: PolicyRequest) -> MaybeFailing:
        return MaybeFailing(self.engine.prepare(request), request.prompt == "fail")

    def run_batch(self, items: Sequence[MaybeFailing]) -> list[dict[str, Any]]:
        if any(item.fail for item in items):
            raise RuntimeError('secret detail in File "/srv/model.py", line 1')
        return self.engine.run_batch([item.prepared for item in items])


def test_internal_error_reaches_the_client_without_details(
    pi0_engine: PolicyEngine, clients: Clients
) -> None:
    with start_server(lambda: FailingEngine(pi0_engine), ServerSettings(port=0)) as server:
        client = clients.codec(server)
        reply = client.send(packb(observation(0, prompt="fail")))
        assert reply == "internal server error (details are in the server log)"
        assert client.infer(observation(0))["actions"].shape == (50, 7)


# -- frame size and API key -----------------------------------------------------------------------
AUTH = {"Authorization": f"Api-Key {API_KEY}"}


def test_oversized_frame_closes_only_its_connection(
    guarded_server: RunningServer, clients: Clients
) -> None:
    bystander = clients.codec(guarded_server, additional_headers=AUTH)
    sender = clients.codec(guarded_server, additional_headers=AUTH)
    big = packb(observation(0, side=224))
    assert len(big) > SMALL_FRAME_BYTES
    with pytest.raises(ConnectionClosed) as closed:
        sender.send(big)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    result = bystander.infer(observation(1, side=64))  # the server resizes small images
    assert result["actions"].shape == (50, 7)


def test_api_key_accepted_from_the_stock_client(
    guarded_server: RunningServer, clients: Clients
) -> None:
    policy = clients.stock(guarded_server, api_key=API_KEY)
    assert policy.get_server_metadata()["model"] == "pi0"
    assert policy.infer(observation(2, side=64))["actions"].shape == (50, 7)


@pytest.mark.parametrize(
    "headers",
    [None, {"Authorization": "Api-Key wrong"}, {"Authorization": f"Bearer {API_KEY}"}],
    ids=["missing", "wrong", "other scheme"],
)
def test_missing_or_wrong_api_key_is_refused_with_401(
    headers: dict[str, str] | None, guarded_server: RunningServer
) -> None:
    with pytest.raises(InvalidStatus) as refused:
        connect(guarded_server.url, additional_headers=headers, open_timeout=10)
    assert refused.value.response.status_code == 401
    assert b"API key" in refused.value.response.body


def test_stock_client_with_wrong_key_is_refused(
    guarded_server: RunningServer, clients: Clients
) -> None:
    with pytest.raises(InvalidStatus) as refused:
        clients.stock(guarded_server, api_key="wrong")
    assert refused.value.response.status_code == 401


def test_binds_loopback_by_default(pi0_server: RunningServer) -> None:
    assert ServerSettings().host == "127.0.0.1"
    bound = {
        sock.getsockname()[0] for listener in pi0_server.server.servers for sock in listener.sockets
    }
    assert bound == {"127.0.0.1"}

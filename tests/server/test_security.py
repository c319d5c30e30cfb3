"""Security on real connections: API keys from a file or the environment and never logged, TLS
(wss://) with a certificate made here and verified by the client, no key on a command line, and
nothing but a failure's kind on the unauthenticated HTTP endpoints (docs/security.md)."""

from __future__ import annotations

import copy
import logging
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import hostile
import pytest
from certificates import TlsFiles, make_tls_files
from loopback import STOCK_CLIENT_WARNING, Clients, observation, serving, tiny_engine
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from latentpi.client.policy_client import (
    Backoff,
    LatentpiPolicyClient,
    ServerRejected,
    ServerUnavailable,
)
from latentpi.client.server_process import EmbeddedServer
from latentpi.protocol.api_key import ApiKeyError, resolve_api_key
from latentpi.protocol.codec import packb
from latentpi.protocol.latent_layout import ModelShape, latent_bytes, latent_layouts
from latentpi.protocol.latent_spec import LatentSpec, preset
from latentpi.protocol.messages import ServerMetadata
from latentpi.server.auth import is_authorized
from latentpi.server.embedded import RunningServer
from latentpi.server.model import configs as model_configs
from latentpi.server.model.configs import token_layout
from latentpi.server.settings import DEFAULT_MAX_RESPONSE_BYTES, ServerSettings

pytestmark = pytest.mark.filterwarnings(STOCK_CLIENT_WARNING)

KEY = "s3cret-Key-91be7"
ONE_TRY = Backoff(attempts=1)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_server(tls_files: TlsFiles) -> Iterator[RunningServer]:
    engine = tiny_engine("pi0_tiny")
    with serving(
        engine, api_key=KEY, tls_certfile=tls_files.cert, tls_keyfile=tls_files.key
    ) as server:
        yield server


@pytest.fixture
def clients() -> Iterator[Clients]:
    with Clients() as opened:
        yield opened


# -- where a key comes from ------------------------------------------------------------------------
def test_key_sources_in_order(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(f"  {KEY}\n")
    key_file.chmod(0o600)
    env = {"LATENTPI_API_KEY": "from-env", "LATENTPI_API_KEY_FILE": str(key_file)}
    assert resolve_api_key("from-option", key_file, env) == "from-option"
    assert resolve_api_key(None, key_file, env) == KEY
    assert resolve_api_key(None, None, env) == "from-env"
    assert resolve_api_key(None, None, {"LATENTPI_API_KEY_FILE": str(key_file)}) == KEY
    assert resolve_api_key(None, None, {}) is None


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "a non-empty key"),
        (b"\n\n", "a non-empty key"),
        (b"two words-" + KEY.encode(), "visible ASCII characters without spaces"),
        (b"\xff\xfe" + KEY.encode(), "an ASCII key"),
        (b"k" * 5000, "a key file of at most 4096 bytes"),
    ],
    ids=["empty", "blank lines", "space", "binary", "huge"],
)
def test_bad_key_files_are_named_and_the_key_never_echoed(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(content)
    with pytest.raises(ApiKeyError, match=expected) as refused:
        resolve_api_key(None, key_file, {})
    assert str(refused.value).startswith("--api-key-file: expected")
    assert KEY not in str(refused.value) and "kkkk" not in str(refused.value)


def test_missing_key_file_names_source_and_path(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    with pytest.raises(ApiKeyError, match=f"LATENTPI_API_KEY_FILE: .*{missing}"):
        resolve_api_key(None, None, {"LATENTPI_API_KEY_FILE": str(missing)})


def test_a_key_file_others_can_read_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    key_file.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        assert resolve_api_key(None, key_file, {}) == KEY
    assert "readable by other users" in caplog.text and KEY not in caplog.text


def test_settings_never_show_the_key() -> None:
    settings = ServerSettings(api_key=KEY)
    assert KEY not in repr(settings) and KEY not in str(settings)


def test_keys_of_any_length_are_compared_as_digests() -> None:
    """A wrong key of the right length, a prefix, a longer one and odd bytes are all refused."""
    assert is_authorized({"authorization": f"Api-Key {KEY}"}, KEY)
    for wrong in (KEY[:-1] + "X", KEY[:5], KEY + "0", "\udcff" * 3, "é" * 16):
        assert not is_authorized({"authorization": f"Api-Key {wrong}"}, KEY)


# -- the key never reaches a log ----------------------------------------------------------------
def test_the_key_never_reaches_a_log(
    tls_server: RunningServer, tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "wr0ng-presented-key-55"
    for name in ("", "uvicorn", "uvicorn.error", "websockets.server", "latentpi"):
        caplog.set_level(logging.DEBUG, logger=name)  # uvicorn set its own loggers to warning
    caplog.set_level(logging.DEBUG, logger="websockets.client")
    with LatentpiPolicyClient(tls_server.url, KEY, tls_ca=tls_files.ca) as client:
        client.infer(observation(0, side=64))
    with pytest.raises(ServerRejected, match="HTTP 401"):
        LatentpiPolicyClient(tls_server.url, wrong, tls_ca=tls_files.ca, backoff=ONE_TRY)
    names = {record.name for record in caplog.records}
    assert {"uvicorn.error", "websockets.client"} <= names, "nothing logged: the check is empty"
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert KEY not in text and wrong not in text and "Authorization: [redacted]" in text


# -- TLS -----------------------------------------------------------------------------------------
def test_wss_with_the_ca_serves(tls_server: RunningServer, tls_files: TlsFiles) -> None:
    assert tls_server.url.startswith("wss://")
    with LatentpiPolicyClient(tls_server.url, KEY, tls_ca=tls_files.ca) as client:
        assert client.infer(observation(1, side=64))["actions"].shape == (50, 7)


def test_an_untrusted_certificate_is_refused_not_retried(tls_server: RunningServer) -> None:
    with pytest.raises(ServerRejected, match="certificate not trusted"):
        LatentpiPolicyClient(tls_server.url, KEY, backoff=Backoff(attempts=50))


def test_the_ca_comes_from_the_environment_too(
    tls_server: RunningServer, tls_files: TlsFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LATENTPI_TLS_CA", str(tls_files.ca))
    with LatentpiPolicyClient(tls_server.url, KEY) as client:
        assert client.metadata["model"] == "pi0"


def test_a_bad_ca_file_is_named(tls_server: RunningServer, tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate")
    with pytest.raises(ValueError, match="tls_ca: expected a readable PEM file"):
        LatentpiPolicyClient(tls_server.url, KEY, tls_ca=not_pem)


def test_the_stock_client_speaks_wss(
    tls_server: RunningServer,
    tls_files: TlsFiles,
    clients: Clients,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """openpi-client takes a wss:// host as is and verifies with the default context, which
    honours SSL_CERT_FILE."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files.ca))
    policy = clients.stock(tls_server, api_key=KEY)
    assert policy.infer(observation(2, side=64))["actions"].shape == (50, 7)


def test_plain_ws_to_a_tls_port_gets_nothing(tls_server: RunningServer) -> None:
    plain = tls_server.url.replace("wss://", "ws://")
    with pytest.raises(ServerUnavailable):
        LatentpiPolicyClient(plain, KEY, backoff=ONE_TRY, open_timeout_s=10)


def test_health_over_https_needs_no_key(tls_server: RunningServer, tls_files: TlsFiles) -> None:
    context = ssl.create_default_context(cafile=str(tls_files.ca))
    with urllib.request.urlopen(f"{tls_server.http_url}/healthz", context=context) as reply:
        assert reply.status == 200
    with pytest.raises(InvalidStatus) as refused:
        connect(tls_server.url, ssl=context, open_timeout=10)
    assert refused.value.response.status_code == 401


def test_tls_needs_both_files(tls_files: TlsFiles, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tls_cert: expected --tls-cert and --tls-key together"):
        ServerSettings(tls_certfile=tls_files.cert)
    with pytest.raises(ValueError, match="tls_key: expected a PEM file"):
        ServerSettings(tls_certfile=tls_files.cert, tls_keyfile=tmp_path / "absent.key")


# -- the command line ------------------------------------------------------------------------------
def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", "from latentpi.cli import main; main()", "serve", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--api-key-file", "/nonexistent/key"], "--api-key-file: expected a readable key file"),
        (["--api-key", " "], "--api-key: expected a non-empty key"),
        (["--tls-cert", "/nonexistent.pem"], "--tls-cert: expected --tls-cert and --tls-key"),
        (["--max-queue", "0"], "--max-queue: expected 1..65536"),
        (["--max-programs", "0"], "--max-programs: expected 1..65536"),
        (["--max-response-bytes", "10"], "--max-response-bytes: expected 1 KiB..16 GiB"),
    ],
    ids=[
        "missing key file",
        "blank key",
        "cert without key",
        "no queue",
        "no programs",
        "tiny responses",
    ],
)
def test_serve_refuses_bad_security_options_before_loading(args: list[str], message: str) -> None:
    result = serve("--config", "pi0_tiny", "--port", "0", *args)
    assert result.returncode == 2 and message in result.stderr
    assert "loading" not in result.stderr


@pytest.mark.slow
def test_embedded_server_gets_its_key_outside_its_command_line(tls_files: TlsFiles) -> None:
    """`latentpi serve` with TLS and a key, as the collector starts it: the key is in no
    /proc/<pid>/cmdline, the server requires it, and a client trusting the CA is served."""
    extra = ["--tls-cert", str(tls_files.cert), "--tls-key", str(tls_files.key)]
    with EmbeddedServer("pi0_tiny", api_key=KEY, extra_args=extra) as server:
        url = server.wait_ready()
        assert url.startswith("wss://")
        assert KEY.encode() not in Path(f"/proc/{server.pid}/cmdline").read_bytes()
        with pytest.raises(ServerRejected, match="HTTP 401"):
            LatentpiPolicyClient(url, None, tls_ca=tls_files.ca, backoff=ONE_TRY)
        with LatentpiPolicyClient(url, KEY, tls_ca=tls_files.ca) as client:
            assert client.infer(observation(3, side=64))["actions"].shape == (50, 7)
        assert KEY not in server.log_tail()


# -- what one small request may make the server build ---------------------------------------------
def test_a_response_over_the_byte_limit_is_refused_before_running(clients: Clients) -> None:
    base = tiny_engine("pi0_tiny")
    shape = ServerMetadata.from_wire(base.metadata()).shape
    small = LatentSpec(expert_0=False, text_only=False, layers=(0,))
    one_row = latent_bytes(latent_layouts(small, shape))
    engine = copy.copy(base)  # the same compiled model, other settings
    engine.settings = base.settings.replace(max_response_bytes=4 * one_row)
    with serving(engine) as server:
        client = clients.codec(server)
        request = observation(4, side=64, latent_spec=small.to_wire())
        assert isinstance(client.send(packb(request)), bytes)
        refused = client.send(packb({**request, "latent_spec": "full"}))
        assert isinstance(refused, str)
        assert refused.startswith(
            f"bad request: latent_spec: expected a selection of at most {4 * one_row} bytes"
        )
        assert isinstance(client.send(packb({**request, "prompt_variants": [""] * 3})), bytes)
        too_many = client.send(packb({**request, "prompt_variants": [""] * 4}))
        assert isinstance(too_many, str) and "5 row(s)" in too_many
        assert isinstance(client.send(packb(request)), bytes)  # and it keeps serving


def test_the_default_limit_admits_pi0s_full_preset_but_not_seventeen() -> None:
    config = model_configs.pi0("bfloat16")
    widths = (config.expert_0.width, config.expert_1.width)
    shape = ModelShape(
        token_layout(config), config.depth, widths, config.expert_0.num_heads, config.num_steps
    )
    one = latent_bytes(latent_layouts(preset("full"), shape))
    assert one < DEFAULT_MAX_RESPONSE_BYTES < 17 * one


def test_a_malformed_text_frame_writes_no_traceback_to_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Any client may send invalid UTF-8 in a text frame: uvicorn logged an ERROR with a traceback
    for each; it is a warning line now, and the connection is closed with 1007."""
    uvicorn_log = logging.getLogger("uvicorn.error")  # uvicorn's loggers do not propagate
    with serving(tiny_engine("pi0_tiny")) as server:
        uvicorn_log.addHandler(caplog.handler)
        sock = hostile.tcp(server.host, server.port)
        try:
            assert hostile.handshake(sock, server.host, server.port).status == 101
            sock.sendall(hostile.frame(b"\xff\xfe", opcode=0x1))
            code, _ = hostile.read_until_closed(sock, timeout_s=10)
        finally:
            sock.close()
            uvicorn_log.removeHandler(caplog.handler)
    assert code == 1007
    records = [r for r in caplog.records if "Invalid UTF-8" in r.getMessage()]
    assert records and all(r.levelno == logging.WARNING and not r.exc_info for r in records)

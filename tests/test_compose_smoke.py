"""The compose stack for real: both images built (from a local debootstrap base where Docker Hub is
out of reach), `compose.cpu.yaml` up — the CPU server on pi0_tiny and the collector, host networking,
everything on loopback, an API key from the environment — the collector waiting for the server's
healthcheck, a short real LIBERO collection into a bind-mounted folder, the files checked here, the
stack brought down.

Minutes, a Docker engine and root: not part of `make test`. `make compose-smoke` starts the engine
(scripts/docker_engine.sh), sets LATENTPI_COMPOSE_SMOKE=1 and runs this module; the result and its
timings go to out/compose-smoke.json (docs/deploy.md keeps the history).
Environment: LATENTPI_BASE (a base image to use instead of making one), TORCH_INDEX."""

from __future__ import annotations

import functools
import glob
import http.server
import json
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import pytest

pytestmark = [
    pytest.mark.compose,
    pytest.mark.skipif(
        os.environ.get("LATENTPI_COMPOSE_SMOKE") != "1",
        reason="builds both images and runs the stack (minutes): `make compose-smoke`",
    ),
    pytest.mark.timeout(5400),
]

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "latentpi-smoke"
LOCAL_BASE = "latentpi-base:bookworm"
TORCH_INDEX_PORT = 18731  # fixed: the index URL is a build argument, part of the layer cache's key
TRIALS, MAX_STEPS = 2, 20
REPORT = ROOT / "out" / "compose-smoke.json"
CHECKS = 3  # the tests below, each adds its name to report["checks_passed"]
LATENT_NAMES = ("expert_0_hidden_states", "expert_1_hidden_states", "text_only_hidden_states")


def sh(command: list[str], env: dict[str, str], timeout: float, what: str) -> str:
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"{what}: exit {done.returncode}\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}")
    return done.stdout + done.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=5)
    except Exception:
        return False
    return True


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def local_torch_index() -> str | None:
    """Where PyTorch's CPU index is out of reach but a local torch wheel lies in a find-links folder
    (as on these machines): a one-package PEP 503 index on loopback for the client's build."""
    default = "https://download.pytorch.org/whl/cpu/torch/"
    if reachable(default):
        return None
    folders = (os.environ.get("PIP_FIND_LINKS", "") + " /opt/wheels").split()
    wheels = [
        w
        for f in folders
        for w in glob.glob(f"{f.removeprefix('file://')}/torch-*+cpu-cp311-*.whl")
    ]
    if not wheels:
        return None
    index = Path("/tmp/latentpi-torch-index")
    (index / "torch").mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        link = index / "torch" / Path(wheel).name
        if not link.exists():
            link.symlink_to(wheel)
    handler = functools.partial(QuietHandler, directory=str(index))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", TORCH_INDEX_PORT), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{TORCH_INDEX_PORT}/"


def image_size_mb(image: str, env: dict[str, str]) -> float:
    out = sh(["docker", "image", "inspect", "-f", "{{.Size}}", image], env, 60, "inspect")
    return round(int(out.strip()) / 1e6, 1)


def write_report(report: dict[str, Any], started: float) -> None:
    report["total_s"] = round(time.monotonic() - started, 1)
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\ncompose smoke: {json.dumps(report)}")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    started = time.monotonic()
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        state = bring_up_and_down(tmp_path_factory, report)
    except BaseException as error:  # pytest.fail raises a BaseException
        report["result"] = "failed: " + (str(error).strip().splitlines() or ["?"])[0][:300]
        write_report(report, started)
        raise
    report["checks_passed"] = []
    yield {**state, "report": report}
    report["result"] = "passed" if len(report["checks_passed"]) == CHECKS else "failed: checks"
    write_report(report, started)


def bring_up_and_down(
    tmp_path_factory: pytest.TempPathFactory, report: dict[str, Any]
) -> dict[str, Any]:
    """Base, builds, `up` until the collector exits, `down`: the state the checks look at."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LATENTPI_", "TORCH_INDEX"))}
    sh(["docker", "info"], env, 60, "no Docker engine answers (scripts/docker_engine.sh start)")
    compose = [
        shutil.which("docker-compose") or "docker-compose",
        "-p",
        PROJECT,
        "-f",
        "compose.cpu.yaml",
    ]

    base = os.environ.get("LATENTPI_BASE")
    if not base:
        start = time.monotonic()
        sh([str(ROOT / "scripts" / "make_base_image.sh"), LOCAL_BASE], env, 1800, "base image")
        report["base_image_s"] = round(time.monotonic() - start, 1)
        base = LOCAL_BASE
    # A TLS-intercepting proxy's CA (these machines'), trusted by the build stages only.
    for cert in glob.glob("/usr/local/share/ca-certificates/*.crt"):
        shutil.copyfile(cert, ROOT / "docker" / "certs" / Path(cert).name)
    torch_index = os.environ.get("TORCH_INDEX") or local_torch_index()

    data = tmp_path_factory.mktemp("compose-data")
    os.chown(data, 1000, 1000)  # the images' user (compose: LATENTPI_UID/GID)
    port = free_port()
    key = secrets.token_hex(16)
    env.update(
        LATENTPI_BASE=base,
        LATENTPI_DATA=str(data),
        LATENTPI_PORT=str(port),
        LATENTPI_API_KEY=key,
        LATENTPI_TRIALS=str(TRIALS),
        LATENTPI_MAX_STEPS=str(MAX_STEPS),
        LATENTPI_TASKS="0",
    )
    if torch_index:
        env["TORCH_INDEX"] = torch_index
    report.update(base=base, torch_index=torch_index or "default")

    for service in ("server", "client"):
        start = time.monotonic()
        sh([*compose, "build", service], env, 3600, f"build {service}")
        report[f"build_{service}_s"] = round(time.monotonic() - start, 1)
    report["size_server_cpu_mb"] = image_size_mb("latentpi-server:cpu", env)
    report["size_client_mb"] = image_size_mb("latentpi-client:latest", env)

    start = time.monotonic()
    try:
        log = sh(
            [*compose, "up", "--no-build", "--exit-code-from", "client"], env, 2400, "compose up"
        )
        report["up_s"] = round(time.monotonic() - start, 1)
    finally:
        sh([*compose, "down", "--volumes", "--remove-orphans"], env, 300, "compose down")
        left = sh(
            ["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}"],
            env,
            60,
            "docker ps",
        )
        report["left_running"] = left.split()
    return {"data": data, "log": log, "env": env, "key": key}


def test_the_collection_lands_on_the_host_with_episodes_success_and_latents(
    smoke: dict[str, Any],
) -> None:
    suite = smoke["data"] / "libero_spatial"
    files = sorted(suite.glob("task_0_*.h5"))
    assert len(files) == 1, sorted(p.name for p in suite.iterdir())
    assert not list(suite.glob("*.h5.d")), "the task was consolidated (all trials done)"
    assert files[0].stat().st_uid == 1000, "written by the image's user, not root"
    with h5py.File(files[0], "r") as f:
        assert f.attrs["model_config"] == "pi0_tiny"
        assert bool(f.attrs["random_weights"])
        episodes = sorted(k for k in f if k.startswith("episode_"))
        assert episodes == [f"episode_{k:04d}" for k in range(TRIALS)]
        for name in episodes:
            episode = f[name]
            assert "success" in episode.attrs and "error" not in episode.attrs
            assert 0 < int(episode.attrs["total_steps"]) <= MAX_STEPS
            n = int(episode.attrs["num_samples"])
            latents = [k for k in LATENT_NAMES if k in episode]
            assert n > 0 and latents, list(episode)
            for latent in latents:
                assert episode[latent].shape[0] == n
                assert episode[latent].size > 0
    table = json.loads((suite / "success.json").read_text())
    assert "all" in json.dumps(table)
    smoke["report"]["episodes"] = TRIALS
    smoke["report"]["checks_passed"].append("files")


def test_the_key_came_from_the_environment_and_stays_out_of_the_images(
    smoke: dict[str, Any],
) -> None:
    env = smoke["env"]
    for image in ("latentpi-server:cpu", "latentpi-client:latest"):
        inspect = sh(["docker", "image", "inspect", image], env, 60, "inspect")
        assert smoke["key"] not in inspect
        config = json.loads(inspect)[0]["Config"]
        assert config["User"] == "latentpi"
        assert not any(e.startswith("LATENTPI_API_KEY") for e in config["Env"])
        history = sh(["docker", "history", "--no-trunc", image], env, 60, "history")
        assert smoke["key"] not in history
    smoke["report"]["checks_passed"].append("key")


def test_the_images_hold_no_build_tools_or_caches(smoke: dict[str, Any]) -> None:
    probe = (
        "id -u; for t in uv gcc cc make; do command -v $t && echo FOUND $t; done; "
        "ls -d /app /root/.cache /opt/uv /var/lib/apt/lists/*Packages* 2>/dev/null | sed 's/^/FOUND /'; "
        "ls /usr/local/share/ca-certificates/latentpi 2>/dev/null | sed 's/^/FOUND /'; true"
    )
    for image in ("latentpi-server:cpu", "latentpi-client:latest"):
        out = sh(
            [
                "docker",
                "run",
                "--rm",
                "--network",
                "none",
                "--entrypoint",
                "sh",
                image,
                "-c",
                probe,
            ],
            smoke["env"],
            120,
            f"probe {image}",
        )
        assert out.splitlines()[0] == "1000"
        assert "FOUND" not in out, out
    smoke["report"]["checks_passed"].append("no build tools")

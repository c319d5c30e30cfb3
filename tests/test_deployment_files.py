"""compose.yaml, compose.cpu.yaml, the Dockerfiles and .dockerignore stay in step with the code and
with each other: the images run the install script for their side, the commands compose passes are
ones `latentpi` accepts, the GPU file keeps its reservation, healthcheck, cache volume and key from
the environment, and `docker-compose config` accepts both files. (The images themselves are built
and run by tests/test_compose_smoke.py: `make compose-smoke`.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from latentpi.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
COMPOSE_CPU = yaml.safe_load((ROOT / "compose.cpu.yaml").read_text())
DOCKERFILES = {side: ROOT / "docker" / f"{side}.Dockerfile" for side in ("server", "client")}


def substitute_defaults(text: str) -> str:
    """compose's `${NAME:-default}` with the default (what runs when nothing is set)."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)


def dockerfile(service: str, compose: dict[str, Any] = COMPOSE) -> str:
    return (ROOT / compose["services"][service]["build"]["dockerfile"]).read_text()


def stages(text: str) -> list[str]:
    """The Dockerfile's stages, each from its FROM line (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", text)
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    out: list[str] = []
    for line in lines:
        if line.startswith("FROM "):
            out.append("")
        if out:
            out[-1] += line + "\n"
    return out


def instructions(stage: str, keyword: str) -> list[str]:
    return [
        line[len(keyword) + 1 :] for line in stage.splitlines() if line.startswith(keyword + " ")
    ]


# ---- the Dockerfiles ----


@pytest.mark.parametrize(("service", "side"), [("server", "server"), ("client", "client")])
def test_each_image_installs_its_side_with_the_install_script(service: str, side: str) -> None:
    assert f"scripts/install.sh {side}" in dockerfile(service)
    assert f"scripts/install.sh {side}" in dockerfile(service, COMPOSE_CPU)


@pytest.mark.parametrize("side", ["server", "client"])
def test_images_take_their_base_as_an_argument_defaulting_to_python_slim(side: str) -> None:
    text = DOCKERFILES[side].read_text()
    assert text.index("ARG BASE=python:3.11-slim") < text.index("FROM ")
    froms = re.findall(r"^FROM (\S+)", text, flags=re.M)
    assert len(froms) >= 2, "multi-stage: a build stage and a runtime stage"
    assert all(f == "${BASE}" for f in froms), froms


@pytest.mark.parametrize("side", ["server", "client"])
def test_final_stage_runs_as_a_user_and_keeps_only_the_venv(side: str) -> None:
    final = stages(DOCKERFILES[side].read_text())[-1]
    users = instructions(final, "USER")
    assert users and users[-1] not in ("root", "0", "0:0"), users
    # Only the venv crosses from the build stage; no uv, pip, compiler or package cache here.
    copies = instructions(final, "COPY")
    assert copies == ["--from=build /opt/venv /opt/venv"], copies
    assert not re.search(
        r"\b(uv|pip|gcc|g\+\+|build-essential|make)\b", "".join(instructions(final, "RUN"))
    )
    for run in instructions(final, "RUN"):
        if "apt-get install" in run:
            assert "--no-install-recommends" in run
            assert "rm -rf /var/lib/apt/lists/*" in run


def test_client_runtime_has_the_install_scripts_gl_packages() -> None:
    install = (ROOT / "scripts" / "install.sh").read_text()
    wanted = set(re.search(r"APT_PACKAGES=\(([^)]*)\)", install).group(1).split())  # type: ignore[union-attr]
    final = stages(DOCKERFILES["client"].read_text())[-1]
    installed = set(re.search(r"--no-install-recommends\s+([^>&]*)", final).group(1).split())  # type: ignore[union-attr]
    # + libopengl0 (PyOpenGL's EGL platform loads libOpenGL; a bare Debian lacks it)
    assert installed == wanted | {"libopengl0"}


@pytest.mark.parametrize("side", ["server", "client"])
def test_no_secret_is_baked_into_an_image(side: str) -> None:
    text = DOCKERFILES[side].read_text()
    assert "API_KEY" not in text
    # the CA folder (build stage only) is not copied into the runtime stage
    assert "docker/certs" not in stages(text)[-1]


def test_server_image_caches_match_the_compose_volumes() -> None:
    text = DOCKERFILES["server"].read_text()
    env = dict(re.findall(r"\b(OPENPI_DATA_HOME|LATENTPI_COMPILE_CACHE)=(\S+)", text))
    mounts = {v.split(":")[1] for v in COMPOSE["services"]["server"]["volumes"]}
    assert {env["OPENPI_DATA_HOME"], env["LATENTPI_COMPILE_CACHE"]} <= mounts
    assert set(COMPOSE["volumes"]) == {
        v.split(":")[0] for v in COMPOSE["services"]["server"]["volumes"]
    }


# ---- .dockerignore: an allowlist of what the Dockerfiles copy ----


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def excluded(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for pattern in dockerignore_patterns():
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            result = not negate
    return result


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        "data/libero_spatial/task_0.h5",
        "demo-out/report.html",
        "out/x.json",
        ".git/HEAD",
        "tests/test_cli.py",
        "docs/deploy.md",
        "bench/a.py",
        "reports/a.html",
        ".whl/x.whl",
        "client/src/latentpi/__pycache__/x.cpython-311.pyc",
        "client/.venv/bin/python",
        "server/src/latentpi_server.egg-info/PKG-INFO",
        "runs/a/b.h5",
        "notebook.ipynb",
    ],
)
def test_dockerignore_keeps_data_venvs_and_reports_out(path: str) -> None:
    assert excluded(path)


def test_dockerignore_lets_in_everything_the_dockerfiles_copy() -> None:
    sources: set[str] = set()
    for text in (p.read_text() for p in DOCKERFILES.values()):
        for line in re.findall(r"^COPY (?!--from)(.*)$", text, flags=re.M):
            sources.update(line.split()[:-1])
    assert "uv.lock" in sources
    for source in sorted(sources):
        candidates = [source.rstrip("/")]
        if (ROOT / source).is_dir():
            candidates = [
                str(p.relative_to(ROOT))
                for p in (ROOT / source).rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".crt"
            ]
        assert candidates, source
        for path in candidates:
            assert not excluded(path), f"{path} (COPY {source}) is kept out by .dockerignore"


# ---- the compose files against the CLI ----


def parse_service(compose: dict[str, Any], service: str) -> Any:
    spec = compose["services"][service]
    args = [substitute_defaults(a) for a in spec["command"]]
    if service == "server":
        entrypoint = re.search(r"ENTRYPOINT (\[.*\])", dockerfile("server", compose)).group(1)  # type: ignore[union-attr]
        args = [*yaml.safe_load(entrypoint)[1:], *args]
    parser, _ = build_parser()
    return parser.parse_args(args)


def servers(args: Any) -> list[str]:
    """--server is repeatable (a list) in newer CLIs, a string in older ones."""
    return list(args.server) if isinstance(args.server, list | tuple) else [args.server]


def test_compose_commands_parse_with_the_cli() -> None:
    args = parse_service(COMPOSE, "server")
    assert (args.command, args.config, args.host, args.port) == (
        "serve",
        "pi0_libero",
        "0.0.0.0",
        8000,
    )

    args = parse_service(COMPOSE, "client")
    assert (args.command, args.suite, servers(args), str(args.out)) == (
        "collect",
        "libero_spatial",
        ["ws://server:8000"],
        "/data",
    )
    assert COMPOSE["services"]["client"]["depends_on"]["server"]["condition"] == "service_healthy"


def test_cpu_compose_serves_a_tiny_config_on_loopback_only() -> None:
    server, client = COMPOSE_CPU["services"]["server"], COMPOSE_CPU["services"]["client"]
    args = parse_service(COMPOSE_CPU, "server")
    assert (args.config, args.host, args.port) == ("pi0_tiny", "127.0.0.1", 8000)
    assert "deploy" not in server and "ports" not in server
    assert server["network_mode"] == client["network_mode"] == "host"
    assert server["build"]["args"]["JAX_CUDA"] == ""
    assert client["depends_on"]["server"]["condition"] == "service_healthy"
    assert "LATENTPI_PORT" in json.dumps(server["healthcheck"]["test"])
    cli = parse_service(COMPOSE_CPU, "client")
    assert cli.command == "collect"
    assert servers(cli) == ["ws://127.0.0.1:8000"]
    assert (cli.trials, cli.max_steps, str(cli.out)) == (2, 20, "/data")
    # the same images as compose.yaml (the CPU server under its own tag)
    for service in ("server", "client"):
        spec = COMPOSE_CPU["services"][service]
        assert spec["build"]["dockerfile"] == COMPOSE["services"][service]["build"]["dockerfile"]
    assert client["image"] == COMPOSE["services"]["client"]["image"]
    assert server["image"] != COMPOSE["services"]["server"]["image"]


def test_gpu_compose_reserves_a_gpu_and_checks_health() -> None:
    server = COMPOSE["services"]["server"]
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert server["build"]["args"]["JAX_CUDA"] == "cuda12"
    assert "/healthz" in json.dumps(server["healthcheck"]["test"])
    assert "openpi-cache:/cache/openpi" in server["volumes"]


def test_ray_profile_runs_collect_on_a_ray_head_and_workers_join_it() -> None:
    head, worker = COMPOSE["services"]["ray-head"], COMPOSE["services"]["ray-worker"]
    assert head["profiles"] == worker["profiles"] == ["ray"]
    assert head["network_mode"] == worker["network_mode"] == "host"
    assert (
        "ray start --head" in head["entrypoint"][2]
        and 'exec latentpi "$$@"' in head["entrypoint"][2]
    )
    args = parse_service(COMPOSE, "ray-head")
    assert (args.command, args.backend, args.ray_address, str(args.out)) == (
        "collect",
        "ray",
        "auto",
        "/data",
    )
    assert worker["entrypoint"] == ["ray"]
    command = [substitute_defaults(a) for a in worker["command"]]
    assert command[:3] == ["start", "--address", "127.0.0.1:6379"] and "--block" in command
    # every node on the same fixed ports (the firewall rules of docs/deploy.md)
    worker_ports = {a for a in command if re.fullmatch(r"--[a-z-]*port=\d+", a)}
    head_ports = set(re.findall(r"--[a-z-]*port=\d+", head["entrypoint"][2]))
    assert len(worker_ports) == 8 and worker_ports == head_ports
    # the Ray flags the head's command relies on exist in this CLI
    help_text = (
        subprocess.run(
            [str(ROOT / ".venv" / "bin" / "latentpi"), "collect", "--help"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        or ""
    )
    if help_text:
        for flag in ("--backend", "--ray-address", "--workers", "--server"):
            assert flag in help_text


def test_ray_dashboard_is_not_published_to_the_network() -> None:
    """Ray's dashboard accepts jobs (any code) without authentication: loopback only."""
    head = COMPOSE["services"]["ray-head"]["entrypoint"][2]
    hosts = re.findall(r"--dashboard-host=(\S+)", head)
    assert hosts == ["127.0.0.1"] or "--include-dashboard=false" in head


# ---- docker-compose config: what compose itself makes of the files ----

COMPOSE_BIN = shutil.which("docker-compose")
needs_compose = pytest.mark.skipif(
    COMPOSE_BIN is None,
    reason="docker-compose not installed (`make deploy-tools` installs it; `make test` runs that)",
)


def compose_config(
    *files: str, env: dict[str, str] | None = None, profile: str | None = None
) -> Any:
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("LATENTPI_", "RAY_", "TORCH_"))
    }
    command = [str(COMPOSE_BIN)]
    for f in files:
        command += ["-f", str(ROOT / f)]
    if profile:
        command += ["--profile", profile]
    done = subprocess.run(
        [*command, "config"],
        cwd=ROOT,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


@needs_compose
def test_docker_compose_validates_the_gpu_file_with_the_key_from_the_environment() -> None:
    config = compose_config("compose.yaml", env={"LATENTPI_API_KEY": "s3cret-key"})
    server, client = config["services"]["server"], config["services"]["client"]
    assert server["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert (
        server["environment"]["LATENTPI_API_KEY"]
        == client["environment"]["LATENTPI_API_KEY"]
        == "s3cret-key"
    )
    for spec in (server, client):
        assert "s3cret-key" not in json.dumps(spec["build"])  # never a build argument
    assert server["healthcheck"]["test"][0] == "CMD"
    assert any(
        v["target"] == "/cache/openpi" and v["source"] == "openpi-cache" for v in _volumes(server)
    )
    assert client["depends_on"]["server"]["condition"] == "service_healthy"
    assert "ws://server:8000" in client["command"]


def _volumes(spec: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    for v in spec.get("volumes", []):
        if isinstance(v, str):
            source, target = v.split(":")[:2]
            v = {"source": source, "target": target}
        out.append(v)
    return out


@needs_compose
def test_docker_compose_points_the_client_at_a_remote_server() -> None:
    config = compose_config(
        "compose.yaml",
        env={"LATENTPI_SERVER": "ws://gpu-host:8000", "LATENTPI_DATA": "/srv/latentpi"},
    )
    client = config["services"]["client"]
    assert client["command"][-2:] == ["--server", "ws://gpu-host:8000"]
    assert any(v["target"] == "/data" and v["source"] == "/srv/latentpi" for v in _volumes(client))


@needs_compose
def test_docker_compose_validates_the_ray_profile_and_the_cpu_file() -> None:
    config = compose_config(
        "compose.yaml", profile="ray", env={"RAY_HEAD_ADDRESS": "10.0.0.5:6379"}
    )
    assert {"ray-head", "ray-worker"} <= set(config["services"])
    assert config["services"]["ray-worker"]["command"][:3] == [
        "start",
        "--address",
        "10.0.0.5:6379",
    ]
    cpu = compose_config("compose.cpu.yaml", env={"LATENTPI_PORT": "18123"})
    assert cpu["services"]["server"]["network_mode"] == "host"
    assert "deploy" not in cpu["services"]["server"]
    assert cpu["services"]["client"]["command"][-1] == "ws://127.0.0.1:18123"
    assert cpu["services"]["server"]["environment"]["LATENTPI_PORT"] == "18123"

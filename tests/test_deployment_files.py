"""compose.yaml and the Dockerfiles stay in step with the code: the images run the install script
for their side, and the commands compose passes are ones `latentpi` accepts. (No Docker engine runs
here; the images themselves are built where one does.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from latentpi.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())


def substitute_defaults(text: str) -> str:
    """compose's `${NAME:-default}` with the default (what runs when nothing is set)."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)


def dockerfile(service: str) -> str:
    return (ROOT / COMPOSE["services"][service]["build"]["dockerfile"]).read_text()


@pytest.mark.parametrize(("service", "side"), [("server", "server"), ("client", "client")])
def test_each_image_installs_its_side_with_the_install_script(service: str, side: str) -> None:
    assert f"scripts/install.sh {side}" in dockerfile(service)


def test_compose_commands_parse_with_the_cli() -> None:
    parser, _ = build_parser()
    entrypoint = re.search(r"ENTRYPOINT (\[.*\])", dockerfile("server")).group(1)  # type: ignore[union-attr]
    server_args = [*yaml.safe_load(entrypoint)[1:], *COMPOSE["services"]["server"]["command"]]
    args = parser.parse_args([substitute_defaults(a) for a in server_args])
    assert (args.command, args.config, args.host) == ("serve", "pi0_libero", "0.0.0.0")

    client_args = [substitute_defaults(a) for a in COMPOSE["services"]["client"]["command"]]
    args = parser.parse_args(client_args)
    assert (args.command, args.suite, args.server) == (
        "collect",
        "libero_spatial",
        "ws://server:8000",
    )
    assert COMPOSE["services"]["client"]["depends_on"]["server"]["condition"] == "service_healthy"

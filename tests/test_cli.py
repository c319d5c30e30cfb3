"""The `latentpi` dispatcher: every subcommand is listed, and a side that is not installed says so
(exit 2) instead of failing with an import error."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from latentpi import cli

ROOT = Path(__file__).resolve().parents[1]
SIDES = {"latentpi.server": "latentpi-server", "latentpi.client": "latentpi-client"}


def run_main(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    return int(info.value.code or 0)


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(["--help"]) == 0
    out = capsys.readouterr().out
    names = [sub.name for sub in cli.SUBCOMMANDS]
    assert names == ["serve", "parity", "units", "collect", "analyze", "demo"]
    for sub in cli.SUBCOMMANDS:
        assert sub.name in out and sub.help in out


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main([]) == 2
    assert "usage: latentpi" in capsys.readouterr().out


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(["fly"]) == 2
    assert "invalid choice: 'fly'" in capsys.readouterr().err


@pytest.mark.parametrize("missing", sorted(SIDES))
def test_missing_side_says_not_available(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], missing: str
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == missing else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    for sub in cli.SUBCOMMANDS:
        side = ".".join(sub.module.split(".")[:2])
        if side != missing:
            continue
        # extra arguments are not a usage error when the side is absent: the message is the point
        assert run_main([sub.name, "--some-flag", "x"]) == 2
        err = capsys.readouterr().err
        assert f"latentpi {sub.name}: not available in this installation" in err
        assert SIDES[missing] in err
    assert run_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(sub.name in out for sub in cli.SUBCOMMANDS)


def protocol_only(*args: str) -> subprocess.CompletedProcess[str]:
    """`latentpi` in an interpreter that sees only the protocol distribution's sources (no
    site-packages at all: the dispatcher needs the standard library only)."""
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'protocol' / 'src')!r}); from latentpi.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-I", "-S", "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_protocol_only_installation_lists_all_and_refuses_clearly() -> None:
    help_run = protocol_only("--help")
    assert help_run.returncode == 0
    assert all(sub.name in help_run.stdout for sub in cli.SUBCOMMANDS)
    for name, distribution in (("serve", "latentpi-server"), ("collect", "latentpi-client")):
        result = protocol_only(name)
        assert result.returncode == 2
        assert f"latentpi {name}: not available in this installation" in result.stderr
        assert distribution in result.stderr
        assert "Traceback" not in result.stderr

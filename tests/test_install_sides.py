"""`scripts/install.sh server|client`: one side alone, with the lock's versions, and the `latentpi`
command saying what the missing side would provide."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
OTHER_SIDE = {"server": ("collect", "jax", "mujoco"), "client": ("serve", "mujoco", "jax")}


def python_of(venv: Path, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True
    )


@pytest.mark.parametrize("side", ["server", "client"])
def test_one_side_installs_alone_with_locked_versions(side: str, tmp_path: Path) -> None:
    venv = tmp_path / f"venv-{side}"
    # As in a test run that used LIBERO first: this process's own config is in the environment.
    own_config = ROOT / ".venv" / "libero-config" / "config.yaml"
    before = own_config.read_bytes() if own_config.exists() else None
    env = {
        **os.environ,
        "VENV": str(venv),
        "LATENTPI_SKIP_APT": "1",
        "LIBERO_CONFIG_PATH": str(own_config.parent),
    }
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install.sh"), side],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # The new venv wired its own LIBERO config, not the one of the venv running this test.
    assert (own_config.read_bytes() if own_config.exists() else None) == before
    missing_command, present, absent = OTHER_SIDE[side]

    refused = subprocess.run(
        [str(venv / "bin" / "latentpi"), missing_command], capture_output=True, text=True
    )
    assert refused.returncode == 2
    assert "not available in this installation" in refused.stderr

    assert python_of(venv, f"import {absent}").returncode != 0
    version = python_of(venv, f"import {present}; print({present}.__version__)").stdout.strip()
    here = __import__(present).__version__
    assert version == here  # the lock's version, the one the tests ran with

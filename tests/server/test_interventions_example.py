"""The worked reproduction of docs/interventions.md runs verbatim against a loopback pi0_tiny
server, and what it claims holds: steering moves the probe by exactly the scale, patching
reproduces the donor's actions, the knockout makes the prompt's words irrelevant (its length still
moves the actions: RoPE positions)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from loopback import serving, tiny_engine

from latentpi.server.embedded import RunningServer

DOC = Path(__file__).parents[2] / "docs" / "interventions.md"
SECTION = "## A worked reproduction on the tiny model"


def example_code() -> str:
    section = DOC.read_text().split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "docs/interventions.md: the worked example has one python block"
    return blocks[0]


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with serving(tiny_engine("pi0_tiny")) as running:
        yield running


@pytest.fixture(scope="module")
def ran(server: RunningServer) -> dict[str, Any]:
    namespace: dict[str, Any] = {"URL": server.url}
    exec(compile(example_code(), str(DOC), "exec"), namespace)  # our own doc, verbatim
    namespace["policy"].close()
    return namespace


@pytest.mark.slow
def test_steering_moves_the_probe_by_the_scale_and_then_the_actions(ran: dict[str, Any]) -> None:
    steering = ran["steering"]
    base = steering[0.0]
    for scale in (2.0, 8.0):
        assert steering[scale]["probe_L"] - base["probe_L"] == pytest.approx(scale, abs=1e-4)
        assert steering[scale]["probe_next"] != pytest.approx(base["probe_next"], abs=1e-4)
    moved = [np.abs(steering[s]["actions"] - base["actions"]).max() for s in (2.0, 8.0)]
    assert 0 < moved[0] < moved[1]


@pytest.mark.slow
def test_patching_reproduces_the_donor_and_the_knockout_silences_the_prompt(
    ran: dict[str, Any],
) -> None:
    assert ran["patching"]["to_a"] < 1e-5 < 1e-3 < ran["patching"]["to_b"]
    knocked_out = ran["knocked_out"]
    assert knocked_out["same_length"] == 0.0 < 1e-3 < knocked_out["without"]
    # the prompt's length still reaches the actions through the suffix's positions
    assert knocked_out["other_length"] > 1e-4

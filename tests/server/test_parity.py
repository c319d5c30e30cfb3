"""Parity with openpi on the shared reference files: our model reproduces openpi's actions, hidden
states and velocities within the README's tolerances, and a small change in one weight does not."""

from __future__ import annotations

import argparse
import copy
import io
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from latentpi.protocol.errors import ValidationError
from latentpi.server import parity
from latentpi.server.cli import parity as parity_cli
from latentpi.server.model.capture import CompiledSampler
from latentpi.server.model.checkpoint import load_params_npz
from latentpi.server.model.pi0 import param_shapes

REFERENCE = Path("/work/shared/reference")
FILES = {name: REFERENCE / f"{name}.npz" for name in ("pi0_tiny", "pi05_tiny")}


@pytest.fixture(scope="module")
def pi0_sampler():
    """One compiled sampler for the pi0 file, shared by the tests that run it."""
    return CompiledSampler(parity.read_reference(FILES["pi0_tiny"]).config)


@pytest.mark.parametrize("name", sorted(FILES))
def test_reference_file_passes(name: str, pi0_sampler) -> None:
    report = parity.check_file(FILES[name], sampler=pi0_sampler)
    assert report.ok, report.table()
    assert [row.array for row in report.rows] == ["actions", *parity.COMPARED]
    assert all(row.ok for row in report.rows)
    assert "parity: PASS" in report.table()


def test_perturbed_weight_fails(pi0_sampler) -> None:
    path = FILES["pi0_tiny"]
    reference = parity.read_reference(path)
    params = copy.deepcopy(
        load_params_npz(path, dtype="float32", expected=param_shapes(reference.config))
    )
    # One layer's attention output projection, scaled by 1%: a "real mistake", far below a bug's size.
    weight = params["PaliGemma"]["llm"]["layers"]["attn"]["attn_vec_einsum"]["w"]
    weight[1] *= 1.01
    report = parity.check_file(path, params=params, sampler=pi0_sampler)
    assert not report.ok
    failing = {row.array for row in report.rows if not row.ok}
    assert {"expert_0_hidden_states", "expert_0_final_normed", "expert_1_hidden_states"} <= failing
    assert "FAIL" in report.table()


def test_cli_with_checkpoint_directory() -> None:
    parser = argparse.ArgumentParser()
    parity_cli.add_arguments(parser)
    args = parser.parse_args(
        [str(FILES["pi0_tiny"]), "--checkpoint", str(REFERENCE / "pi0_tiny_ckpt")]
    )
    out = io.StringIO()
    with redirect_stdout(out):
        assert parity_cli.run(args) == 0
    assert "params from" in out.getvalue() and "pi0_tiny_ckpt" in out.getvalue()
    # The pi0 checkpoint cannot serve the pi0.5 file: a clear error and a non-zero exit.
    args = parser.parse_args(
        [str(FILES["pi05_tiny"]), "--checkpoint", str(REFERENCE / "pi0_tiny_ckpt")]
    )
    assert parity_cli.run(args) == 1


def test_bad_reference_files_are_named(tmp_path: Path) -> None:
    no_meta = tmp_path / "no_meta.npz"
    np.savez(no_meta, x=np.zeros(3))
    with pytest.raises(ValidationError, match="meta_json"):
        parity.read_reference(no_meta)
    with np.load(FILES["pi0_tiny"]) as data:
        arrays = {name: data[name] for name in data.files if not name.startswith("params/")}
    arrays["inputs/state"] = arrays["inputs/state"][:, :8]
    short_state = tmp_path / "short_state.npz"
    np.savez(short_state, **arrays)
    with pytest.raises(
        ValidationError, match=r"inputs/state: expected an array of shape \(2, 32\)"
    ):
        parity.read_reference(short_state)


def test_relative_error_ignores_invalid_positions() -> None:
    expected = np.ones((1, 2, 4, 3))
    ours = expected.copy()
    ours[0, 1, 3] = 100.0  # a padded position: any value is fine
    valid = np.array([[True, True, True, False]])
    assert parity.worst_relative_error(ours, expected, valid, position_axis=2) == 0.0
    ours[0, 1, 0, 0] = 1.1
    assert parity.worst_relative_error(ours, expected, valid, position_axis=2) == pytest.approx(
        0.1 / 3
    )

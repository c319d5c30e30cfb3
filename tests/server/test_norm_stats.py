"""norm_stats.json: openpi's format, round trips, and errors that name the file and field."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from latentpi.server.norm_stats import (
    LIBERO_ASSET_ID,
    NormStats,
    NormStatsError,
    load_norm_stats,
    norm_stats_path,
    save_norm_stats,
)

# Shaped like openpi's pi0_libero stats: 8-D state, 7-D actions.
STATE = {
    "mean": [-0.05, 0.03, 1.0, 3.0, -0.1, -0.07, 0.02, -0.02],
    "std": [0.1, 0.15, 0.1, 0.3, 0.9, 0.3, 0.01, 0.01],
    "q01": [-0.4, -0.3, 0.9, 2.0, -2.5, -1.0, 0.0, -0.04],
    "q99": [0.1, 0.3, 1.3, 3.3, 2.5, 0.6, 0.04, 0.0],
}
ACTIONS = {
    "mean": [0.06, 0.08, -0.09, 0.0, 0.0, -0.007, -0.26],
    "std": [0.3, 0.4, 0.5, 0.04, 0.06, 0.08, 0.97],
}


def write(
    checkpoint: pathlib.Path, document: object, asset_id: str = LIBERO_ASSET_ID
) -> pathlib.Path:
    path = checkpoint / "assets" / asset_id / "norm_stats.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    return path


def test_reads_openpi_layout(tmp_path: pathlib.Path) -> None:
    write(
        tmp_path, {"norm_stats": {"state": STATE, "actions": {**ACTIONS, "q01": None, "q99": None}}}
    )
    stats = load_norm_stats(tmp_path)
    assert set(stats) == {"state", "actions"}
    assert stats["state"].dim == 8 and stats["actions"].dim == 7
    for name, values in STATE.items():
        array = getattr(stats["state"], name)
        # float64 as parsed, as openpi keeps them: a float32 copy would move normalized values.
        assert array.dtype == np.float64
        np.testing.assert_array_equal(array, np.asarray(values, np.float64))
    assert stats["actions"].q01 is None and stats["actions"].q99 is None


def test_round_trip_and_file_url(tmp_path: pathlib.Path) -> None:
    stats = {"state": NormStats(**STATE), "actions": NormStats(**ACTIONS)}
    path = save_norm_stats(tmp_path / "ckpt", stats, asset_id="trossen")
    assert path == tmp_path / "ckpt" / "assets" / "trossen" / "norm_stats.json"
    assert json.loads(path.read_text())["norm_stats"]["actions"]["q01"] is None
    again = load_norm_stats(f"file://{tmp_path / 'ckpt'}", asset_id="trossen")
    for key in stats:
        for name in ("mean", "std", "q01", "q99"):
            want, got = getattr(stats[key], name), getattr(again[key], name)
            assert (want is None and got is None) or np.array_equal(want, got)
    assert norm_stats_path(tmp_path / "ckpt", "trossen") == path


def test_missing_file_names_path_and_asset(tmp_path: pathlib.Path) -> None:
    with pytest.raises(
        NormStatsError, match=r"physical-intelligence/libero/norm_stats.json: no norm stats"
    ):
        load_norm_stats(tmp_path)
    with pytest.raises(NormStatsError, match="checkpoint_dir"):
        load_norm_stats(tmp_path / "absent")


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"stats": {}}, r"norm_stats: expected an object under 'norm_stats'"),
        (
            {"norm_stats": {"state": STATE}},
            r"expected keys \['actions'\] to be present, found \['state'\]",
        ),
        (
            {"norm_stats": {"state": STATE, "actions": {"mean": [1.0]}}},
            r"norm_stats.actions: expected fields \['std'\]",
        ),
        (
            {"norm_stats": {"state": STATE, "actions": [1, 2]}},
            r"norm_stats.actions: expected an object",
        ),
        (
            {"norm_stats": {"state": {**STATE, "std": [[0.1]] * 8}, "actions": ACTIONS}},
            r"norm_stats.state.std: expected a 1-D array .* received shape \(8, 1\)",
        ),
        (
            {"norm_stats": {"state": {**STATE, "q99": STATE["q99"][:7]}, "actions": ACTIONS}},
            r"norm_stats.state.q99: expected length 8 \(as mean\), received 7",
        ),
        (
            {"norm_stats": {"state": STATE, "actions": {**ACTIONS, "mean": ["a"] * 7}}},
            r"norm_stats.actions.mean: expected a 1-D array of numbers",
        ),
        (
            {"norm_stats": {"state": STATE, "actions": {**ACTIONS, "std": [-1.0] * 7}}},
            r"norm_stats.actions.std: expected values >= 0",
        ),
    ],
)
def test_malformed_documents(tmp_path: pathlib.Path, document: object, message: str) -> None:
    path = write(tmp_path, document)
    with pytest.raises(NormStatsError, match=message) as info:
        load_norm_stats(tmp_path)
    assert str(path) in str(info.value)


def test_non_finite_values(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "assets" / LIBERO_ASSET_ID / "norm_stats.json"
    path.parent.mkdir(parents=True)
    # Python's json writes and reads NaN; openpi files never hold one.
    path.write_text(
        json.dumps(
            {
                "norm_stats": {
                    "state": {**STATE, "mean": [0.0] * 7 + [float("nan")]},
                    "actions": ACTIONS,
                }
            }
        )
    )
    with pytest.raises(
        NormStatsError,
        match=r"norm_stats.state.mean: expected finite numbers, received nan at index 7",
    ):
        load_norm_stats(tmp_path)


def test_not_json_and_too_large(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, {})
    path.write_text("{not json")
    with pytest.raises(NormStatsError, match="not valid JSON"):
        load_norm_stats(tmp_path)
    write(tmp_path, {"norm_stats": {"state": STATE, "actions": ACTIONS}})
    monkeypatch.setattr("latentpi.server.norm_stats.MAX_FILE_BYTES", 100)
    with pytest.raises(NormStatsError, match="expected at most 100 bytes"):
        load_norm_stats(tmp_path)


@pytest.mark.parametrize("asset_id", ["../escape", "/abs", ""])
def test_asset_id_stays_inside_the_checkpoint(tmp_path: pathlib.Path, asset_id: str) -> None:
    with pytest.raises(NormStatsError, match="asset_id"):
        load_norm_stats(tmp_path, asset_id)


def test_dataclass_validates_and_is_frozen() -> None:
    stats = NormStats(mean=[0, 1], std=np.array([1.0, 2.0], np.float64))
    assert stats.std.dtype == np.float64 and stats.mean.dtype == np.float64
    with pytest.raises(AttributeError):
        stats.mean = np.zeros(2)  # type: ignore[misc]
    with pytest.raises(NormStatsError, match="std: expected a 1-D array of numbers, received None"):
        NormStats(mean=[0.0], std=None)  # type: ignore[arg-type]
    with pytest.raises(NormStatsError, match="float32 range"):
        NormStats(mean=[1e300], std=[1.0])

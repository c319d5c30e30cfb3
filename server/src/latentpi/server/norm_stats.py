"""Normalization statistics shipped with an openpi checkpoint.

A checkpoint keeps them at `assets/<asset_id>/norm_stats.json` as
`{"norm_stats": {"state": {"mean": [...], "std": [...], "q01": [...], "q99": [...]}, "actions": {...}}}`;
the quantiles may be null (pi0 normalizes with mean/std, pi0.5 with the quantiles). This module only
reads, checks and writes them; the normalization itself belongs to the policy transforms.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from latentpi.server.download import maybe_download

LIBERO_ASSET_ID = "physical-intelligence/libero"
FILE_NAME = "norm_stats.json"
# Real files are a few kB; a bound keeps a wrong path (a checkpoint shard) from being parsed.
MAX_FILE_BYTES = 16 * 2**20
_MAX_DIM = 4096


class NormStatsError(ValueError):
    """A missing or malformed norm_stats.json; the message names the file and the field."""


@dataclasses.dataclass(frozen=True, eq=False)
class NormStats:
    """Per-dimension statistics of one quantity (`state`, `actions`): 1-D float64 arrays.

    float64 as openpi keeps them (parsed from JSON): normalization then runs in float64 and only
    the model's inputs are cast to float32, so every value is what openpi computes."""

    mean: np.ndarray
    std: np.ndarray
    q01: np.ndarray | None = None
    q99: np.ndarray | None = None

    def __post_init__(self) -> None:
        size = None
        for name in ("mean", "std", "q01", "q99"):
            value = getattr(self, name)
            if value is None:
                if name in ("mean", "std"):
                    raise NormStatsError(f"{name}: expected a 1-D array of numbers, received None")
                continue
            array = _vector(name, value)
            if size is not None and array.shape[0] != size:
                raise NormStatsError(
                    f"{name}: expected length {size} (as mean), received {array.shape[0]}"
                )
            size = array.shape[0]
            object.__setattr__(self, name, array)
        if (self.std < 0).any():
            raise NormStatsError(f"std: expected values >= 0, received minimum {self.std.min()}")

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def to_json(self) -> dict[str, list[float] | None]:
        return {
            name: None if (value := getattr(self, name)) is None else value.tolist()
            for name in ("mean", "std", "q01", "q99")
        }


def norm_stats_path(
    checkpoint_dir: str | os.PathLike[str], asset_id: str = LIBERO_ASSET_ID
) -> pathlib.Path:
    """Where a checkpoint keeps the stats of `asset_id` (local; gs:// is downloaded first)."""
    _check_asset_id(asset_id)
    try:
        root = maybe_download(checkpoint_dir)
    except (OSError, ValueError) as e:
        raise NormStatsError(f"checkpoint_dir: {e}") from e
    return root / "assets" / asset_id / FILE_NAME


def load_norm_stats(
    checkpoint_dir: str | os.PathLike[str],
    asset_id: str = LIBERO_ASSET_ID,
    *,
    required: Iterable[str] = ("state", "actions"),
) -> dict[str, NormStats]:
    """Reads `<checkpoint_dir>/assets/<asset_id>/norm_stats.json`.

    Raises:
      NormStatsError: the file is missing, too large or not JSON; a key in `required` or a field is
        missing; an array is not 1-D, has mismatched lengths or holds non-finite values.
    """
    path = norm_stats_path(checkpoint_dir, asset_id)
    if not path.is_file():
        raise NormStatsError(f"{path}: no norm stats for asset {asset_id!r} (file not found)")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise NormStatsError(f"{path}: expected at most {MAX_FILE_BYTES} bytes, received {size}")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NormStatsError(f"{path}: not valid JSON: {e}") from e
    try:
        return parse_norm_stats(document, required=required)
    except NormStatsError as e:
        raise NormStatsError(f"{path}: {e}") from e


def parse_norm_stats(document: Any, *, required: Iterable[str] = ()) -> dict[str, NormStats]:
    """The stats from a parsed norm_stats.json document (`{"norm_stats": {key: {...}}}`)."""
    if not isinstance(document, Mapping) or not isinstance(document.get("norm_stats"), Mapping):
        raise NormStatsError(
            f"norm_stats: expected an object under 'norm_stats', received {_kind(document)}"
        )
    entries = document["norm_stats"]
    missing = [key for key in required if key not in entries]
    if missing:
        raise NormStatsError(
            f"norm_stats: expected keys {missing} to be present, found {sorted(entries)}"
        )
    stats = {}
    for key, entry in entries.items():
        if not isinstance(entry, Mapping):
            raise NormStatsError(f"norm_stats.{key}: expected an object, received {_kind(entry)}")
        absent = [name for name in ("mean", "std") if entry.get(name) is None]
        if absent:
            raise NormStatsError(
                f"norm_stats.{key}: expected fields {absent}, found {sorted(entry)}"
            )
        try:
            stats[str(key)] = NormStats(**{n: entry.get(n) for n in ("mean", "std", "q01", "q99")})
        except NormStatsError as e:
            raise NormStatsError(f"norm_stats.{key}.{e}") from e
    return stats


def save_norm_stats(
    checkpoint_dir: str | os.PathLike[str],
    stats: Mapping[str, NormStats],
    asset_id: str = LIBERO_ASSET_ID,
) -> pathlib.Path:
    """Writes the stats where `load_norm_stats` (and openpi) read them; returns the file path."""
    _check_asset_id(asset_id)
    path = pathlib.Path(checkpoint_dir) / "assets" / asset_id / FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"norm_stats": {key: value.to_json() for key, value in stats.items()}}
    scratch = path.with_name(path.name + ".partial")
    scratch.write_text(json.dumps(document, indent=2), encoding="utf-8")
    os.replace(scratch, path)
    return path


def _vector(name: str, value: Any) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise NormStatsError(
            f"{name}: expected a 1-D array of numbers, received {_kind(value)}"
        ) from e
    if array.ndim != 1 or not 0 < array.shape[0] <= _MAX_DIM:
        raise NormStatsError(
            f"{name}: expected a 1-D array of 1 to {_MAX_DIM} numbers, received shape {array.shape}"
        )
    if not np.isfinite(array).all():
        bad = int(np.flatnonzero(~np.isfinite(array))[0])
        raise NormStatsError(
            f"{name}: expected finite numbers, received {array[bad]} at index {bad}"
        )
    if (np.abs(array) > np.finfo(np.float32).max).any():
        raise NormStatsError(f"{name}: expected values within float32 range")
    return array


def _check_asset_id(asset_id: str) -> None:
    parts = pathlib.PurePosixPath(asset_id).parts
    if not asset_id or asset_id.startswith("/") or ".." in parts or "\\" in asset_id:
        raise NormStatsError(
            f"asset_id: expected a relative name like {LIBERO_ASSET_ID!r}, received {asset_id!r}"
        )


def _kind(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"


__all__ = [
    "LIBERO_ASSET_ID",
    "NormStats",
    "NormStatsError",
    "load_norm_stats",
    "norm_stats_path",
    "parse_norm_stats",
    "save_norm_stats",
]

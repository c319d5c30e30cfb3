"""openpi checkpoints: restore, check and save the `params` tree.

An openpi checkpoint directory holds `params/`, an orbax PyTreeCheckpointer checkpoint whose one item
is `{"params": tree}`, beside `assets/`. The tree is a nested dict of arrays keyed by flax names
(`PaliGemma/llm/layers/attn/q_einsum/w`, ...). Params saved from a training state carry an extra
trailing `"value"` key on every path; it is dropped, as openpi does.

Nothing here knows the model: a caller that wants its structure checked passes `expected`, a nested
mapping of anything with a `.shape` (e.g. `jax.ShapeDtypeStruct`s from `jax.eval_shape`). Only the
expected leaves are then read, each straight into the requested dtype, so the full pi0 (3.2 B params)
costs one copy of the result in memory.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp

from latentpi.server.download import maybe_download

Path = tuple[str, ...]
DType = Literal["bfloat16", "float32"]

_DTYPES: dict[str, np.dtype] = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
}
_ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "checkpoint")
_MAX_REPORTED = 8
# Reading every leaf at once would hold all their decode buffers beside the result; 1 GiB groups keep
# that overhead small next to the 6.5 GB of a bfloat16 pi0 (the largest leaf, 4.8 GB, goes alone).
READ_BATCH_BYTES = 2**30
# The reference `.npz` files are small; this only stops a hostile file from asking for terabytes.
_MAX_NPZ_ELEMENTS = 2**32


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose tree does not match what the model expects."""


def load_params(
    path: str | os.PathLike[str],
    *,
    dtype: DType | None = None,
    expected: Mapping[str, Any] | None = None,
    sharding: jax.sharding.Sharding | None = None,
    read_batch_bytes: int = READ_BATCH_BYTES,
) -> dict[str, Any]:
    """Restores the `params` tree of an openpi checkpoint as a nested dict.

    Args:
      path: the checkpoint directory or its `params/` directory: local, `file://` or `gs://`
        (downloaded into the openpi cache first).
      dtype: cast floating leaves to this dtype while reading (`"bfloat16"` to serve, `"float32"` for
        parity); None keeps the stored dtype.
      expected: nested mapping of leaves with `.shape`. When given, structure and shapes must match
        (extra checkpoint keys are ignored and not read); the error lists the first differences.
      sharding: restore `jax.Array`s with this sharding (straight to the device) instead of numpy.
      read_batch_bytes: leaves are read in groups of at most this many stored bytes (a larger leaf
        alone), which bounds the memory of in-flight reads beside the result.

    Raises:
      CheckpointError: unreadable path or checkpoint, or a tree that does not match `expected`.
    """
    target = _target_dtype(dtype)
    params_path = find_params_dir(path)
    with ocp.PyTreeCheckpointer() as checkpointer:
        stored = _stored_params(checkpointer, params_path)
        wanted = stored if expected is None else _select(stored, _flatten(expected, "expected"))
        restored: dict[Path, Any] = {}
        for batch in _batches(wanted, read_batch_bytes):
            restored.update(
                _restore(checkpointer, params_path, batch, target, sharding, len(stored))
            )
    return _unflatten({path: restored[stored_path] for path, (stored_path, _) in wanted.items()})


def _restore(
    checkpointer: ocp.PyTreeCheckpointer,
    params_path: pathlib.Path,
    batch: Mapping[Path, Any],
    target: np.dtype | None,
    sharding: jax.sharding.Sharding | None,
    num_stored: int,
) -> dict[Path, Any]:
    """Reads one group of stored leaves (stored path → metadata); returns stored path → array."""
    item = {"params": _unflatten(batch)}
    restore_args = jax.tree.map(lambda meta: _restore_args(meta, target, sharding), item)
    try:
        restored = checkpointer.restore(
            params_path,
            args=ocp.args.PyTreeRestore(
                item=item, restore_args=restore_args, partial_restore=len(batch) < num_stored
            ),
        )["params"]
    except Exception as e:  # orbax/tensorstore raise many types; keep the cause attached.
        raise CheckpointError(f"{params_path}: cannot restore params: {e}") from e
    return _flatten(restored, "restored")


def _batches(wanted: Mapping[Path, tuple[Path, Any]], budget: int) -> Iterator[dict[Path, Any]]:
    """Consecutive groups of (stored path → metadata) whose stored bytes stay within `budget`."""
    batch: dict[Path, Any] = {}
    size = 0
    for stored_path, meta in wanted.values():
        nbytes = _stored_nbytes(meta)
        if batch and size + nbytes > budget:
            yield batch
            batch, size = {}, 0
        batch[stored_path] = meta
        size += nbytes
    if batch:
        yield batch


def _stored_nbytes(meta: Any) -> int:
    shape = tuple(getattr(meta, "shape", ()) or ())
    dtype = getattr(meta, "dtype", None)
    itemsize = np.dtype(dtype).itemsize if dtype is not None else 4
    return int(np.prod(shape, dtype=np.float64)) * itemsize


def save_params(
    path: str | os.PathLike[str], params: Mapping[str, Any], *, force: bool = False
) -> pathlib.Path:
    """Writes `params` as openpi does: an orbax PyTreeCheckpointer checkpoint of `{"params": tree}`.

    `path` is the `params/` directory itself (e.g. `<checkpoint>/params`). Returns its absolute path.
    """
    target = pathlib.Path(path).expanduser().resolve()
    if target.exists() and not force:
        raise CheckpointError(f"{target}: already exists (pass force=True to overwrite)")
    tree = _unflatten(_flatten(params, "params"))
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(target, args=ocp.args.PyTreeSave({"params": tree}), force=force)
    return target


def load_params_npz(
    path: str | os.PathLike[str],
    *,
    dtype: DType | None = None,
    expected: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The params of a latentpi reference `.npz` (`params/<path>` entries) as a nested dict.

    Sparse entries (`<path>:shape`, `<path>:row_ids`, `<path>:rows`: only the non-zero rows of a
    large table, used for the token embedding) are made dense.
    """
    target = _target_dtype(dtype)
    source = maybe_download_or_fail(path)
    try:
        archive = np.load(source, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{source}: not a readable .npz file: {e}") from e
    with archive:
        names = [n for n in archive.files if n.startswith("params/")]
        if not names:
            raise CheckpointError(f"{source}: expected entries named params/<path>, found none")
        flat: dict[Path, np.ndarray] = {}
        for name in names:
            key, _, part = name.removeprefix("params/").partition(":")
            if part in ("row_ids", "rows"):
                continue
            value = _densify(archive, name, key) if part == "shape" else archive[name]
            if part not in ("", "shape"):
                raise CheckpointError(f"{source}: unknown entry suffix in {name!r}")
            flat[tuple(key.split("/"))] = _cast(value, target)
    if expected is not None:
        metas = {p: (p, v) for p, v in flat.items()}
        flat = {
            p: flat[stored]
            for p, (stored, _) in _select(metas, _flatten(expected, "expected")).items()
        }
    return _unflatten(flat)


def find_params_dir(path: str | os.PathLike[str]) -> pathlib.Path:
    """The orbax `params` directory of a checkpoint given as itself or as its parent."""
    root = maybe_download_or_fail(path)
    if not root.is_dir():
        raise CheckpointError(f"{path}: expected a checkpoint directory, found a file")
    for candidate in (root, root / "params"):
        if any((candidate / marker).exists() for marker in _ORBAX_MARKERS):
            return candidate
    raise CheckpointError(
        f"{path}: expected an orbax checkpoint (a directory with {_ORBAX_MARKERS[0]}) "
        f"or a checkpoint directory with params/ inside; found {sorted(p.name for p in root.iterdir())[:10]}"
    )


def maybe_download_or_fail(path: str | os.PathLike[str]) -> pathlib.Path:
    """`maybe_download`, with its errors as `CheckpointError`s."""
    try:
        return maybe_download(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint path: {e}") from e


def _target_dtype(dtype: DType | None) -> np.dtype | None:
    if dtype is None:
        return None
    if dtype not in _DTYPES:
        raise CheckpointError(f"dtype: expected one of {[*_DTYPES, None]}, received {dtype!r}")
    return _DTYPES[dtype]


def _stored_params(
    checkpointer: ocp.PyTreeCheckpointer, params_path: pathlib.Path
) -> dict[Path, tuple[Path, Any]]:
    """Path without a `value` suffix → (path as stored, array metadata), for every stored leaf."""
    try:
        metadata = checkpointer.metadata(params_path)
    except Exception as e:  # orbax raises many types for a directory that is not a checkpoint.
        raise CheckpointError(f"{params_path}: cannot read orbax metadata: {e}") from e
    # orbax >= 0.12 wraps the tree in a step metadata object; older versions return the tree.
    item = getattr(metadata, "item_metadata", metadata)
    tree = getattr(item, "tree", item)
    if tree is None:
        raise CheckpointError(
            f"{params_path}: no tree metadata (damaged, or not a PyTree checkpoint)"
        )
    if not isinstance(tree, Mapping) or "params" not in tree:
        keys = list(tree) if isinstance(tree, Mapping) else type(tree).__name__
        raise CheckpointError(f"{params_path}: expected a top-level item 'params', found {keys}")
    stored = _flatten(tree["params"], "checkpoint")
    if stored and all(p[-1] == "value" for p in stored):
        return {p[:-1]: (p, meta) for p, meta in stored.items()}
    return {p: (p, meta) for p, meta in stored.items()}


def _restore_args(
    meta: Any, target: np.dtype | None, sharding: jax.sharding.Sharding | None
) -> ocp.ArrayRestoreArgs:
    stored_dtype = getattr(meta, "dtype", None)
    # Only floating leaves change dtype: integer buffers (if any) must keep their values.
    cast = target if target is not None and _is_floating(stored_dtype) else None
    if sharding is None:
        return ocp.ArrayRestoreArgs(restore_type=np.ndarray, dtype=cast)
    return ocp.ArrayRestoreArgs(restore_type=jax.Array, dtype=cast, sharding=sharding)


def _is_floating(dtype: Any) -> bool:
    if dtype is None:
        return True
    dtype = np.dtype(dtype)
    return np.issubdtype(dtype, np.floating) or dtype == _DTYPES["bfloat16"]


def _cast(value: np.ndarray, target: np.dtype | None) -> np.ndarray:
    if target is None or not _is_floating(value.dtype) or value.dtype == target:
        return value
    return value.astype(target)


def _select(
    stored: Mapping[Path, tuple[Path, Any]], expected: Mapping[Path, Any]
) -> dict[Path, tuple[Path, Any]]:
    """The stored leaves the expected tree asks for; a `CheckpointError` listing any mismatch."""
    problems: list[str] = []
    prefixes = {p[:i] for p in stored for i in range(1, len(p))}
    for path, leaf in expected.items():
        name = "/".join(path)
        want = getattr(leaf, "shape", None)
        if want is None:
            raise CheckpointError(
                f"expected[{name}]: expected an object with .shape, received {type(leaf).__name__}"
            )
        if path in stored:
            have = tuple(getattr(stored[path][1], "shape", ()))
            if have != tuple(want):
                problems.append(
                    f"{name}: shape mismatch, expected {tuple(want)}, checkpoint has {have}"
                )
        elif path in prefixes:
            problems.append(f"{name}: expected an array, checkpoint has a subtree")
        else:
            leaf_above = next((path[:i] for i in range(1, len(path)) if path[:i] in stored), None)
            where = f" (checkpoint has an array at {'/'.join(leaf_above)})" if leaf_above else ""
            problems.append(f"{name}: missing from the checkpoint{where}")
    if problems:
        shown = "\n  ".join(problems[:_MAX_REPORTED])
        more = (
            f"\n  ... and {len(problems) - _MAX_REPORTED} more"
            if len(problems) > _MAX_REPORTED
            else ""
        )
        raise CheckpointError(
            f"checkpoint params do not match the expected tree ({len(problems)} of {len(expected)} "
            f"expected arrays differ):\n  {shown}{more}"
        )
    return {path: stored[path] for path in expected}


def _densify(archive: Mapping[str, np.ndarray], name: str, key: str) -> np.ndarray:
    base = name.removesuffix(":shape")
    for part in ("row_ids", "rows"):
        if f"{base}:{part}" not in archive:
            raise CheckpointError(f"params/{key}: sparse entry without {base}:{part}")
    shape, row_ids, rows = archive[name], archive[f"{base}:row_ids"], archive[f"{base}:rows"]
    if (
        shape.ndim != 1
        or not np.issubdtype(shape.dtype, np.integer)
        or shape.size < 1
        or (shape < 0).any()
    ):
        raise CheckpointError(
            f"params/{key}:shape: expected a 1-D array of sizes, received {shape!r}"
        )
    full = tuple(int(s) for s in shape)
    if int(np.prod(full, dtype=np.float64)) > _MAX_NPZ_ELEMENTS:
        raise CheckpointError(
            f"params/{key}:shape: expected at most {_MAX_NPZ_ELEMENTS} elements, received {full}"
        )
    if row_ids.ndim != 1 or (row_ids.size and (row_ids.min() < 0 or row_ids.max() >= full[0])):
        raise CheckpointError(
            f"params/{key}:row_ids: expected 1-D row numbers in [0, {full[0]}), received {row_ids.shape}"
        )
    if rows.shape != (row_ids.size, *full[1:]):
        raise CheckpointError(
            f"params/{key}:rows: expected shape {(row_ids.size, *full[1:])}, received {rows.shape}"
        )
    dense = np.zeros(full, rows.dtype)
    dense[row_ids] = rows
    return dense


def _flatten(tree: Mapping[str, Any], what: str, prefix: Path = ()) -> dict[Path, Any]:
    if not isinstance(tree, Mapping):
        raise CheckpointError(f"{what}: expected a nested mapping, received {type(tree).__name__}")
    flat: dict[Path, Any] = {}
    for key, value in tree.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping):
            flat.update(_flatten(value, what, path))
        else:
            flat[path] = value
    return flat


def _unflatten(flat: Mapping[Path, Any] | Iterable[tuple[Path, Any]]) -> dict[str, Any]:
    items = flat.items() if isinstance(flat, Mapping) else flat
    tree: dict[str, Any] = {}
    for path, value in items:
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree

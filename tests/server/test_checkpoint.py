"""Checkpoint loading against openpi's own orbax checkpoints of the tiny reference models."""

from __future__ import annotations

import pathlib
import shutil
from collections.abc import Iterator
from typing import Any

import fsspec
import jax
import ml_dtypes
import numpy as np
import pytest
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

from latentpi.server.model.checkpoint import (
    CheckpointError,
    find_params_dir,
    load_params,
    load_params_npz,
    save_params,
)

REFERENCE = pathlib.Path("/work/shared/reference")
MODELS = ("pi0", "pi05")
EMBEDDING = ("PaliGemma", "llm", "embedder", "input_embedding")


def flat(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def shapes(tree: dict[str, Any]) -> dict[str, Any]:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def assert_bit_equal(got: dict[str, Any], want: dict[str, Any]) -> None:
    got_flat, want_flat = flat(got), flat(want)
    assert got_flat.keys() == want_flat.keys()
    for path, value in want_flat.items():
        other = np.asarray(got_flat[path])
        assert other.dtype == value.dtype, path
        assert other.shape == value.shape, path
        assert other.tobytes() == value.tobytes(), path


@pytest.fixture(scope="module", params=MODELS)
def model(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def npz_params(model: str) -> dict[str, Any]:
    return load_params_npz(REFERENCE / f"{model}_tiny.npz")


@pytest.fixture(scope="module")
def small_tree() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "enc": {
            "w": rng.standard_normal((3, 4)).astype(np.float32),
            "b": np.arange(4, dtype=np.float32),
        },
        "head": {"kernel": rng.standard_normal((4, 2)).astype(np.float32)},
        "steps": np.arange(5, dtype=np.int32),
    }


def test_restores_openpi_checkpoints_bit_exactly(model: str, npz_params: dict[str, Any]) -> None:
    assert_bit_equal(load_params(REFERENCE / f"{model}_tiny_ckpt"), npz_params)


def test_params_dir_and_file_url_give_the_same_tree(model: str, npz_params: dict[str, Any]) -> None:
    params_dir = REFERENCE / f"{model}_tiny_ckpt" / "params"
    assert find_params_dir(REFERENCE / f"{model}_tiny_ckpt") == params_dir
    assert find_params_dir(params_dir) == params_dir
    assert_bit_equal(load_params(str(params_dir)), npz_params)
    assert_bit_equal(load_params(f"file://{REFERENCE / f'{model}_tiny_ckpt'}"), npz_params)


def test_sparse_embedding_is_densified(model: str, npz_params: dict[str, Any]) -> None:
    with np.load(REFERENCE / f"{model}_tiny.npz") as z:
        base = "params/" + "/".join(EMBEDDING)
        row_ids, rows, shape = z[f"{base}:row_ids"], z[f"{base}:rows"], tuple(z[f"{base}:shape"])
    table = flat(npz_params)[EMBEDDING]
    assert table.shape == shape
    np.testing.assert_array_equal(table[row_ids], rows)
    others = np.setdiff1d(np.arange(shape[0]), row_ids)
    assert len(others) > 0 and not table[others].any()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_dtype_cast_while_reading(model: str, npz_params: dict[str, Any], dtype: str) -> None:
    want = jax.tree.map(
        lambda a: a.astype(np.dtype(dtype if dtype == "float32" else ml_dtypes.bfloat16)),
        npz_params,
    )
    got = load_params(REFERENCE / f"{model}_tiny_ckpt", dtype=dtype, expected=shapes(npz_params))
    assert_bit_equal(got, want)
    assert_bit_equal(load_params_npz(REFERENCE / f"{model}_tiny.npz", dtype=dtype), want)


def test_bad_dtype_is_named() -> None:
    with pytest.raises(CheckpointError, match=r"dtype: expected one of .*'float16'"):
        load_params(REFERENCE / "pi0_tiny_ckpt", dtype="float16")  # type: ignore[arg-type]


def test_restore_to_device_arrays(npz_params: dict[str, Any], model: str) -> None:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    got = load_params(REFERENCE / f"{model}_tiny_ckpt", dtype="bfloat16", sharding=sharding)
    leaves = jax.tree.leaves(got)
    assert all(isinstance(leaf, jax.Array) and leaf.sharding == sharding for leaf in leaves)
    assert all(leaf.dtype == jax.numpy.bfloat16 for leaf in leaves)
    table = np.asarray(flat(got)[EMBEDDING])
    np.testing.assert_array_equal(table, flat(npz_params)[EMBEDDING].astype(ml_dtypes.bfloat16))


def test_round_trip(tmp_path: pathlib.Path, small_tree: dict[str, Any]) -> None:
    bf16 = {
        **small_tree,
        "enc": {**small_tree["enc"], "w": small_tree["enc"]["w"].astype(ml_dtypes.bfloat16)},
    }
    written = save_params(tmp_path / "ckpt" / "params", bf16)
    assert written == (tmp_path / "ckpt" / "params").resolve()
    assert_bit_equal(load_params(tmp_path / "ckpt"), bf16)


def test_save_refuses_to_overwrite(tmp_path: pathlib.Path, small_tree: dict[str, Any]) -> None:
    save_params(tmp_path / "params", small_tree)
    with pytest.raises(CheckpointError, match="already exists"):
        save_params(tmp_path / "params", small_tree)
    changed = {**small_tree, "steps": np.arange(5, dtype=np.int32) * 2}
    save_params(tmp_path / "params", changed, force=True)
    assert_bit_equal(load_params(tmp_path / "params"), changed)


def test_cast_leaves_integer_leaves_alone(
    tmp_path: pathlib.Path, small_tree: dict[str, Any]
) -> None:
    save_params(tmp_path / "params", small_tree)
    got = load_params(tmp_path / "params", dtype="bfloat16")
    assert got["steps"].dtype == np.int32
    assert got["enc"]["w"].dtype == ml_dtypes.bfloat16


def test_value_suffix_is_dropped(tmp_path: pathlib.Path, small_tree: dict[str, Any]) -> None:
    wrapped = jax.tree.map(lambda a: {"value": a}, small_tree)
    save_params(tmp_path / "params", wrapped)
    assert_bit_equal(load_params(tmp_path / "params"), small_tree)
    assert_bit_equal(load_params(tmp_path / "params", expected=shapes(small_tree)), small_tree)


def test_value_suffix_kept_unless_on_every_path(
    tmp_path: pathlib.Path, small_tree: dict[str, Any]
) -> None:
    mixed = {
        **small_tree,
        "enc": {"w": {"value": small_tree["enc"]["w"]}, "b": small_tree["enc"]["b"]},
    }
    save_params(tmp_path / "params", mixed)
    assert_bit_equal(load_params(tmp_path / "params"), mixed)


def test_extra_keys_are_ignored(tmp_path: pathlib.Path, small_tree: dict[str, Any]) -> None:
    extra = {
        **small_tree,
        "ema": {"w": np.ones((1000, 10), np.float32)},
        "enc": {**small_tree["enc"], "x": np.ones(2)},
    }
    save_params(tmp_path / "params", extra)
    assert_bit_equal(load_params(tmp_path / "params", expected=shapes(small_tree)), small_tree)
    assert "ema" in load_params(tmp_path / "params")


def test_mismatches_name_the_first_differing_paths(
    tmp_path: pathlib.Path, small_tree: dict[str, Any]
) -> None:
    save_params(tmp_path / "params", small_tree)
    expected = shapes(small_tree)
    expected["enc"]["w"] = jax.ShapeDtypeStruct((3, 5), np.float32)
    expected["enc"]["missing"] = jax.ShapeDtypeStruct((1,), np.float32)
    expected["head"] = jax.ShapeDtypeStruct((4, 2), np.float32)  # a subtree in the checkpoint
    expected["steps"] = {
        "inner": jax.ShapeDtypeStruct((5,), np.int32)
    }  # an array in the checkpoint
    with pytest.raises(CheckpointError) as info:
        load_params(tmp_path / "params", expected=expected)
    lines = str(info.value).splitlines()
    assert "4 of 5 expected arrays differ" in lines[0]
    assert lines[1:] == [
        "  enc/w: shape mismatch, expected (3, 5), checkpoint has (3, 4)",
        "  enc/missing: missing from the checkpoint",
        "  head: expected an array, checkpoint has a subtree",
        "  steps/inner: missing from the checkpoint (checkpoint has an array at steps)",
    ]


def test_long_mismatch_lists_are_cut(tmp_path: pathlib.Path, small_tree: dict[str, Any]) -> None:
    save_params(tmp_path / "params", small_tree)
    expected = {f"layer_{i:02d}": jax.ShapeDtypeStruct((2,), np.float32) for i in range(20)}
    with pytest.raises(CheckpointError) as info:
        load_params(tmp_path / "params", expected=expected)
    message = str(info.value)
    assert "layer_00: missing" in message and "layer_07: missing" in message
    assert "layer_08" not in message
    assert "... and 12 more" in message


def test_full_size_structure_check_reports_real_openpi_names(
    npz_params: dict[str, Any], model: str
) -> None:
    expected = shapes(npz_params)
    expected["PaliGemma"]["llm"]["embedder"]["input_embedding"] = jax.ShapeDtypeStruct(
        (257152, 2048), np.float32
    )
    with pytest.raises(
        CheckpointError,
        match=r"PaliGemma/llm/embedder/input_embedding: shape mismatch, expected \(257152, 2048\)",
    ):
        load_params(REFERENCE / f"{model}_tiny_ckpt", expected=expected)


def test_expected_leaves_need_a_shape(small_tree: dict[str, Any], tmp_path: pathlib.Path) -> None:
    save_params(tmp_path / "params", small_tree)
    with pytest.raises(CheckpointError, match=r"expected\[steps\]: expected an object with .shape"):
        load_params(tmp_path / "params", expected={"steps": "int32[5]"})


def test_unreadable_paths(tmp_path: pathlib.Path) -> None:
    with pytest.raises(CheckpointError, match="nope"):
        load_params(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="expected an orbax checkpoint"):
        load_params(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "_METADATA").write_text("not json")
    with pytest.raises(CheckpointError, match="broken: no tree metadata"):
        load_params(tmp_path / "broken")


def test_checkpoint_without_params_item(tmp_path: pathlib.Path) -> None:
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(
            tmp_path / "other", args=ocp.args.PyTreeSave({"opt_state": {"mu": np.ones(2)}})
        )
    with pytest.raises(
        CheckpointError, match=r"expected a top-level item 'params', found \['opt_state'\]"
    ):
        load_params(tmp_path / "other")


def test_npz_sparse_entries_are_checked(tmp_path: pathlib.Path) -> None:
    base = "params/emb"
    good = {
        f"{base}:shape": np.array([6, 2]),
        f"{base}:row_ids": np.array([1, 4]),
        f"{base}:rows": np.ones((2, 2)),
    }
    np.savez(tmp_path / "good.npz", **good, **{"params/b": np.zeros(3)})
    dense = load_params_npz(tmp_path / "good.npz")
    np.testing.assert_array_equal(dense["emb"].sum(axis=1), [0, 2, 0, 0, 2, 0])
    for name, value, message in [
        (f"{base}:row_ids", np.array([1, 6]), r"row_ids: expected 1-D row numbers in \[0, 6\)"),
        (f"{base}:rows", np.ones((2, 3)), r"rows: expected shape \(2, 2\)"),
        (f"{base}:shape", np.array([2**20, 2**20]), "expected at most"),
    ]:
        np.savez(tmp_path / "bad.npz", **{**good, name: value})
        with pytest.raises(CheckpointError, match=message):
            load_params_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "none.npz", other=np.zeros(1))
    with pytest.raises(CheckpointError, match="expected entries named params/"):
        load_params_npz(tmp_path / "none.npz")


@pytest.fixture
def fake_gs(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[pathlib.Path]:
    """`gs://` served from a local directory through fsspec's protocol registry; a fresh cache."""
    remote = tmp_path / "remote"
    monkeypatch.setenv("OPENPI_DATA_HOME", str(tmp_path / "cache"))

    class LocalBuckets(DirFileSystem):
        protocol = "gs"

        def __init__(self, token: object = None, **kwargs: object) -> None:
            super().__init__(path=str(remote), fs=LocalFileSystem())

    original = fsspec.get_filesystem_class("gs")
    fsspec.register_implementation("gs", LocalBuckets, clobber=True)
    try:
        yield remote
    finally:
        fsspec.register_implementation("gs", original, clobber=True)


def test_gs_checkpoint_through_the_cache(fake_gs: pathlib.Path, tmp_path: pathlib.Path) -> None:
    shutil.copytree(
        REFERENCE / "pi0_tiny_ckpt", fake_gs / "openpi-assets" / "checkpoints" / "pi0_tiny"
    )
    url = "gs://openpi-assets/checkpoints/pi0_tiny"
    got = load_params(url, dtype="float32")
    assert_bit_equal(got, load_params_npz(REFERENCE / "pi0_tiny.npz"))
    cached = tmp_path / "cache" / "openpi-assets" / "checkpoints" / "pi0_tiny" / "params"
    assert (cached / "_METADATA").is_file()
    # The second load reads the cache: the remote copy can be gone.
    shutil.rmtree(fake_gs)
    assert_bit_equal(load_params(url), got)


@pytest.mark.parametrize("read_batch_bytes", [1, 64 * 1024])
def test_batched_reads_give_the_same_tree(
    model: str, npz_params: dict[str, Any], read_batch_bytes: int
) -> None:
    """Reading the leaves in many small groups (one leaf each at 1 byte) restores the same tree."""
    got = load_params(
        REFERENCE / f"{model}_tiny_ckpt", dtype="float32", read_batch_bytes=read_batch_bytes
    )
    assert_bit_equal(got, npz_params)

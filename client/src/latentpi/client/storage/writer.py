"""Crash-safe, resumable writing of a task's episodes (design and reasoning: docs/data-format.md).

An episode is written to `<task>.h5.d/episode_XXXX.h5.tmp` sample by sample, and published (fsync,
atomic rename to `.h5`) only once complete. The task file is then rewritten as a new small index of
external links under a temporary name and atomically replaced. A kill at any moment therefore
leaves: finished episodes in published files, at most one `.tmp` (removed on the next open), and a
task file that is either the old index or the new one. `consolidate` copies every episode into one
self-contained task file, replaces the index with it atomically, and only then removes the folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from latentpi.client.closing import ClosesOnExit
from latentpi.client.rollout import EpisodeResult, Sample
from latentpi.client.storage.condition import write_arrays
from latentpi.client.storage.encoding import (
    AXES_ATTR,
    LAYOUT_ATTR,
    LOGICAL_DTYPE_ATTR,
    bfloat16_datatype,
    chunk_shape,
    encode,
    write_rows,
)
from latentpi.client.storage.files import fsync_path, publish, remove
from latentpi.client.storage.layout import (
    TaskHeader,
    check_identity,
    decode_attrs,
    episode_dir,
    group_name,
    merge_runs,
    to_json,
)
from latentpi.client.storage.sources import own_groups, sources
from latentpi.protocol.errors import ValidationError

COMPRESSIONS = ("lzf", "gzip", "none")
REPLAY_GROUP = "replay"  # per-step and per-query arrays written once at `finish` (small)
BLOCK_BYTES = 4 << 20  # samples gathered per dataset write (bounds the memory an episode holds)


class TaskWriter(ClosesOnExit):
    """The one writer of a task file. Opening recovers from a crash and checks the header."""

    def __init__(self, path: str | Path, header: TaskHeader, *, compression: str = "lzf") -> None:
        if compression not in COMPRESSIONS:
            raise ValidationError("compression", f"one of {', '.join(COMPRESSIONS)}", compression)
        self.path = Path(path)
        self.dir = episode_dir(self.path)
        self.compression = compression
        self._attrs = header.attrs()
        self._condition = header.condition
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock: int | None = _lock(self.dir)
        try:
            self._recover()
        except BaseException:
            self._release()
            raise

    # -- state ------------------------------------------------------------------------------------
    @property
    def completed(self) -> frozenset[int]:
        return frozenset(sources(self.dir)) | frozenset(own_groups(self.path))

    def episode(
        self,
        episode_idx: int,
        *,
        init_state_idx: int,
        seed: int,
        attrs: Mapping[str, Any] | None = None,
    ) -> EpisodeWriter:
        """Start episode `episode_idx`; refused when it is already complete (never duplicated)."""
        if episode_idx in self.completed:
            raise ValidationError(
                "episode_idx", "an episode not yet written to this task file", episode_idx
            )
        self._unpack()
        attrs = {
            "episode_idx": episode_idx,
            "init_state_idx": init_state_idx,
            "seed": seed,
            **(attrs or {}),
        }
        return EpisodeWriter(self, episode_idx, attrs)

    # -- publishing -------------------------------------------------------------------------------
    def _published(self) -> None:
        """Called by an EpisodeWriter after its file got its final name."""
        self._write_index()

    def consolidate(self) -> None:
        """Copy every episode into one self-contained task file; then drop the episode folder."""
        found = sources(self.dir)
        if not found:
            return
        tmp = _tmp(self.path)
        with _new_file(tmp) as out:
            out.attrs.update(self._root_attrs())
            write_arrays(out, self._condition)
            for index, source in sorted(found.items()):
                with h5py.File(source, "r") as src:
                    src.copy(src[group_name(index)], out, name=group_name(index))
        publish(tmp, self.path)
        for source in set(found.values()):
            remove(source)

    def close(self, *, consolidate: bool = False) -> None:
        try:
            if consolidate:
                self.consolidate()
        finally:
            self._release()

    # -- internals --------------------------------------------------------------------------------
    def _recover(self) -> None:
        for leftover in [*self.dir.glob("*.tmp"), _tmp(self.path)]:
            remove(leftover)
        stored = self._stored_attrs()
        if stored is not None:
            check_identity(self.path, stored, decode_attrs(self._attrs))
            self._attrs["created"] = stored.get("created", self._attrs["created"])
            # the history of runs that wrote into the file grows; the other attributes are this run's
            new_runs = decode_attrs({"runs": self._attrs["runs"]})["runs"]
            self._attrs["runs"] = to_json(merge_runs(stored.get("runs"), new_runs))
        own = own_groups(self.path)
        if own:
            # A consolidated file: drop episode files it already holds (a crash after its replace).
            for index, source in sources(self.dir).items():
                if index in own:
                    remove(source)
            if not sources(self.dir):
                return
            self._unpack()
        self._write_index()

    def _stored_attrs(self) -> dict[str, Any] | None:
        candidates = [self.path] if self.path.exists() else []
        candidates += sorted(set(sources(self.dir).values()))
        for candidate in candidates:
            with h5py.File(candidate, "r") as f:
                return decode_attrs(f.attrs)
        return None

    def _root_attrs(self) -> dict[str, Any]:
        return self._attrs

    def _unpack(self) -> None:
        """Before adding episodes to a self-contained task file, move it into the folder as a
        source (`base_XXXX.h5`), so the index can link into it like into an episode file."""
        if not own_groups(self.path):
            return
        number = len(list(self.dir.glob("base_*.h5")))
        base = self.dir / f"base_{number:04d}.h5"
        # A hard link, then the index replaces the task file: the task file exists at every moment
        # (a rename would leave none until the index is written). A kill in between leaves the
        # same file under both names; recovery drops the base, which the task file holds.
        try:
            os.link(self.path, base)
        except OSError:  # a filesystem without hard links: a rename, recovered by the next open
            os.replace(self.path, base)
        fsync_path(self.dir)
        self._write_index()

    def _write_index(self) -> None:
        tmp = _tmp(self.path)
        with _new_file(tmp) as out:
            out.attrs.update(self._root_attrs())
            write_arrays(out, self._condition)
            for index, source in sorted(sources(self.dir).items()):
                target = os.path.relpath(source, self.path.parent)
                out[group_name(index)] = h5py.ExternalLink(target, "/" + group_name(index))
        publish(tmp, self.path)

    def _release(self) -> None:
        if self._lock is None:
            return
        if not sources(self.dir) and own_groups(self.path):
            shutil.rmtree(self.dir)  # consolidated: nothing left in the folder but the lock
        os.close(self._lock)
        self._lock = None


class EpisodeWriter:
    """Appends samples to one episode's temporary file; `finish` publishes it, `abort` drops it."""

    def __init__(self, task: TaskWriter, episode_idx: int, attrs: dict[str, Any]) -> None:
        self._task = task
        self.final = task.dir / f"{group_name(episode_idx)}.h5"
        self.tmp = _tmp(self.final)
        # no chunk cache: every write covers whole chunks, so caching them only adds a copy
        self._file: h5py.File | None = None
        try:
            self._file = h5py.File(self.tmp, "w", rdcc_nbytes=0)
            self._file.attrs.update(task._root_attrs())
            self._group = self._file.create_group(group_name(episode_idx))
            self._group.attrs.update(attrs)
        except BaseException:
            self.abort()
            raise
        self._count = 0  # samples added
        self._written = 0  # samples in the datasets; the rest wait in the blocks
        self._datasets: dict[str, h5py.Dataset] = {}
        self._blocks: dict[str, np.ndarray] = {}
        self._rows = 1  # samples per block

    def add(self, sample: Sample) -> None:
        """Append a sample. Small samples are gathered into blocks of up to BLOCK_BYTES and written
        one block per dataset call (h5py's per-call cost dominates small writes); a sample of
        BLOCK_BYTES or more is written at once. Nothing is visible before `finish` either way."""
        arrays = _sample_arrays(sample)
        stored = {name: encode(np.asarray(array))[0] for name, array in arrays.items()}
        if self._count == 0:
            self._start(arrays, stored, _dataset_attrs(sample))
        if set(arrays) != set(self._datasets):
            raise ValidationError(
                "sample arrays",
                f"the names of the first sample {sorted(self._datasets)}",
                sorted(arrays),
            )
        for name, array in stored.items():
            block = self._blocks[name]
            if array.shape != block.shape[1:] or array.dtype != block.dtype:
                raise ValidationError(
                    name, f"dtype {block.dtype} shape {block.shape[1:]}", arrays[name]
                )
        row = self._count - self._written
        for name, array in stored.items():
            self._blocks[name][row] = array
        self._count += 1
        if row + 1 == self._rows:
            self._flush()

    def _start(
        self,
        arrays: dict[str, np.ndarray],
        stored: dict[str, np.ndarray],
        attrs: dict[str, dict[str, Any]],
    ) -> None:
        """Create the datasets and the write blocks from the first sample."""
        for name, array in arrays.items():
            self._create(name, array, attrs[name])
        self._rows = max(1, BLOCK_BYTES // max(sum(a.nbytes for a in stored.values()), 1))
        self._blocks = {
            name: np.empty((self._rows, *a.shape), a.dtype) for name, a in stored.items()
        }

    def _flush(self) -> None:
        rows = self._count - self._written
        if rows == 0:
            return
        for name, dataset in self._datasets.items():
            dataset.resize(self._count, axis=0)
            write_rows(dataset, self._written, self._blocks[name][:rows])
        self._written = self._count

    def finish(self, result: EpisodeResult) -> None:
        """Write the outcome, close and publish; from here the episode survives any crash."""
        if self._file is None:
            raise RuntimeError(f"{self.final.name}: episode already finished or aborted")
        self._flush()
        self._group.attrs.update(
            {
                "success": bool(result.success),
                "total_steps": int(result.total_steps),
                "num_queries": int(result.num_queries),
                "num_samples": int(self._count),
                "duration_s": float(result.duration_s),
            }
        )
        if result.error is not None:
            self._group.attrs["error"] = result.error
        if result.env_seed is not None:
            self._group.attrs["env_seed"] = int(result.env_seed)
        self._group.attrs.update(_prompt_attrs(result))
        for name, array in result.replay.items():
            self._group.create_dataset(f"{REPLAY_GROUP}/{name}", data=np.asarray(array))
        self._file.close()
        self._file = None
        publish(self.tmp, self.final)
        self._task._published()

    def abort(self) -> None:
        """Drop the temporary file. Closing it may fail (a full disk: HDF5 flushes on close); the
        file goes either way, and the error that made us abort is the one that propagates."""
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()
        remove(self.tmp)

    def __enter__(self) -> EpisodeWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._file is not None:
            self.abort()

    def _create(self, name: str, array: np.ndarray, attrs: dict[str, Any]) -> None:
        stored, dtype_attrs = encode(np.asarray(array))
        compression = None if self._task.compression == "none" else self._task.compression
        bfloat16 = dtype_attrs.get(LOGICAL_DTYPE_ATTR) == "bfloat16"
        dataset = self._group.create_dataset(
            name,
            shape=(0, *stored.shape),
            maxshape=(None, *stored.shape),
            dtype=bfloat16_datatype(self._group) if bfloat16 else stored.dtype,
            chunks=chunk_shape(stored.shape, stored.dtype.itemsize),
            compression=compression,
            compression_opts=1 if compression == "gzip" else None,
            shuffle=compression is not None,
        )
        dataset.attrs.update({**dtype_attrs, **attrs})
        self._datasets[name] = dataset


def _prompt_attrs(result: EpisodeResult) -> dict[str, Any]:
    """The prompts the episode was run with and the server's intervention records."""
    attrs: dict[str, Any] = {}
    if result.prompt is not None:
        attrs["prompt"] = result.prompt
    if result.counterfactual_prompts:
        attrs["counterfactual_prompts"] = to_json(list(result.counterfactual_prompts))
    if result.interventions:
        attrs["interventions"] = to_json([dict(record) for record in result.interventions])
    return attrs


def _sample_arrays(sample: Sample) -> dict[str, np.ndarray]:
    """Every array of a sample by dataset name."""
    arrays: dict[str, np.ndarray] = {
        "timesteps": np.asarray(sample.timestep, dtype=np.int32),
        "actions": np.asarray(sample.actions),
        "states": np.asarray(sample.state),
    }
    for name, array in sample.latents.items():
        if name in arrays or "/" in name:
            raise ValidationError(
                "latent name", "a name other than timesteps/actions/states, without '/'", name
            )
        arrays[name] = array
    for name, image in sample.images.items():
        arrays[f"images/{name}"] = image
    return arrays


def _dataset_attrs(sample: Sample) -> dict[str, dict[str, Any]]:
    """The attributes each dataset gets (from the first sample: axes, the latents' layouts)."""
    attrs: dict[str, dict[str, Any]] = {
        "timesteps": _axes(),
        "actions": _axes("horizon", "action"),
        "states": _axes("state"),
    }
    for name, array in sample.latents.items():
        layout = sample.layouts.get(name)
        if layout is None:
            attrs[name] = _axes(*(f"axis_{i}" for i in range(np.ndim(array))))
        else:
            attrs[name] = {**_axes(*layout.axes), LAYOUT_ATTR: to_json(layout.to_wire())}
    for name in sample.images:
        attrs[f"images/{name}"] = _axes("height", "width", "channel")
    return attrs


def _axes(*names: str) -> dict[str, Any]:
    return {AXES_ATTR: ["sample", *names]}


@contextlib.contextmanager
def _new_file(tmp: Path) -> Iterator[h5py.File]:
    """`tmp` created for writing and closed; removed when writing it fails (on a full disk a
    partial index or consolidated copy would only hold the space until the next open). The error
    that stopped the writing propagates, not a close that fails after it."""
    try:
        out = h5py.File(tmp, "w")
    except BaseException:
        remove(tmp)
        raise
    try:
        yield out
        out.close()
    except BaseException:
        with contextlib.suppress(OSError):
            out.close()
        remove(tmp)
        raise


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _lock(folder: Path) -> int:
    """An advisory lock (released by the kernel if the process dies): one writer per task."""
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(f"{folder} is being written by another process") from None
    return fd

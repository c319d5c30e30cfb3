"""Lazy reading of a task file: nothing is loaded until an array is sliced.

with TaskFile(path) as task:
    task.attrs["instruction"], task.latent_spec, task.condition
    for episode in task.episodes:
        episode.success, episode.names
        last_layer = episode["text_only_hidden_states"][:, -1]   # reads only that layer
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from latentpi.client.closing import ClosesOnExit
from latentpi.client.storage.condition import Condition, read_condition
from latentpi.client.storage.encoding import AXES_ATTR, LAYOUT_ATTR, decode, logical_dtype, read
from latentpi.client.storage.layout import decode_attrs, episode_dir, episode_index, group_name
from latentpi.client.storage.sources import sources
from latentpi.protocol.latent_spec import LatentSpec


class LazyArray:
    """One stored array; indexing reads only the selected chunks (bfloat16 viewed back)."""

    def __init__(self, dataset: h5py.Dataset) -> None:
        self._dataset = dataset
        self.dtype = logical_dtype(dataset.dtype, dataset.attrs)
        self.axes: tuple[str, ...] = tuple(str(a) for a in dataset.attrs.get(AXES_ATTR, ()))
        # the server's description of one sample (shape, dtype, which layers/steps/segments)
        layout = dataset.attrs.get(LAYOUT_ATTR)
        self.layout: dict[str, Any] = json.loads(layout) if layout is not None else {}

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._dataset.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        return decode(read(self._dataset, key), self.dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self[()]
        return array if dtype is None else array.astype(dtype)

    def __repr__(self) -> str:
        return f"LazyArray({self._dataset.name}, shape={self.shape}, dtype={self.dtype}, axes={self.axes})"


class EpisodeView:
    """One episode's metadata and lazy arrays (`timesteps`, `actions`, `states`, latents by name,
    `images/image`, `images/wrist_image`)."""

    def __init__(self, group: h5py.Group) -> None:
        self._group = group
        self.attrs: dict[str, Any] = decode_attrs(group.attrs)

    @property
    def index(self) -> int:
        return int(self.attrs["episode_idx"])

    @property
    def success(self) -> bool:
        return bool(self.attrs["success"])

    @property
    def total_steps(self) -> int:
        return int(self.attrs["total_steps"])

    @property
    def init_state_idx(self) -> int:
        return int(self.attrs["init_state_idx"])

    @property
    def num_samples(self) -> int:
        return int(self.attrs["num_samples"])

    @property
    def names(self) -> tuple[str, ...]:
        names: list[str] = []
        self._group.visititems(
            lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None
        )
        return tuple(sorted(names))

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def __getitem__(self, name: str) -> LazyArray:
        item = self._group.get(name)
        if not isinstance(item, h5py.Dataset):
            raise KeyError(
                f"{self._group.name} has no array {name!r}; it has {', '.join(self.names)}"
            )
        return LazyArray(item)

    def axes(self, name: str) -> tuple[str, ...]:
        return self[name].axes

    def __repr__(self) -> str:
        return f"EpisodeView({self.index}, success={self.success}, samples={self.num_samples})"


class TaskFile(ClosesOnExit):
    """A task file opened read-only; episodes reached through external links are opened on access.

    An episode published after the index was last written (the collector killed between the two)
    is read from its own file in the episode folder, so no finished episode is ever missing.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = h5py.File(self.path, "r")
        self.attrs: dict[str, Any] = decode_attrs(self._file.attrs)
        self._groups: dict[int, h5py.Group] = {}
        self._extra: list[h5py.File] = []
        for name in self._file:
            index = episode_index(name)
            if index is not None and _resolves(self._file, name):
                self._groups[index] = self._file[name]
        for index, source in sources(episode_dir(self.path)).items():
            if index not in self._groups:
                extra = h5py.File(source, "r")
                self._extra.append(extra)
                self._groups[index] = extra[group_name(index)]

    @property
    def latent_spec(self) -> LatentSpec:
        return LatentSpec.from_wire(self.attrs["latent_spec"])

    @property
    def condition(self) -> Condition:
        """What the collection changed (interventions with their arrays, prompts); a file
        without the `condition` attribute reads as the baseline."""
        return read_condition(self._file, self.attrs.get("condition"))

    @property
    def episodes(self) -> list[EpisodeView]:
        return [EpisodeView(group) for _, group in sorted(self._groups.items())]

    def episode(self, index: int) -> EpisodeView:
        if index not in self._groups:
            raise KeyError(f"{self.path} has no episode {index}; it has {sorted(self._groups)}")
        return EpisodeView(self._groups[index])

    def close(self) -> None:
        for extra in self._extra:
            extra.close()
        self._file.close()


def _resolves(file: h5py.File, name: str) -> bool:
    """False for an external link whose target file is gone (e.g. removed by hand)."""
    try:
        return file.get(name) is not None
    except (KeyError, OSError):
        return False

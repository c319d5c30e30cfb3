"""Which episodes a task has, read from the published files only (never from `.tmp` files)."""

from __future__ import annotations

from pathlib import Path

import h5py

from latentpi.client.storage.layout import episode_dir, episode_index


def sources(folder: Path) -> dict[int, Path]:
    """Episode index -> the published file in the episode folder holding it (an episode file wins
    over a base file; both hold the same bytes when both exist)."""
    found: dict[int, Path] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob("base_*.h5")):
        for index in own_groups(path):
            found[index] = path
    for path in sorted(folder.glob("episode_*.h5")):
        index = episode_index(path.stem)
        if index is not None:
            found[index] = path
    return found


def own_groups(path: Path) -> set[int]:
    """Episodes stored in the file itself, not behind external links."""
    if not path.exists():
        return set()
    with h5py.File(path, "r") as f:
        return {
            index
            for name in f
            if (index := episode_index(name)) is not None
            and not isinstance(f.get(name, getlink=True), h5py.ExternalLink)
        }


def completed_episodes(path: str | Path) -> set[int]:
    """Indices of the task's finished episodes; an episode cut short by a crash is not among them."""
    path = Path(path)
    return set(sources(episode_dir(path))) | own_groups(path)

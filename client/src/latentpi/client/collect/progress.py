"""The progress bar while collecting and the summary at the end.

The bar counts episodes (those already in the files count as done from the start), shows the
success rate of this run's episodes, simulation steps per second (settle steps included) and
tqdm's ETA. The summary reads the files themselves, so a resumed run reports every episode.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from latentpi.client.collect.events import EpisodeDone, EpisodeRedone, Event
from latentpi.client.storage import TaskFile


class Progress:
    def __init__(self, total: int, done: int, *, enabled: bool | None = None) -> None:
        # enabled=None: tqdm's own choice (a bar on a terminal, nothing in a pipe)
        self._bar = tqdm(
            total=total,
            initial=done,
            unit="episode",
            desc="collect",
            disable=None if enabled is None else not enabled,
            dynamic_ncols=True,
        )
        self._start = time.monotonic()
        self.episodes = 0
        self.successes = 0
        self.env_steps = 0
        self.redone = 0

    def __call__(self, event: Event) -> None:
        if isinstance(event, EpisodeDone):
            self.episodes += 1
            self.successes += int(event.success)
            self.env_steps += event.env_steps
            self._bar.update(1)
            self._bar.set_postfix(
                success=f"{self.successes}/{self.episodes}",
                steps_s=f"{self.steps_per_s:.1f}",
                refresh=False,
            )
        elif isinstance(event, EpisodeRedone):
            self.redone += 1

    @property
    def steps_per_s(self) -> float:
        return self.env_steps / max(time.monotonic() - self._start, 1e-9)

    def close(self) -> None:
        self._bar.close()


@dataclass(frozen=True)
class TaskSummary:
    task_id: int
    name: str
    path: Path
    episodes: int
    successes: int
    size_bytes: int

    @property
    def success_rate(self) -> float:
        return self.successes / self.episodes if self.episodes else 0.0


def summarize(
    task_ids: Sequence[int], names: Sequence[str], paths: Sequence[Path]
) -> list[TaskSummary]:
    rows = []
    for task_id, name, path in zip(task_ids, names, paths, strict=True):
        with TaskFile(path) as task:
            outcomes = [bool(episode.success) for episode in task.episodes]
        rows.append(TaskSummary(task_id, name, path, len(outcomes), sum(outcomes), _size(path)))
    return rows


def _size(path: Path) -> int:
    """The task file plus any episode files it still links (an unconsolidated task)."""
    folder = path.with_name(path.name + ".d")
    extra = sum(f.stat().st_size for f in folder.glob("*.h5")) if folder.is_dir() else 0
    return path.stat().st_size + extra


def print_summary(rows: Sequence[TaskSummary], stream: TextIO) -> None:
    print(f"{'task':>4}  {'episodes':>8}  {'success':>7}  {'MB':>9}  file", file=stream)
    for row in rows:
        print(
            f"{row.task_id:>4}  {row.episodes:>8}  {row.success_rate:>7.0%}  "
            f"{row.size_bytes / 1e6:>9.3f}  {row.path}",
            file=stream,
        )
    episodes = sum(row.episodes for row in rows)
    successes = sum(row.successes for row in rows)
    total = sum(row.size_bytes for row in rows)
    rate = successes / episodes if episodes else 0.0
    print(f" all  {episodes:>8}  {rate:>7.0%}  {total / 1e6:>9.3f}", file=stream)

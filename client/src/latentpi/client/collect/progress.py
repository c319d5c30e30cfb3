"""The progress bar while collecting and the summary at the end.

The bar counts episodes (those already in the files count as done from the start), shows the
success rate of this run's episodes, simulation steps per second (settle steps included) and
tqdm's ETA. The summary reads the files themselves, so a resumed run reports every episode.
"""

from __future__ import annotations

import csv
import io
import json
import os
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
        self.errors = 0  # episodes recorded as failed because the simulation raised

    def __call__(self, event: Event) -> None:
        if isinstance(event, EpisodeDone):
            self.episodes += 1
            self.successes += int(event.success)
            self.env_steps += event.env_steps
            self.errors += int(event.error is not None)
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
    errors: int = 0  # episodes recorded as failed because the simulation raised

    @property
    def success_rate(self) -> float:
        return self.successes / self.episodes if self.episodes else 0.0


def summarize(
    task_ids: Sequence[int], names: Sequence[str], paths: Sequence[Path]
) -> list[TaskSummary]:
    return [
        _task_summary(task_id, name, path)
        for task_id, name, path in zip(task_ids, names, paths, strict=True)
    ]


def _task_summary(task_id: int, name: str, path: Path) -> TaskSummary:
    with TaskFile(path) as task:
        outcomes = [bool(episode.success) for episode in task.episodes]
        errors = sum("error" in episode.attrs for episode in task.episodes)
    return TaskSummary(task_id, name, path, len(outcomes), sum(outcomes), _size(path), errors)


SUCCESS_TABLE = "success"  # DIR/<suite>/success.csv and success.json
TABLE_COLUMNS = ("task_id", "task_name", "episodes", "successes", "success_rate", "errors", "file")


def write_success_table(suite_dir: Path) -> list[dict[str, object]]:
    """Every task file of the suite's folder (whichever run wrote it) as one row, plus `all`;
    written atomically to success.csv and success.json. The rows."""
    summaries = []
    for path in sorted(suite_dir.glob("task_*.h5"), key=_task_id):
        with TaskFile(path) as task:
            task_id, name = int(task.attrs["task_id"]), str(task.attrs["task_name"])
        summaries.append(_task_summary(task_id, name, path))
    rows = [
        _row(s.task_id, s.name, s.episodes, s.successes, s.errors, s.path.name) for s in summaries
    ]
    total = [sum(s.episodes for s in summaries), sum(s.successes for s in summaries)]
    rows.append(_row("all", "", *total, sum(s.errors for s in summaries), ""))
    _write_atomic(suite_dir / f"{SUCCESS_TABLE}.json", json.dumps(rows, indent=1) + "\n")
    lines = io.StringIO()
    writer = csv.DictWriter(lines, TABLE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write_atomic(suite_dir / f"{SUCCESS_TABLE}.csv", lines.getvalue())
    return rows


def _task_id(path: Path) -> int:
    return int(path.name.split("_")[1])


def _row(
    task_id: int | str, name: str, episodes: int, successes: int, errors: int, file: str
) -> dict[str, object]:
    rate = round(successes / episodes, 6) if episodes else None
    values = (task_id, name, episodes, successes, rate, errors, file)
    return dict(zip(TABLE_COLUMNS, values, strict=True))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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

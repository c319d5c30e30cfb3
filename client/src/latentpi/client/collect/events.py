"""What a worker tells the collector while it runs (small, picklable: they cross process queues)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EpisodeDone:
    task_id: int
    episode_idx: int
    success: bool
    env_steps: int  # settle period included: the simulation work done
    duration_s: float
    error: str | None = None  # the simulation raised: recorded as a failed episode


@dataclass(frozen=True)
class EpisodeRedone:
    task_id: int
    episode_idx: int
    reason: str


@dataclass(frozen=True)
class TaskDone:
    task_id: int
    path: str


@dataclass(frozen=True)
class WorkerFailed:
    """A worker stopped on an error; `kind` is the exception's class name, `message` its text."""

    task_id: int | None
    kind: str
    message: str


Event = EpisodeDone | EpisodeRedone | TaskDone | WorkerFailed

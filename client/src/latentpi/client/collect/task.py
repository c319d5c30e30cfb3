"""One task's trials into its one HDF5 file, as openpi's LIBERO example runs them.

One environment per task (seeded once, reset per trial, as openpi), trial k from init state k.
Completed episodes (the published files, never the index) are skipped; an episode cut short by a
lost connection is dropped (its temporary file deleted, nothing half-written survives) and redone
from its init state once the client has reconnected.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from latentpi.client.collect.events import EpisodeDone, EpisodeRedone, Event, TaskDone
from latentpi.client.collect.options import CollectOptions
from latentpi.client.libero_env import TaskInfo, close_env, load_init_states, make_env
from latentpi.client.policy_client import ConnectionLost, ServerUnavailable
from latentpi.client.rollout import EpisodeResult, Policy, run_episode
from latentpi.client.storage import TaskHeader, TaskWriter, task_path
from latentpi.protocol.latent_spec import LatentSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskJob:
    """Everything a worker needs for one task (picklable)."""

    task: TaskInfo
    header: TaskHeader
    options: CollectOptions

    @property
    def spec(self) -> LatentSpec:
        return self.header.latent_spec

    @property
    def path(self) -> str:
        t = self.task
        return str(task_path(self.options.out, t.suite, t.task_id, t.name))


def collect_task(job: TaskJob, policy: Policy, report: Callable[[Event], None]) -> None:
    """Run every trial of the task not yet in its file, then consolidate the file."""
    options = job.options
    with TaskWriter(job.path, job.header, compression=options.compression) as writer:
        pending = [k for k in range(options.trials) if k not in writer.completed]
        if pending:
            env = make_env(job.task, seed=options.seed)
            try:
                init_states = load_init_states(job.task)
                for k in pending:
                    _episode_with_retries(job, writer, env, init_states, k, policy, report)
            finally:
                close_env(env)
        writer.close(consolidate=True)
    report(TaskDone(job.task.task_id, job.path))


def _episode_with_retries(
    job: TaskJob,
    writer: TaskWriter,
    env: Any,
    init_states: np.ndarray,
    k: int,
    policy: Policy,
    report: Callable[[Event], None],
) -> EpisodeResult:
    options = job.options
    for attempt in range(options.episode_retries + 1):
        try:
            result = _episode(job, writer, env, init_states, k, policy)
        except ConnectionLost as error:
            logger.warning(
                "task %d episode %d: %s; redoing the episode (attempt %d of %d)",
                job.task.task_id,
                k,
                error,
                attempt + 2,
                options.episode_retries + 1,
            )
            report(EpisodeRedone(job.task.task_id, k, str(error)))
            continue
        report(
            EpisodeDone(
                job.task.task_id,
                k,
                result.success,
                result.total_steps + options.num_steps_wait,
                result.duration_s,
            )
        )
        return result
    raise ServerUnavailable(
        f"task {job.task.task_id} episode {k}: the connection dropped in each of "
        f"{options.episode_retries + 1} attempts"
    )


def _episode(
    job: TaskJob, writer: TaskWriter, env: Any, init_states: np.ndarray, k: int, policy: Policy
) -> EpisodeResult:
    options = job.options
    attrs = {
        "stride": options.stride,
        "replan_steps": options.replan_steps,
        "num_steps_wait": options.num_steps_wait,
        "max_steps": options.horizon,
    }
    with writer.episode(k, init_state_idx=k, seed=options.seed, attrs=attrs) as episode:
        result = run_episode(
            env,
            job.task,
            k,
            policy,
            max_steps=options.horizon,
            stride=options.stride,
            replan_steps=options.replan_steps,
            num_steps_wait=options.num_steps_wait,
            latent_spec=job.spec,
            record_images=options.save_images,
            on_sample=episode.add,
            init_states=init_states,
        )
        episode.finish(result)  # an exception before this drops the episode's .tmp
    return result

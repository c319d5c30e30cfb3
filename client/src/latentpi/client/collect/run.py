"""`collect(options)`: check everything, start or reach the server, run the tasks, summarize.

Order matters for failing fast: arguments and LIBERO's task list are checked before the embedded
server starts; the existing files (identity: task, model, latent spec; lock: no other writer) are
checked once the server's metadata is known and before any simulation.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentpi.client.collect.events import Event
from latentpi.client.collect.options import CollectOptions, check_options, check_trials, task_range
from latentpi.client.collect.progress import Progress, TaskSummary, summarize
from latentpi.client.collect.task import TaskJob
from latentpi.client.collect.workers import connect, run_jobs
from latentpi.client.libero_env import TaskInfo, list_tasks
from latentpi.client.server_process import EmbeddedServer
from latentpi.client.storage import TaskHeader, TaskWriter
from latentpi.client.storage.layout import episode_dir
from latentpi.protocol.latent_spec import LatentSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CollectResult:
    tasks: list[TaskSummary]
    episodes_run: int  # by this run (resumed ones excluded)
    redone: int  # episodes redone after a lost connection
    steps_per_s: float


def plan_tasks(options: CollectOptions) -> tuple[LatentSpec, list[TaskInfo]]:
    """Check the arguments (no server, no simulation); the spec and the selected tasks."""
    spec = check_options(options)
    tasks = list_tasks(options.suite)
    selected = [tasks[i] for i in task_range(options.tasks, len(tasks))]
    check_trials(options.trials, [task.num_init_states for task in selected])
    return spec, selected


def collect(
    options: CollectOptions,
    *,
    on_event: Callable[[Event], None] | None = None,
    progress: bool | None = None,
) -> CollectResult:
    spec, tasks = plan_tasks(options)
    with _server_url(options, spec) as url:
        with connect(url, options.api_key, options.retry_timeout_s, None) as client:
            metadata = client.metadata
        jobs = [TaskJob(task, _header(task, spec, metadata, options), options) for task in tasks]
        done = sum(_completed(job) for job in jobs)
        bar = Progress(len(jobs) * options.trials, done, enabled=progress)

        def report(event: Event) -> None:
            bar(event)
            if on_event is not None:
                on_event(event)

        try:
            run_jobs(jobs, url, options.api_key, metadata, options.workers, report)
        finally:
            bar.close()
    rows = summarize(
        [job.task.task_id for job in jobs],
        [job.task.name for job in jobs],
        [Path(job.path) for job in jobs],
    )
    return CollectResult(rows, bar.episodes, bar.redone, bar.steps_per_s)


@contextlib.contextmanager
def _server_url(options: CollectOptions, spec: LatentSpec) -> Iterator[str]:
    if not options.embedded:
        yield options.server
        return
    logger.info("starting the embedded server (%s)", options.config)
    # Batches never exceed the workers' count; compiling those sizes with this run's spec at
    # start-up keeps compiles out of the episodes.
    warmup = [
        *("--max-batch", str(max(1, options.workers)), "--warmup-batch-sizes", "all"),
        *("--warmup-latents", json.dumps(spec.to_wire())),
    ]
    with EmbeddedServer(options.config, api_key=options.api_key, extra_args=warmup) as server:
        yield server.url


def _header(
    task: TaskInfo, spec: LatentSpec, metadata: Mapping[str, Any], options: CollectOptions
) -> TaskHeader:
    config = metadata.get("config", {})
    return TaskHeader(
        suite=task.suite,
        task_id=task.task_id,
        task_name=task.name,
        instruction=task.instruction,
        bddl_file=task.bddl_file,
        model_config=str(config.get("name", metadata.get("model", "unknown"))),
        checkpoint=str(config.get("checkpoint", "unknown")),
        latent_spec=spec,
        server_metadata=metadata,
        arguments=options.arguments(),
    )


def _completed(job: TaskJob) -> int:
    """Episodes already in the task's file, after recovery and the identity check (which raises
    ValidationError for another task, model or spec, and RuntimeError while another writer runs)."""
    path = Path(job.path)
    if not (path.exists() or episode_dir(path).exists()):
        return 0
    with TaskWriter(path, job.header, compression=job.options.compression) as writer:
        return sum(1 for k in writer.completed if k < job.options.trials)

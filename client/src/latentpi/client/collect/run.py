"""`collect(options)`: check everything, start or reach the server, run the tasks, summarize.

Order matters for failing fast: arguments and LIBERO's task list are checked before the embedded
server starts; the existing files (identity: task, model, latent spec; lock: no other writer) are
checked once the server's metadata is known and before any simulation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentpi.client.collect.condition import check_prompts, check_with_server, load_condition
from latentpi.client.collect.disk import no_space_message
from latentpi.client.collect.events import Event
from latentpi.client.collect.identity import config_of, model_identity, same_model
from latentpi.client.collect.options import (
    CollectOptions,
    check_options,
    check_trials,
    episode_range,
    option_warnings,
    select_tasks,
)
from latentpi.client.collect.progress import Progress, TaskSummary, summarize, write_success_table
from latentpi.client.collect.task import TaskJob
from latentpi.client.collect.workers import CollectError, connect, run_jobs
from latentpi.client.libero_env import TaskInfo, env_arguments, list_tasks
from latentpi.client.policy_client import ServerChanged
from latentpi.client.server_process import EmbeddedServer
from latentpi.client.storage import TaskHeader, TaskWriter
from latentpi.client.storage.condition import Condition
from latentpi.client.storage.layout import RANDOM_WEIGHTS, episode_dir
from latentpi.protocol.latent_spec import LatentSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CollectResult:
    tasks: list[TaskSummary]
    episodes_run: int  # by this run (resumed ones excluded)
    redone: int  # episodes redone after a lost connection or a simulation error
    steps_per_s: float
    warnings: list[str] = dataclasses.field(default_factory=list)  # also in the files' attributes


def plan_tasks(options: CollectOptions) -> tuple[LatentSpec, list[TaskInfo]]:
    """Check the arguments (no server, no simulation); the spec and the selected tasks."""
    spec = check_options(options)
    tasks = list_tasks(options.suite)
    selected = [tasks[i] for i in select_tasks(options.tasks, [task.name for task in tasks])]
    check_trials(options.trials, [task.num_init_states for task in selected])
    return spec, selected


def collect(
    options: CollectOptions,
    *,
    on_event: Callable[[Event], None] | None = None,
    progress: bool | None = None,
) -> CollectResult:
    try:
        return _collect(options, on_event, progress)
    except (OSError, RuntimeError) as error:  # the output volume full: a clear stop, no traceback
        message = no_space_message(error, options.out)
        if message is None:
            raise
        raise CollectError("DiskFull", message) from error


def _collect(
    options: CollectOptions,
    on_event: Callable[[Event], None] | None,
    progress: bool | None,
) -> CollectResult:
    spec, tasks = plan_tasks(options)
    condition = load_condition(options)
    check_prompts(condition, [task.instruction for task in tasks])
    warnings = option_warnings(options, len(tasks))
    for warning in warnings:
        logger.warning("%s", warning)
    with _server_url(options, spec) as url:
        metadata = _metadata(url, options)
        # before any file is opened: a model the interventions do not fit is a usage error
        check_with_server(condition, url, options, metadata, tasks[0].instruction)
        warnings += _model_warnings(metadata)
        jobs = make_jobs(options, spec, tasks, metadata, warnings, condition)
        done = sum(_completed(job) for job in jobs)
        bar = Progress(len(jobs) * len(episode_range(options)), done, enabled=progress)

        def report(event: Event) -> None:
            bar(event)
            if on_event is not None:
                on_event(event)

        try:
            if options.backend == "ray":
                from latentpi.client.collect.ray_backend import run_ray

                run_ray(jobs, options, metadata, report)
            else:
                run_jobs(jobs, url, options.api_key, metadata, options.workers, report)
        finally:
            bar.close()
    rows = summarize(
        [job.task.task_id for job in jobs],
        [job.task.name for job in jobs],
        [Path(job.path) for job in jobs],
    )
    write_success_table(options.out / options.suite)
    return CollectResult(rows, bar.episodes, bar.redone, bar.steps_per_s, warnings)


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


def _metadata(url: str, options: CollectOptions) -> dict[str, Any]:
    """The server's metadata; with several servers, theirs must be the same (one model per file)."""
    with connect(url, options.api_key, options.retry_timeout_s, None) as client:
        metadata = client.metadata
    for other in options.more_servers:
        with connect(other, options.api_key, options.retry_timeout_s, None) as client:
            if not same_model(client.metadata, metadata):
                raise ServerChanged(
                    f"{other} serves another model than {url}: every --server must serve the same"
                )
    return metadata


def make_jobs(
    options: CollectOptions,
    spec: LatentSpec,
    tasks: list[TaskInfo],
    metadata: Mapping[str, Any],
    warnings: list[str] | None = None,
    condition: Condition | None = None,
) -> list[TaskJob]:
    """One job per task, all of one run (one run id in the files' history); the condition is
    loaded from the options unless given."""
    run_id = uuid.uuid4().hex
    condition = load_condition(options) if condition is None else condition
    return [
        TaskJob(
            task, _header(task, spec, metadata, options, warnings or [], run_id, condition), options
        )
        for task in tasks
    ]


def _model_warnings(metadata: Mapping[str, Any]) -> list[str]:
    checkpoint = str(config_of(metadata).get("checkpoint", ""))
    if not checkpoint.startswith(RANDOM_WEIGHTS):
        return []
    warning = (
        f"the policy has RANDOM WEIGHTS ({checkpoint}): its actions and latents are noise, "
        "useful only to test the pipeline (pass --server ws://HOST:PORT of a server with a "
        "real checkpoint, or --config pi0_libero / pi05_libero)"
    )
    logger.warning("!!! %s", warning)
    return [warning]


def _header(
    task: TaskInfo,
    spec: LatentSpec,
    metadata: Mapping[str, Any],
    options: CollectOptions,
    warnings: list[str],
    run_id: str,
    condition: Condition,
) -> TaskHeader:
    model_config, checkpoint = model_identity(metadata)
    return TaskHeader(
        suite=task.suite,
        task_id=task.task_id,
        task_name=task.name,
        instruction=task.instruction,
        bddl_file=task.bddl_file,
        model_config=model_config,
        checkpoint=checkpoint,
        latent_spec=spec,
        server_metadata=metadata,
        arguments=options.arguments(),
        episode_arguments=options.episode_arguments(),
        bddl=Path(task.bddl_file).read_text(),
        env_args=env_arguments(),
        warnings=tuple(warnings),
        run_id=run_id,
        condition=condition,
    )


def _completed(job: TaskJob) -> int:
    """Episodes already in the task's file, after recovery and the identity check (which raises
    ValidationError for another task, model or spec, and RuntimeError while another writer runs)."""
    path = Path(job.path)
    if not (path.exists() or episode_dir(path).exists()):
        return 0
    with TaskWriter(path, job.header, compression=job.options.compression) as writer:
        return len(writer.completed & set(episode_range(job.options)))

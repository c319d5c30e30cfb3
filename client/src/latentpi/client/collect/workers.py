"""Run task jobs in this process or in W spawned worker processes, reporting events.

Parallelism is across tasks: each worker takes the next task from a queue, owns that task's file
for as long as it runs it (the storage lock enforces one writer per file), runs its trials with its
own environment and its own connection to the shared server, and sends small events back. Latents
never cross a process boundary: a worker writes them straight to its task's file. A suite has 10+
tasks, so W workers stay busy until the last W tasks; the bench measures the speed-up.

Workers die with the collector (SIGKILL via `PR_SET_PDEATHSIG`, like the embedded server), so a
killed collector leaves no simulation running and no file lock held.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from latentpi.client.collect.disk import no_space_message
from latentpi.client.collect.events import Event, WorkerFailed
from latentpi.client.collect.identity import same_model
from latentpi.client.collect.task import TaskJob, collect_task
from latentpi.client.policy_client import Backoff, LatentpiPolicyClient, ServerChanged
from latentpi.client.server_process import die_with_parent

logger = logging.getLogger(__name__)


class CollectError(RuntimeError):
    """A run stopped on an error; `kind` names it (ServerRejected, ServerUnavailable, ...)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def connect(
    url: str,
    api_key: str | None,
    retry_timeout_s: float,
    expected: Mapping[str, Any] | None,
    request_timeout_s: float | None = None,
) -> LatentpiPolicyClient:
    """A client that waits up to `retry_timeout_s` for a lost server and refuses a changed one."""
    backoff = Backoff(attempts=10_000, max_total_s=retry_timeout_s, max_delay_s=5.0)
    # a server back with another device or batching setting still serves the same model
    client = LatentpiPolicyClient(
        url, api_key, backoff=backoff, request_timeout_s=request_timeout_s, same_model=same_model
    )
    if expected is not None and not same_model(client.metadata, expected):
        client.close()
        raise ServerChanged(f"{url} serves a different model than when the collection started")
    return client


def run_jobs(
    jobs: Sequence[TaskJob],
    url: str,
    api_key: str | None,
    metadata: Mapping[str, Any],
    workers: int,
    on_event: Callable[[Event], None],
) -> None:
    """Run every job; raise CollectError on the first failure (other workers are stopped)."""
    if not jobs:
        return
    retry_s = jobs[0].options.retry_timeout_s
    if workers <= 1 or len(jobs) == 1:
        with connect(url, api_key, retry_s, metadata, jobs[0].options.request_timeout_s) as client:
            for job in jobs:
                collect_task(job, client, on_event)
        return
    _run_pool(jobs, url, api_key, metadata, min(workers, len(jobs)), on_event)


def _run_pool(
    jobs: Sequence[TaskJob],
    url: str,
    api_key: str | None,
    metadata: Mapping[str, Any],
    workers: int,
    on_event: Callable[[Event], None],
) -> None:
    context = multiprocessing.get_context("spawn")
    retry_s = jobs[0].options.retry_timeout_s
    todo: Any = context.Queue()
    events: Any = context.Queue()
    for job in jobs:
        todo.put(job)
    for _ in range(workers):
        todo.put(None)
    level = logging.getLogger().getEffectiveLevel()
    processes = [
        context.Process(
            target=_worker_main,
            args=(
                os.getpid(),
                todo,
                events,
                url,
                api_key,
                dict(metadata),
                (retry_s, jobs[0].options.request_timeout_s),
                level,
            ),
            name=f"latentpi-collect-{i}",
            daemon=True,
        )
        for i in range(workers)
    ]
    for process in processes:
        process.start()
    try:
        _drain(processes, events, on_event)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()


def _drain(processes: Sequence[Any], events: Any, on_event: Callable[[Event], None]) -> None:
    while True:
        try:
            event = events.get(timeout=0.5)
        except queue.Empty:
            if all(not process.is_alive() for process in processes):
                break
            continue
        if isinstance(event, WorkerFailed):
            raise CollectError(event.kind, event.message)
        on_event(event)
    crashed = [p for p in processes if p.exitcode not in (0, None)]
    if crashed:
        raise CollectError(
            "WorkerCrashed",
            f"worker {crashed[0].name} exited with code {crashed[0].exitcode} (see the log above)",
        )


def _worker_main(
    parent_pid: int,
    todo: Any,
    events: Any,
    url: str,
    api_key: str | None,
    metadata: dict[str, Any],
    timeouts: tuple[float, float | None],
    level: int,
) -> None:
    die_with_parent(parent_pid)
    # terminate() (another worker failed): unwind, so the episode in flight drops its .tmp and
    # the task's lock and environment are released
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"
    )
    job: TaskJob | None = None
    try:
        with connect(url, api_key, timeouts[0], metadata, timeouts[1]) as client:
            while (job := todo.get()) is not None:
                collect_task(job, client, events.put)
    except Exception as error:
        logger.debug("worker failed", exc_info=True)
        task_id = job.task.task_id if job is not None else None
        full = no_space_message(error, job.options.out) if job is not None else None
        kind, message = ("DiskFull", full) if full else (type(error).__name__, str(error))
        events.put(WorkerFailed(task_id, kind, message))
        events.close()
        events.join_thread()
        raise SystemExit(1) from None
    events.close()
    events.join_thread()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    del frame
    raise SystemExit(128 + signum)

"""`--backend ray`: episodes as Ray work units, run by actors that each own one LIBERO env, against
one or more policy servers; results stream to one writer per task file on the driver.

Why this shape:
- The unit is the episode (not the task): each is reproducible on its own (collect/seeding.py), so
  any actor on any host can run any episode, and a lost one is simply run again, identically.
- An actor (`EpisodeRunner`) keeps its env across episodes (an env costs seconds to build); the
  driver gives an idle actor an episode of the task it already holds when there is one.
- Servers are chosen by load (fewest episodes in flight). A server that is gone (the actor's
  client gives up reconnecting after `SERVER_GIVE_UP_S`) or stops answering (no reply within
  `--request-timeout`, default `REQUEST_TIMEOUT_S`) is taken out, and the episode goes to another
  server; the run stops only when no server is left.
- A lost actor or worker node: actors restart (`max_restarts=-1`, possibly on another node) and Ray
  retries their calls (`max_task_retries`); a call that still fails is resubmitted by the driver.
- Writing stays where the crash safety is: the driver holds one `TaskWriter` per task file (the
  storage lock: one writer) and writes each returned episode at once — published or not at all,
  never twice (an episode already complete is skipped). Samples travel through Ray's object store.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from latentpi.client.collect.events import EpisodeDone, EpisodeRedone, Event, TaskDone
from latentpi.client.collect.identity import same_model
from latentpi.client.collect.options import CollectOptions, episode_range
from latentpi.client.collect.task import TaskEnv, TaskJob, episode_attrs, run_one_episode
from latentpi.client.collect.workers import CollectError
from latentpi.client.libero_env import TaskInfo, load_init_states
from latentpi.client.policy_client import (
    Backoff,
    ConnectionLost,
    LatentpiPolicyClient,
    ServerChanged,
    ServerUnavailable,
)
from latentpi.client.rollout import EpisodeResult, Sample, SimulationError
from latentpi.client.storage import TaskWriter

logger = logging.getLogger(__name__)

SERVER_GIVE_UP_S = 10.0  # an actor reports a server lost after this long without a connection
REQUEST_TIMEOUT_S = 300.0  # a server silent this long on one request is taken out
ACTOR_TASK_RETRIES = 3  # Ray re-runs a call whose actor died (its node lost) this often


@dataclass(frozen=True)
class EpisodeOutcome:
    """What an actor sends back: the finished episode, or the server it could not reach."""

    task_id: int
    episode_idx: int
    result: EpisodeResult | None = None
    samples: list[Sample] = field(default_factory=list)
    server_lost: str | None = None  # the URL that stopped answering; nothing was run to the end
    redone: list[str] = field(default_factory=list)  # reasons the actor redid the episode


class EpisodeRunner:
    """A Ray actor's state: one LIBERO env (rebuilt for another task or after a simulation error)
    and one client per server URL (made on first use)."""

    def __init__(self, api_key: str | None, metadata: Mapping[str, Any]) -> None:
        self._api_key, self._metadata = api_key, dict(metadata)
        self._env: TaskEnv | None = None
        self._init_states: Any = None
        self._clients: dict[str, LatentpiPolicyClient] = {}

    def run(self, job: TaskJob, k: int, url: str) -> EpisodeOutcome:
        redone: list[str] = []
        errors = 0
        while True:
            env = self._env_for(job.task)
            samples: list[Sample] = []
            try:
                client = self._client(url, job.options.request_timeout_s)
                result = run_one_episode(job, env.env, self._init_states, k, client, samples.append)
            except SimulationError as error:
                env.rebuild()
                if errors >= job.options.error_retries:
                    return EpisodeOutcome(job.task.task_id, k, error.result, samples, None, redone)
                errors += 1
                redone.append(f"simulation error: {error}")
                continue
            except ConnectionLost as error:  # the server is back: run the episode again there
                if len(redone) >= job.options.episode_retries:
                    return self._lost(job, k, url, redone)
                redone.append(str(error))
                continue
            except ServerUnavailable:
                return self._lost(job, k, url, redone)
            return EpisodeOutcome(job.task.task_id, k, result, samples, None, redone)

    def _lost(self, job: TaskJob, k: int, url: str, redone: list[str]) -> EpisodeOutcome:
        client = self._clients.pop(url, None)
        if client is not None:
            client.close()
        return EpisodeOutcome(job.task.task_id, k, None, [], url, redone)

    def _env_for(self, task: TaskInfo) -> TaskEnv:
        if self._env is None or self._env.task != task:
            if self._env is not None:
                self._env.close()
            self._env = TaskEnv(task)
            self._init_states = load_init_states(task)
        return self._env

    def _client(self, url: str, request_timeout_s: float | None) -> LatentpiPolicyClient:
        if url not in self._clients:
            backoff = Backoff(attempts=100, max_total_s=SERVER_GIVE_UP_S, max_delay_s=2.0)
            timeout = REQUEST_TIMEOUT_S if request_timeout_s is None else request_timeout_s
            client = LatentpiPolicyClient(
                url,
                self._api_key,
                backoff=backoff,
                request_timeout_s=timeout,
                same_model=same_model,  # also after a reconnect: host settings may differ
            )
            if not same_model(client.metadata, self._metadata):
                client.close()
                raise ServerChanged(f"{url} serves a different model than the run's")
            self._clients[url] = client
        return self._clients[url]


class ServerPool:
    """The live servers and the episodes in flight on each; the least loaded gets the next one."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.load = {url: 0 for url in urls}

    def take(self) -> str:
        if not self.load:
            raise CollectError("ServerUnavailable", "every policy server stopped answering")
        url = min(self.load, key=lambda u: self.load[u])
        self.load[url] += 1
        return url

    def give_back(self, url: str) -> None:
        if url in self.load:
            self.load[url] -= 1

    def remove(self, url: str) -> None:
        if self.load.pop(url, None) is not None:
            logger.warning("policy server %s stopped answering: taken out of the run", url)


@dataclass
class _Flight:
    actor: Any
    job: TaskJob
    k: int
    url: str


def run_ray(
    jobs: Sequence[TaskJob],
    options: CollectOptions,
    metadata: Mapping[str, Any],
    on_event: Callable[[Event], None],
) -> None:
    """Run every pending episode of `jobs` on Ray actors; write them here, one writer per task."""
    import ray

    if not ray.is_initialized():
        # a local Ray (no address) gets a CPU per actor, as the local backend's workers would
        cpus = max(os.cpu_count() or 1, options.workers) if options.ray_address is None else None
        ray.init(
            address=options.ray_address,
            num_cpus=cpus,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    writers = {job.task.task_id: _open_writer(job) for job in jobs}
    try:
        queue = collections.deque(
            (job, k)
            for job in jobs
            for k in episode_range(options)
            if k not in writers[job.task.task_id].completed
        )
        if queue:
            _Driver(ray, options, metadata, writers, on_event).run(queue)
        for job in jobs:
            writers.pop(job.task.task_id).close(consolidate=True)
            on_event(TaskDone(job.task.task_id, job.path))
    finally:
        for writer in writers.values():
            writer.close()


def _actor_count(ray: Any, workers: int) -> int:
    """At most one actor per CPU of the cluster: an actor that cannot be placed would hold its
    episodes forever."""
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if workers > cpus:
        logger.warning("--workers %d > the cluster's %d CPUs: %d actors", workers, cpus, cpus)
    return max(1, min(workers, cpus))


def _open_writer(job: TaskJob) -> TaskWriter:
    return TaskWriter(job.path, job.header, compression=job.options.compression)


class _Driver:
    """Hands episodes to idle actors, collects what comes back, writes it."""

    def __init__(
        self,
        ray: Any,
        options: CollectOptions,
        metadata: Mapping[str, Any],
        writers: Mapping[int, TaskWriter],
        on_event: Callable[[Event], None],
    ) -> None:
        self.ray, self.options, self.writers, self.on_event = ray, options, writers, on_event
        self.servers = ServerPool(options.servers)
        runner = ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=ACTOR_TASK_RETRIES)(
            EpisodeRunner
        )
        self.idle = [
            runner.options(scheduling_strategy="SPREAD").remote(options.api_key, dict(metadata))
            for _ in range(_actor_count(ray, options.workers))
        ]
        self.holds: dict[Any, int] = {}  # actor -> the task id its env is for
        self.flights: dict[Any, _Flight] = {}

    def run(self, queue: collections.deque[tuple[TaskJob, int]]) -> None:
        while queue or self.flights:
            while self.idle and queue:
                self._submit(self.idle.pop(), queue)
            ready, _ = self.ray.wait(list(self.flights), num_returns=1)
            for ref in ready:
                self._receive(ref, self.flights.pop(ref), queue)

    def _submit(self, actor: Any, queue: collections.deque[tuple[TaskJob, int]]) -> None:
        held = self.holds.get(actor)
        index = next((i for i, (job, _) in enumerate(queue) if job.task.task_id == held), 0)
        job, k = queue[index]
        del queue[index]
        url = self.servers.take()
        self.holds[actor] = job.task.task_id
        self.flights[actor.run.remote(job, k, url)] = _Flight(actor, job, k, url)

    def _receive(self, ref: Any, flight: _Flight, queue: collections.deque) -> None:
        self.servers.give_back(flight.url)
        self.idle.append(flight.actor)
        try:
            outcome: EpisodeOutcome = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as error:  # its node lost beyond Ray's retries
            self._redo(flight, queue, f"actor lost: {type(error).__name__}")
            return
        except self.ray.exceptions.RayTaskError as error:
            cause = error.cause if error.cause is not None else error
            raise CollectError(type(cause).__name__, str(cause)) from None
        for reason in outcome.redone:
            self.on_event(EpisodeRedone(outcome.task_id, outcome.episode_idx, reason))
        if outcome.server_lost is not None:
            self.servers.remove(outcome.server_lost)
            self._redo(flight, queue, f"server lost: {outcome.server_lost}")
            return
        self._write(flight.job, outcome)

    def _redo(self, flight: _Flight, queue: collections.deque, reason: str) -> None:
        logger.warning("task %d episode %d: %s; redone", flight.job.task.task_id, flight.k, reason)
        self.on_event(EpisodeRedone(flight.job.task.task_id, flight.k, reason))
        queue.appendleft((flight.job, flight.k))

    def _write(self, job: TaskJob, outcome: EpisodeOutcome) -> None:
        writer, k, result = self.writers[job.task.task_id], outcome.episode_idx, outcome.result
        assert result is not None
        if k in writer.completed:  # a duplicate (a call Ray retried after it had returned)
            return
        attrs = episode_attrs(job.options, job.task, k)
        with writer.episode(k, init_state_idx=k, seed=job.options.seed, attrs=attrs) as episode:
            for sample in outcome.samples:
                episode.add(sample)
            episode.finish(result)
        env_steps = result.total_steps + job.options.num_steps_wait
        self.on_event(
            EpisodeDone(
                job.task.task_id, k, result.success, env_steps, result.duration_s, result.error
            )
        )

"""One LIBERO episode against a policy, as openpi's examples/libero/main.py runs it, plus latents.

Steps. `t` counts the policy's env steps: the settle period (`num_steps_wait` dummy actions, objects
falling into place) is not counted, so t = 0 is the first policy action. The policy is queried when
the action plan is empty — at t = 0, replan_steps, 2 * replan_steps, ... — and its chunk's first
`replan_steps` actions are executed. The episode ends on success (`done` from the env) or after
`max_steps` policy steps.

Sampling. A query at step t collects latents when the actions it commits to cover a step that is a
multiple of `stride`: some t' in [t, t + replan_steps) with t' % stride == 0. With `stride` a
multiple of `replan_steps` (the usual case) that is exactly t % stride == 0; `stride` <= replan_steps
samples every query. A sample holds t (as `timesteps`), the whole returned chunk, the state sent,
the latents by name with their layouts (axes, and labels: which layers, steps, segments) and,
optionally, the two images sent. Samples go to `on_sample` as they arrive; nothing is kept here.
The policy's exceptions propagate; the environment's raise `SimulationError` with the episode so
far: the caller decides whether an episode is retried or recorded as failed.

Condition (`QueryCondition`, optional). Every query can carry `interventions` and be driven by
another prompt than the task's instruction ("" is the null prompt); `counterfactual_prompts` go as
the request's `prompt_variants`, and the actions each would have produced at the same observation
and noise are kept per query (`replay/counterfactual_actions`).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from latentpi.client.libero_env import DUMMY_ACTION, POLICY_RESOLUTION, LiberoObservation, TaskInfo
from latentpi.client.libero_env import load_init_states as _load_init_states
from latentpi.protocol.errors import ValidationError
from latentpi.protocol.latent_layout import ArrayLayout
from latentpi.protocol.latent_spec import DEFAULT_PRESET, LatentSpec, preset
from latentpi.protocol.messages import PolicyResponse

ACTION_DIM = 7
# Response keys that are not latents (openpi's, ours); every other array is a latent, by name.
NON_LATENT_KEYS = frozenset(
    {"actions", "state", "policy_timing", "server_timing", "latent_layout", "latents"}
)


class Policy(Protocol):
    """openpi-client's interface: WebsocketClientPolicy has it, so does any local policy."""

    def infer(self, obs: dict) -> dict: ...


@dataclass(frozen=True)
class Sample:
    timestep: int
    actions: np.ndarray  # (horizon, 7) the whole returned chunk
    state: np.ndarray  # (8,) the state sent
    latents: Mapping[str, np.ndarray]  # name -> array, server's batch axis already stripped
    layouts: Mapping[str, ArrayLayout]  # name -> axes, shape, dtype, labels (from latent_layout)
    images: Mapping[str, np.ndarray] = field(default_factory=dict)  # "image", "wrist_image"


@dataclass(frozen=True)
class QueryCondition:
    """What every query of an episode carries besides the observation (rendered prompts)."""

    prompt: str  # the prompt that drives the episode ("" allowed: the null prompt)
    counterfactual_prompts: tuple[str, ...] = ()  # sent as prompt_variants; their actions kept
    interventions: tuple[Mapping[str, Any], ...] = ()  # the request's wire maps, with arrays

    def fields(self) -> dict[str, Any]:
        """The request's prompt, prompt_variants and interventions."""
        out: dict[str, Any] = {"prompt": self.prompt}
        if self.counterfactual_prompts:
            out["prompt_variants"] = list(self.counterfactual_prompts)
        if self.interventions:
            out["interventions"] = [dict(entry) for entry in self.interventions]
        return out


@dataclass(frozen=True)
class EpisodeResult:
    success: bool
    total_steps: int  # policy steps executed (settle period excluded)
    num_queries: int
    num_samples: int
    duration_s: float
    init_state_idx: int
    error: str | None = None  # set when the simulation raised: the episode counts as failed
    env_seed: int | None = None  # the `env.seed` given right before this episode's reset
    # what a replay needs (see `Trace`): executed actions per step, per-query seeds and MuJoCo states
    replay: Mapping[str, np.ndarray] = field(default_factory=dict, compare=False)
    # the prompt that drove the episode, the counterfactual ones (their actions:
    # replay["counterfactual_actions"]); records of the run, like replay, not of its outcome
    prompt: str | None = field(default=None, compare=False)
    counterfactual_prompts: tuple[str, ...] = field(default=(), compare=False)
    # the server's record of the interventions applied (from the first response), arrays as shapes
    interventions: tuple[Mapping[str, Any], ...] = field(default=(), compare=False)


class SimulationError(RuntimeError):
    """The environment raised during an episode; `result` is the episode so far (`error` set)."""

    def __init__(self, result: EpisodeResult) -> None:
        super().__init__(result.error)
        self.result = result


class _EnvFailed(Exception):
    """Internal: an exception raised by the environment (not by the policy)."""


def _sim(call: Callable[..., Any], *args: Any) -> Any:
    try:
        return call(*args)
    except Exception as error:
        raise _EnvFailed(f"{type(error).__name__}: {error}") from error


@dataclass
class Trace:
    """An episode's replay data, filled while it runs."""

    executed_actions: list[np.ndarray] = field(default_factory=list)  # one (7,) per policy step
    query_timesteps: list[int] = field(default_factory=list)
    query_noise_seeds: list[int] = field(default_factory=list)  # -1: none sent
    query_sampled: list[bool] = field(default_factory=list)
    query_sim_states: list[np.ndarray] = field(default_factory=list)  # MuJoCo state before a query
    # per query (variants, horizon, action_dim): the counterfactual prompts' actions
    counterfactual_actions: list[np.ndarray] = field(default_factory=list)
    interventions: tuple[Mapping[str, Any], ...] = ()  # the server's records (first response)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {
            "executed_actions": np.asarray(self.executed_actions, np.float64).reshape(
                -1, ACTION_DIM
            ),
            "query_timesteps": np.asarray(self.query_timesteps, np.int32),
            "query_noise_seeds": np.asarray(self.query_noise_seeds, np.int64),
            "query_sampled": np.asarray(self.query_sampled, np.bool_),
        }
        if self.query_sim_states:
            out["query_sim_states"] = np.stack(self.query_sim_states).astype(np.float64)
        if self.counterfactual_actions:
            out["counterfactual_actions"] = np.stack(self.counterfactual_actions)
        return out


def is_sampled(step: int, stride: int, replan_steps: int) -> bool:
    """Whether the query at policy step `step` collects latents (see the module doc)."""
    return (-step) % stride < replan_steps


def run_episode(
    env: Any,
    task: TaskInfo,
    init_state_idx: int,
    policy: Policy,
    *,
    max_steps: int | None = None,
    stride: int = 5,
    replan_steps: int = 5,
    num_steps_wait: int = 10,
    latent_spec: LatentSpec | str = DEFAULT_PRESET,
    record_images: bool = False,
    on_sample: Callable[[Sample], None] | None = None,
    init_states: np.ndarray | None = None,
    resolution: int = POLICY_RESOLUTION,
    env_seed: int | None = None,
    noise_seed: Callable[[int], int] | None = None,
    on_frame: Callable[[np.ndarray], None] | None = None,
    condition: QueryCondition | None = None,
) -> EpisodeResult:
    """Run one episode from init state `init_state_idx` (see the module doc for steps and sampling).

    `env_seed`: `env.seed(env_seed)` right before the reset, so the scene does not depend on what
    the env did before. `noise_seed(query_idx)`: the `noise_seed` sent with each query. An exception
    from the environment raises `SimulationError` carrying the episode so far; the policy's own
    exceptions propagate as they are. `on_frame(image)`: the agent view (upright, env resolution)
    after the settle period and after every policy step (for a video). `condition`: interventions,
    driving and counterfactual prompts sent with every query (None: the instruction alone)."""
    _check_positive("stride", stride)
    _check_positive("replan_steps", replan_steps)
    max_steps = task.max_steps if max_steps is None else max_steps
    init_states = _load_init_states(task) if init_states is None else init_states
    if not 0 <= init_state_idx < len(init_states):
        raise ValidationError(
            "init_state_idx", f"an integer in [0, {len(init_states) - 1}]", init_state_idx
        )
    spec = preset(latent_spec) if isinstance(latent_spec, str) else latent_spec
    episode = _Episode(env, task, policy, spec, stride, replan_steps, record_images, on_sample)
    episode.noise_seed, episode.resolution, episode.on_frame = noise_seed, resolution, on_frame
    episode.condition = condition or QueryCondition(task.instruction)
    try:
        episode.start(init_states[init_state_idx], env_seed, num_steps_wait)
        episode.run(max_steps)
    except _EnvFailed as error:
        raise SimulationError(episode.result(init_state_idx, env_seed, str(error))) from error
    return episode.result(init_state_idx, env_seed)


class _Episode:
    """The running state of one episode (counters, action plan, replay trace)."""

    def __init__(
        self,
        env: Any,
        task: TaskInfo,
        policy: Policy,
        spec: LatentSpec,
        stride: int,
        replan_steps: int,
        record_images: bool,
        on_sample: Callable[[Sample], None] | None,
    ) -> None:
        self.env, self.task, self.policy, self.spec = env, task, policy, spec
        self.stride, self.replan_steps = stride, replan_steps
        self.record_images, self.on_sample = record_images, on_sample
        self.noise_seed: Callable[[int], int] | None = None
        self.on_frame: Callable[[np.ndarray], None] | None = None
        self.condition = QueryCondition(task.instruction)
        self.resolution = POLICY_RESOLUTION
        self.trace = Trace()
        self.plan: collections.deque[np.ndarray] = collections.deque()
        self.success, self.step, self.queries, self.samples = False, 0, 0, 0
        self.begin = time.monotonic()
        self.obs: Any = None

    def start(self, init_state: np.ndarray, env_seed: int | None, num_steps_wait: int) -> None:
        if env_seed is not None:
            _sim(self.env.seed, env_seed)
        _sim(self.env.reset)
        self.obs = _sim(self.env.set_init_state, init_state)
        for _ in range(num_steps_wait):
            self.obs, _, _, _ = _sim(self.env.step, list(DUMMY_ACTION))
        self.frame()

    def frame(self) -> None:
        if self.on_frame is not None:
            self.on_frame(np.ascontiguousarray(self.obs["agentview_image"][::-1, ::-1]))

    def run(self, max_steps: int) -> None:
        while self.step < max_steps:
            if not self.plan:
                self.query()
            action = self.plan.popleft()
            self.trace.executed_actions.append(np.asarray(action, np.float64))
            self.obs, _, done, _ = _sim(self.env.step, action.tolist())
            self.step += 1
            self.frame()
            if bool(done):
                self.success = True
                break

    def query(self) -> None:
        observation = LiberoObservation.from_env(self.obs, self.resolution)
        sampled = is_sampled(self.step, self.stride, self.replan_steps)
        request = observation.to_request(self.condition.prompt)
        request |= self.condition.fields()
        if sampled:
            request |= {"collect_latents": True, "latent_spec": self.spec.to_wire()}
        seed = self.noise_seed(self.queries) if self.noise_seed is not None else None
        if seed is not None:
            request["noise_seed"] = int(seed)
        self._trace_query(sampled, seed)
        response = self._conditioned(parse_response(self.policy.infer(request), self.replan_steps))
        self.queries += 1
        if sampled:
            self.samples += 1
            if self.on_sample is not None:
                self.on_sample(_sample(self.step, response, observation, self.record_images))
        self.plan.extend(response.actions[: self.replan_steps])

    def _conditioned(self, response: PolicyResponse) -> PolicyResponse:
        """The response; the counterfactual prompts' actions and the intervention records go
        to the trace."""
        counterfactual, records = conditioned(self.condition, response)
        if self.condition.counterfactual_prompts:
            self.trace.counterfactual_actions.append(counterfactual)
        if not self.trace.interventions:
            self.trace.interventions = records
        return response

    def _trace_query(self, sampled: bool, seed: int | None) -> None:
        self.trace.query_timesteps.append(self.step)
        self.trace.query_noise_seeds.append(-1 if seed is None else int(seed))
        self.trace.query_sampled.append(sampled)
        get_state = getattr(self.env, "get_sim_state", None)
        if get_state is not None:
            self.trace.query_sim_states.append(np.asarray(_sim(get_state), np.float64))

    def result(
        self, init_state_idx: int, env_seed: int | None, error: str | None = None
    ) -> EpisodeResult:
        return EpisodeResult(
            success=self.success,
            total_steps=self.step,
            num_queries=self.queries,
            num_samples=self.samples,
            duration_s=time.monotonic() - self.begin,
            init_state_idx=init_state_idx,
            error=error,
            env_seed=env_seed,
            replay=self.trace.arrays(),
            prompt=self.condition.prompt,
            counterfactual_prompts=self.condition.counterfactual_prompts,
            interventions=self.trace.interventions,
        )


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValidationError(name, "a positive integer", value)


def parse_response(response: Any, replan_steps: int) -> PolicyResponse:
    """Check a response (openpi's or ours): actions (horizon >= replan_steps, 7), latents with layouts."""
    parsed = PolicyResponse.from_wire(response)
    if parsed.actions.shape[1] != ACTION_DIM or parsed.actions.shape[0] < replan_steps:
        raise ValidationError(
            "actions",
            f"an array of shape (horizon >= replan_steps={replan_steps}, {ACTION_DIM})",
            parsed.actions,
        )
    return parsed


def conditioned(
    condition: QueryCondition, response: PolicyResponse
) -> tuple[np.ndarray, tuple[Mapping[str, Any], ...]]:
    """(the counterfactual prompts' actions (V, horizon, dim) float64, the server's intervention
    records), checked against what the query sent."""
    if condition.interventions and not response.interventions:
        raise ValidationError(
            "interventions",
            "the server's record of the interventions it applied (a latentpi server)",
            "none: the server ignored them",
        )
    counterfactual = variant_actions(response, condition.counterfactual_prompts)
    return counterfactual, tuple(response.interventions)


def variant_actions(response: PolicyResponse, sent: tuple[str, ...]) -> np.ndarray:
    """The prompt variants' actions (V, horizon, dim) float64, checked against what was sent:
    one entry per prompt, in order, each shaped as the request's own actions."""
    variants = response.prompt_variants
    if [v.get("prompt") for v in variants] != list(sent):
        raise ValidationError(
            "prompt_variants",
            f"one entry per prompt sent, in order ({len(sent)}: {list(sent)!r})",
            [v.get("prompt") for v in variants],
        )
    shape = response.actions.shape
    for index, variant in enumerate(variants):
        actions = variant.get("actions")
        if not isinstance(actions, np.ndarray) or actions.shape != shape:
            raise ValidationError(
                f"prompt_variants[{index}].actions",
                f"an array of shape {shape} (as the request's actions)",
                actions,
            )
    counterfactual = [v["actions"] for v in variants]
    return np.asarray(counterfactual, np.float64).reshape(len(counterfactual), *shape)


def _sample(
    step: int, response: PolicyResponse, observation: LiberoObservation, record_images: bool
) -> Sample:
    images = (
        {"image": observation.image, "wrist_image": observation.wrist_image}
        if record_images
        else {}
    )
    return Sample(
        timestep=step,
        actions=response.actions,
        state=observation.state,
        latents=dict(response.latents),
        layouts=dict(response.latent_layout),
        images=images,
    )

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
Exceptions (policy, env) propagate: the caller decides whether an episode is retried.
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
class EpisodeResult:
    success: bool
    total_steps: int  # policy steps executed (settle period excluded)
    num_queries: int
    num_samples: int
    duration_s: float
    init_state_idx: int


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
) -> EpisodeResult:
    """Run one episode from init state `init_state_idx` (see the module doc for steps and sampling)."""
    _check_positive("stride", stride)
    _check_positive("replan_steps", replan_steps)
    max_steps = task.max_steps if max_steps is None else max_steps
    init_states = _load_init_states(task) if init_states is None else init_states
    if not 0 <= init_state_idx < len(init_states):
        raise ValidationError(
            "init_state_idx", f"an integer in [0, {len(init_states) - 1}]", init_state_idx
        )
    spec = preset(latent_spec) if isinstance(latent_spec, str) else latent_spec

    start = time.monotonic()
    env.reset()
    obs = env.set_init_state(init_states[init_state_idx])
    for _ in range(num_steps_wait):
        obs, _, _, _ = env.step(list(DUMMY_ACTION))

    plan: collections.deque[np.ndarray] = collections.deque()
    success, step, queries, samples = False, 0, 0, 0
    while step < max_steps:
        if not plan:
            observation = LiberoObservation.from_env(obs, resolution)
            sampled = is_sampled(step, stride, replan_steps)
            request = observation.to_request(task.instruction)
            if sampled:
                request |= {"collect_latents": True, "latent_spec": spec.to_wire()}
            response = _parse(policy.infer(request), replan_steps)
            queries += 1
            if sampled:
                samples += 1
                if on_sample is not None:
                    on_sample(_sample(step, response, observation, record_images))
            plan.extend(response.actions[:replan_steps])
        obs, _, done, _ = env.step(plan.popleft().tolist())
        step += 1
        if bool(done):
            success = True
            break
    return EpisodeResult(
        success=success,
        total_steps=step,
        num_queries=queries,
        num_samples=samples,
        duration_s=time.monotonic() - start,
        init_state_idx=init_state_idx,
    )


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValidationError(name, "a positive integer", value)


def _parse(response: Any, replan_steps: int) -> PolicyResponse:
    """Check a response (openpi's or ours): actions (horizon >= replan_steps, 7), latents with layouts."""
    parsed = PolicyResponse.from_wire(response)
    if parsed.actions.shape[1] != ACTION_DIM or parsed.actions.shape[0] < replan_steps:
        raise ValidationError(
            "actions",
            f"an array of shape (horizon >= replan_steps={replan_steps}, {ACTION_DIM})",
            parsed.actions,
        )
    return parsed


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

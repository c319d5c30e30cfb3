"""One episode on real LIBERO with a small real policy object (and once over a loopback websocket
through openpi-client's WebsocketClientPolicy), into real HDF5 storage."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from websockets.sync.server import ServerConnection, serve

from latentpi.client.libero_env import TaskInfo, load_init_states
from latentpi.client.rollout import EpisodeResult, Sample, is_sampled, run_episode
from latentpi.client.storage import TaskFile, TaskHeader, TaskWriter, task_path
from latentpi.protocol import LatentSpec, TokenLayout, ValidationError, packb, unpackb
from latentpi.protocol.latent_layout import ModelShape, latent_layouts
from latentpi.protocol.messages import PolicyResponse

# A tiny model's shape: the arrays have the structure the server sends, at a size tests can afford.
TINY = ModelShape(
    token_layout=TokenLayout(
        expert_0=(
            ("base_0_rgb", 0, 4),
            ("left_wrist_0_rgb", 4, 8),
            ("right_wrist_0_rgb", 8, 12),
            ("prompt", 12, 20),
        ),
        expert_1=(("state", 0, 1), ("actions", 1, 11)),
    ),
    depth=2,
    width=(16, 8),
    num_heads=2,
    num_steps=3,
)
SPEC = LatentSpec(layers=(0, -1), steps=(-1,), dtype="bfloat16")
LIFT = 0.5  # a delta-z action: the end effector rises


class ScriptedPolicy:
    """A real policy object: lifts the gripper; latents of the requested spec, seeded by call count."""

    def __init__(self, horizon: int = 10, rows: int | None = None, columns: int = 7) -> None:
        self.shape = (rows or horizon, columns)
        self.requests: list[dict[str, Any]] = []

    def infer(self, obs: dict) -> dict:
        self.requests.append(dict(obs))
        actions = np.zeros(self.shape)
        actions[:, 2] = LIFT
        actions[:, -1] = -1.0
        if not obs.get("collect_latents"):
            return PolicyResponse(actions=actions).to_wire()
        spec = LatentSpec.from_wire(obs["latent_spec"])
        layouts = latent_layouts(spec, TINY)
        latents = synthetic_latents(len(self.requests) - 1, layouts)
        return PolicyResponse(
            actions=actions, latents=latents, latent_layout=layouts, latent_spec=spec
        ).to_wire()


def synthetic_latents(call: int, layouts: dict) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(call)
    out = {}
    for name, layout in sorted(layouts.items()):
        if layout.dtype == "bool":
            out[name] = np.arange(layout.shape[0]) < 5
        else:
            out[name] = (
                rng.normal(size=layout.shape)
                .astype(np.dtype("float32"))
                .astype(_dtype(layout.dtype))
            )
    return out


def _dtype(name: str) -> Any:
    import ml_dtypes

    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


class SucceedsAt:
    """The real env, with `done` reported from its `at`-th step on (success is rare in 10 steps)."""

    def __init__(self, env: Any, at: int) -> None:
        self.env, self.at, self.steps = env, at, 0

    def reset(self) -> Any:
        self.steps = 0
        return self.env.reset()

    def set_init_state(self, state: np.ndarray) -> Any:
        return self.env.set_init_state(state)

    def step(self, action: list[float]) -> tuple:
        obs, reward, done, info = self.env.step(action)
        self.steps += 1
        return obs, reward, bool(done) or self.steps >= self.at, info


@pytest.mark.parametrize(("stride", "replan"), [(5, 5), (10, 5), (20, 5), (1, 5), (7, 5), (3, 4)])
def test_is_sampled_matches_its_definition(stride: int, replan: int) -> None:
    queries = range(0, 200, replan)
    expected = [t for t in queries if any(u % stride == 0 for u in range(t, t + replan))]
    assert [t for t in queries if is_sampled(t, stride, replan)] == expected
    if stride % replan == 0:
        assert expected == [t for t in queries if t % stride == 0]


@pytest.fixture(scope="module")
def init_states(libero_task) -> np.ndarray:
    return load_init_states(libero_task)


@pytest.mark.slow
def test_episode_queries_samples_and_requests(libero_env, libero_task, init_states) -> None:
    policy, samples = ScriptedPolicy(), []
    result = run_episode(
        libero_env,
        libero_task,
        3,
        policy,
        max_steps=12,
        stride=10,
        num_steps_wait=2,
        latent_spec=SPEC,
        record_images=True,
        on_sample=samples.append,
        init_states=init_states,
        env_seed=11,
        noise_seed=lambda query: 1000 + query,
    )
    assert result == EpisodeResult(False, 12, 3, 2, result.duration_s, 3, env_seed=11)
    assert len(policy.requests) == 3  # at t = 0, 5, 10
    # the noise seeds are sent and kept with the replay data
    assert [request["noise_seed"] for request in policy.requests] == [1000, 1001, 1002]
    np.testing.assert_array_equal(result.replay["query_noise_seeds"], [1000, 1001, 1002])
    np.testing.assert_array_equal(result.replay["query_timesteps"], [0, 5, 10])
    np.testing.assert_array_equal(result.replay["query_sampled"], [True, False, True])
    assert result.replay["executed_actions"].shape == (12, 7)
    assert np.all(result.replay["executed_actions"][:, 2] == LIFT)
    assert result.replay["query_sim_states"].shape[0] == 3
    for request in policy.requests:
        assert {
            "observation/image",
            "observation/wrist_image",
            "observation/state",
            "prompt",
        } <= set(request)
        assert (
            request["observation/image"].shape == (224, 224, 3)
            and request["observation/image"].dtype == np.uint8
        )
        assert request["prompt"] == libero_task.instruction
    assert [r.get("collect_latents", False) for r in policy.requests] == [True, False, True]
    assert policy.requests[0]["latent_spec"] == SPEC.to_wire()
    # the actions were executed: the end effector rose between the first and the last query
    assert (
        policy.requests[2]["observation/state"][2]
        > policy.requests[0]["observation/state"][2] + 0.01
    )

    assert [s.timestep for s in samples] == [0, 10]
    for sample, request, call in zip(
        samples, (policy.requests[0], policy.requests[2]), (0, 2), strict=True
    ):
        expected = synthetic_latents(call, latent_layouts(SPEC, TINY))
        assert set(sample.latents) == set(expected) == set(sample.layouts)
        for name, array in expected.items():
            np.testing.assert_array_equal(sample.latents[name], array)
            assert sample.layouts[name].shape == array.shape
        assert sample.layouts["expert_1_hidden_states"].axes == (
            "step",
            "layer",
            "position",
            "hidden",
        )
        np.testing.assert_array_equal(sample.images["image"], request["observation/image"])
        np.testing.assert_array_equal(
            sample.images["wrist_image"], request["observation/wrist_image"]
        )
        np.testing.assert_array_equal(sample.state, request["observation/state"])
        assert sample.actions.shape == (10, 7)


@pytest.mark.slow
def test_success_ends_the_episode(libero_env, libero_task, init_states) -> None:
    policy = ScriptedPolicy()
    env = SucceedsAt(libero_env, at=2 + 7)  # 2 settle steps, then the 7th policy step
    result = run_episode(
        env,
        libero_task,
        0,
        policy,
        max_steps=50,
        stride=5,
        num_steps_wait=2,
        init_states=init_states,
    )
    assert (result.success, result.total_steps, result.num_queries, result.num_samples) == (
        True,
        7,
        2,
        2,
    )


@pytest.mark.slow
@pytest.mark.parametrize(("rows", "columns"), [(3, 7), (10, 6)])
def test_bad_action_chunks_are_refused(
    libero_env, libero_task, init_states, rows: int, columns: int
) -> None:
    with pytest.raises(ValidationError, match="actions: expected an array of shape"):
        run_episode(
            libero_env,
            libero_task,
            0,
            ScriptedPolicy(rows=rows, columns=columns),
            max_steps=5,
            num_steps_wait=0,
            init_states=init_states,
        )


def test_arguments_are_checked() -> None:
    task = TaskInfo("libero_goal", 0, "open_the_drawer", "open the drawer", "x.bddl", "x.init")
    states = np.zeros((2, 3))
    for name, kwargs in (("stride", {"stride": 0}), ("replan_steps", {"replan_steps": -1})):
        with pytest.raises(ValidationError, match=name):
            run_episode(None, task, 0, ScriptedPolicy(), init_states=states, **kwargs)
    with pytest.raises(ValidationError, match="init_state_idx"):
        run_episode(None, task, 2, ScriptedPolicy(), init_states=states)


@pytest.mark.slow
def test_episode_streams_into_a_task_file(
    libero_env, libero_task, init_states, tmp_path: Path
) -> None:
    header = TaskHeader(
        suite=libero_task.suite,
        task_id=libero_task.task_id,
        task_name=libero_task.name,
        instruction=libero_task.instruction,
        bddl_file=libero_task.bddl_file,
        model_config="tiny",
        checkpoint="none",
        latent_spec=SPEC,
    )
    path = task_path(tmp_path, libero_task.suite, libero_task.task_id, libero_task.name)
    with TaskWriter(path, header) as writer, writer.episode(0, init_state_idx=4, seed=7) as out:
        result = run_episode(
            libero_env, libero_task, 4, ScriptedPolicy(), max_steps=10, stride=5, num_steps_wait=2,
            latent_spec=SPEC, on_sample=out.add, init_states=init_states,
        )  # fmt: skip
        out.finish(result)
    with TaskFile(path) as task:
        (episode,) = task.episodes
        assert (episode.total_steps, episode.num_samples, episode.init_state_idx) == (10, 2, 4)
        np.testing.assert_array_equal(episode["timesteps"][:], [0, 5])
        hidden = episode["expert_1_hidden_states"]
        assert hidden.axes == ("sample", "step", "layer", "position", "hidden") and hidden.layout[
            "layers"
        ] == [0, 2]
        expected = synthetic_latents(1, latent_layouts(SPEC, TINY))["expert_1_hidden_states"]
        np.testing.assert_array_equal(hidden[1].view(np.uint16), expected.view(np.uint16))


@pytest.fixture
def loopback_server() -> Iterator[tuple[int, ScriptedPolicy]]:
    """A websocket policy server on 127.0.0.1 speaking openpi's protocol with latentpi's codec."""
    policy = ScriptedPolicy()

    def handle(connection: ServerConnection) -> None:
        connection.send(packb({"model": "tiny"}))
        for message in connection:
            connection.send(packb(policy.infer(unpackb(message))))

    with serve(handle, "127.0.0.1", 0, compression=None, max_size=None) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield server.socket.getsockname()[1], policy
        server.shutdown()
    thread.join(timeout=5)


@pytest.mark.slow
def test_openpi_websocket_client_policy_drives_an_episode(
    libero_env, libero_task, init_states, loopback_server
) -> None:
    port, served = loopback_server
    client = WebsocketClientPolicy("127.0.0.1", port)
    assert client.get_server_metadata() == {"model": "tiny"}
    samples: list[Sample] = []
    # float32: openpi-client's own codec has no bfloat16
    spec = LatentSpec(layers=(-1,), steps=(-1,), dtype="float32")
    result = run_episode(
        libero_env, libero_task, 1, client, max_steps=6, stride=5, num_steps_wait=1,
        latent_spec=spec, on_sample=samples.append, init_states=init_states,
    )  # fmt: skip
    assert (result.total_steps, result.num_queries, result.num_samples) == (6, 2, 2)
    assert len(served.requests) == 2 and served.requests[0]["prompt"] == libero_task.instruction
    np.testing.assert_array_equal(samples[1].state, served.requests[1]["observation/state"])
    client._ws.close()  # openpi-client's policy has no close()
    expected = synthetic_latents(1, latent_layouts(spec, TINY))
    np.testing.assert_array_equal(
        samples[1].latents["text_only_hidden_states"], expected["text_only_hidden_states"]
    )

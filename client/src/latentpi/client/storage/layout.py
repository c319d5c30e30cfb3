"""Names on disk: where a task's files live, what its root attributes are, which of them must match.

    DIR/<suite>/task_<id>_<name>.h5        the task file (an index of external links while
                                           collecting, self-contained after consolidation)
    DIR/<suite>/task_<id>_<name>.h5.d/     episode_XXXX.h5 (one finished episode each),
                                           base_XXXX.h5 (a consolidated file reopened for more)
See docs/data-format.md.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from latentpi.client.storage.condition import BASELINE, Condition
from latentpi.protocol.errors import ValidationError
from latentpi.protocol.latent_spec import LatentSpec

FORMAT_VERSION = 2  # 2: bfloat16 as an HDF5 float type, replay data, episode arguments, run history
EPISODE_GROUP = re.compile(r"^episode_(\d{4,})$")
# Root attributes that must equal the stored ones when a collection resumes.
IDENTITY_ATTRS = (
    "format_version",
    "suite",
    "task_id",
    "task_name",
    "instruction",
    "model_config",
    "checkpoint",
    "latent_spec",
    "episode_arguments",
    "condition",
)
# What a missing identity attribute means (files written before it existed).
IDENTITY_DEFAULTS: dict[str, Any] = {"condition": BASELINE.record()}
JSON_ATTRS = (
    "latent_spec",
    "server_metadata",
    "versions",
    "arguments",
    "episode_arguments",
    "env_args",
    "runs",
    "warnings",
    "condition",
    "counterfactual_prompts",  # episode attributes
    "interventions",
)
RANDOM_WEIGHTS = "random weights"  # how a server's metadata names a checkpoint that is not one
VERSIONED_PACKAGES = (
    "latentpi-client",
    "latentpi-protocol",
    "h5py",
    "numpy",
    "ml-dtypes",
    "libero",
    "robosuite",
    "mujoco",
    "openpi-client",
)


def task_path(root: str | Path, suite: str, task_id: int, task_name: str) -> Path:
    return Path(root) / suite / f"task_{task_id}_{task_name}.h5"


def episode_dir(path: Path) -> Path:
    return path.with_name(path.name + ".d")


def group_name(episode_idx: int) -> str:
    return f"episode_{episode_idx:04d}"


def episode_index(name: str) -> int | None:
    match = EPISODE_GROUP.match(name)
    return int(match.group(1)) if match else None


def package_versions() -> dict[str, str]:
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def to_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


@dataclass(frozen=True)
class TaskHeader:
    """What a task file says about itself (its root attributes)."""

    suite: str
    task_id: int
    task_name: str
    instruction: str
    bddl_file: str
    model_config: str  # e.g. "pi0_libero"
    checkpoint: str  # where the weights came from
    latent_spec: LatentSpec
    server_metadata: Mapping[str, Any] = field(default_factory=dict)  # incl. token layout
    arguments: Mapping[str, Any] = field(default_factory=dict)  # the command's arguments
    versions: Mapping[str, str] = field(default_factory=package_versions)
    # every argument that changes what an episode is (seed, stride, horizon, ...): part of identity
    episode_arguments: Mapping[str, Any] = field(default_factory=dict)
    bddl: str = ""  # the bddl file's content, so a rollout can be rebuilt without LIBERO's copy
    env_args: Mapping[str, Any] = field(default_factory=dict)  # cameras, controller, control rate
    warnings: tuple[str, ...] = ()  # e.g. random weights: said in the log and kept in the file
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # interventions and prompts (storage/condition.py); its arrays go to /condition/interventions
    condition: Condition = BASELINE

    @property
    def random_weights(self) -> bool:
        return self.checkpoint.startswith(RANDOM_WEIGHTS)

    def run(self) -> dict[str, Any]:
        """This run's entry in the file's history (root attribute `runs`)."""
        return {
            "run_id": self.run_id,
            "started": _now(),
            "arguments": dict(self.arguments),
            "server_metadata": dict(self.server_metadata),
            "versions": dict(self.versions),
            "warnings": list(self.warnings),
        }

    def attrs(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "suite": self.suite,
            "task_id": int(self.task_id),
            "task_name": self.task_name,
            "instruction": self.instruction,
            "bddl_file": self.bddl_file,
            "model_config": self.model_config,
            "checkpoint": self.checkpoint,
            "latent_spec": to_json(self.latent_spec.to_wire()),
            "server_metadata": to_json(dict(self.server_metadata)),
            "arguments": to_json(dict(self.arguments)),
            "versions": to_json(dict(self.versions)),
            "episode_arguments": to_json(dict(self.episode_arguments)),
            "bddl": self.bddl,
            "env_args": to_json(dict(self.env_args)),
            "random_weights": self.random_weights,
            "warnings": to_json(list(self.warnings)),
            "runs": to_json([self.run()]),
            "condition": to_json(self.condition.record()),
            "created": _now(),
        }


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def merge_runs(stored: Any, new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stored history plus this run's entry (once, however often the run reopens the file)."""
    runs = list(stored) if isinstance(stored, list) else []
    known = {run.get("run_id") for run in runs if isinstance(run, dict)}
    return runs + [run for run in new if run["run_id"] not in known]


def decode_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """h5py attributes -> plain Python values, JSON attributes parsed."""
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, np.generic):
            value = value.item()
        elif isinstance(value, np.ndarray):
            value = value.tolist()
        if key in JSON_ATTRS and isinstance(value, str):
            value = json.loads(value)
        out[key] = value
    return out


def check_identity(path: Path, stored: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    """Refuse to extend a task file written for another task, model or latent spec."""
    for key in IDENTITY_ATTRS:
        default = IDENTITY_DEFAULTS.get(key)
        old_value = _comparable(stored.get(key, default))
        new_value = _comparable(new.get(key, default))
        if key == "condition" and old_value != new_value:
            raise _condition_error(path, old_value, new_value)
        if old_value != new_value:
            raise ValidationError(
                f"{path}: root attribute {key}",
                f"{old_value!r} as stored (resume with the same task, model, latent spec and episode arguments (seed, stride, horizon, replan and settle steps, images), or use a new output folder)",
                new_value,
            )


def _condition_error(path: Path, stored: Any, new: Any) -> ValidationError:
    """Both conditions summarized in full (a received value is otherwise cut at 80 characters)."""
    field = f"{path}: root attribute condition"
    expected = (
        f"{_condition_summary(stored)} as stored (resume under the same condition: the same "
        "--intervene content, --prompt-variant, --counterfactual-prompt and --condition; or use "
        "another output folder for another condition)"
    )
    error = ValidationError(field, expected, None)
    error.received = _condition_summary(new)
    error.args = (f"{field}: expected {expected}, received {error.received}",)
    return error


def _condition_summary(record: Any) -> str:
    if not isinstance(record, Mapping):
        return repr(record)
    digest = record.get("interventions_sha256")
    return (
        f"condition {record.get('name')!r} ({len(record.get('interventions') or [])} "
        f"intervention(s), sha256 {digest[:16] + '…' if digest else None}, prompt "
        f"{record.get('prompt')!r}, counterfactual prompts {record.get('counterfactual_prompts')!r})"
    )


def _comparable(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        value = value.item()
    return value

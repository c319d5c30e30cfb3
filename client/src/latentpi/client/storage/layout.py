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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from latentpi.protocol.errors import ValidationError
from latentpi.protocol.latent_spec import LatentSpec

FORMAT_VERSION = 1
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
)
JSON_ATTRS = ("latent_spec", "server_metadata", "versions", "arguments")
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
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }


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
        old_value, new_value = _comparable(stored.get(key)), _comparable(new.get(key))
        if old_value != new_value:
            raise ValidationError(
                f"{path}: root attribute {key}",
                f"{old_value!r} as stored (resume with the same task, model and latent spec, or use a new output folder)",
                new_value,
            )


def _comparable(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        value = value.item()
    return value

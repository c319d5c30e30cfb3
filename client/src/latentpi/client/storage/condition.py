"""What a collection changed about the policy: its *condition* (interventions, prompts), as a file
keeps it.

A task file says exactly what was done: the root attribute `condition` (JSON: name, the
interventions without their arrays, their digest, the driving prompt template, the counterfactual
prompt templates) and the arrays themselves under `/condition/interventions/<i>/<field>`. A file
without the attribute was collected unchanged: it reads as `BASELINE`. docs/data-format.md.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from latentpi.protocol.errors import ValidationError
from latentpi.protocol.interventions import Intervention

TASK_PLACEHOLDER = "{task}"  # replaced by the task's instruction in a prompt template
BASELINE_NAME = "baseline"
ARRAY_FIELDS = ("vector", "value", "mean", "factors")
GROUP = "condition/interventions"


@dataclass(frozen=True, eq=False)
class Condition:
    """Interventions sent with every query, the prompt that drives the episode (a template:
    `{task}` is the instruction) and the counterfactual prompts whose actions are recorded."""

    name: str = BASELINE_NAME
    interventions: tuple[Intervention, ...] = ()
    prompt: str = TASK_PLACEHOLDER
    counterfactual_prompts: tuple[str, ...] = ()

    @property
    def is_baseline(self) -> bool:
        """Nothing changes what the policy does (counterfactual prompts only observe)."""
        return not self.interventions and self.prompt == TASK_PLACEHOLDER

    @property
    def interventions_sha256(self) -> str | None:
        """A digest of the interventions' content (records and float32 array bytes, in order)."""
        if not self.interventions:
            return None
        digest = hashlib.sha256(json.dumps(self._records(), sort_keys=True).encode())
        for arrays in self.arrays():
            for field in ARRAY_FIELDS:
                if field in arrays:
                    digest.update(np.ascontiguousarray(arrays[field], np.float32).tobytes())
        return digest.hexdigest()

    def _records(self) -> list[dict[str, Any]]:
        return [i.to_wire(arrays=False) for i in self.interventions]

    def record(self) -> dict[str, Any]:
        """The root attribute `condition` (without arrays)."""
        return {
            "name": self.name,
            "interventions": self._records(),
            "interventions_sha256": self.interventions_sha256,
            "prompt": self.prompt,
            "counterfactual_prompts": list(self.counterfactual_prompts),
        }

    def arrays(self) -> list[dict[str, np.ndarray]]:
        """Per intervention, its arrays by field (float32, exactly what is sent)."""
        return [
            {f: a for f in ARRAY_FIELDS if (a := getattr(i, f)) is not None}
            for i in self.interventions
        ]

    def wire_interventions(self) -> list[dict[str, Any]]:
        """The request's `interventions` list (with the arrays)."""
        return [i.to_wire() for i in self.interventions]

    def render(self, instruction: str) -> tuple[str, tuple[str, ...]]:
        """(driving prompt, counterfactual prompts) for a task."""
        return render(self.prompt, instruction), tuple(
            render(template, instruction) for template in self.counterfactual_prompts
        )


BASELINE = Condition()


def render(template: str, instruction: str) -> str:
    """A prompt template with `{task}` replaced by the instruction (no other substitution)."""
    return template.replace(TASK_PLACEHOLDER, instruction)


def write_arrays(file: h5py.File, condition: Condition) -> None:
    """`/condition/interventions/<i>/<field>` for every array of the condition (uncompressed)."""
    for index, arrays in enumerate(condition.arrays()):
        for field, array in arrays.items():
            file.create_dataset(f"{GROUP}/{index}/{field}", data=array)


def read_condition(file: h5py.File, record: Any) -> Condition:
    """The condition of an open task file from its parsed `condition` attribute (None: baseline)."""
    if record is None:
        return BASELINE
    if not isinstance(record, Mapping):
        raise ValidationError("condition", "a JSON map (root attribute)", record)
    interventions = []
    for index, entry in enumerate(record.get("interventions") or []):
        wire = {k: v for k, v in entry.items() if not k.endswith("_shape")}
        for field in ARRAY_FIELDS:
            if f"{field}_shape" in entry:
                wire[field] = np.asarray(file[f"{GROUP}/{index}/{field}"][()])
        interventions.append(Intervention.from_wire(wire))
    condition = Condition(
        name=str(record.get("name", BASELINE_NAME)),
        interventions=tuple(interventions),
        prompt=str(record.get("prompt", TASK_PLACEHOLDER)),
        counterfactual_prompts=tuple(record.get("counterfactual_prompts") or ()),
    )
    stored = record.get("interventions_sha256")
    if stored != condition.interventions_sha256:
        raise ValidationError(
            GROUP,
            f"arrays and records whose sha256 is {stored} (the condition attribute)",
            condition.interventions_sha256,
        )
    return condition

"""`--intervene FILE.json`, `--prompt-variant`, `--counterfactual-prompt`, `--condition`: the
condition a collection runs under, checked before anything starts and against the server before
any episode.

The intervene file holds the request's `interventions` list (docs/interventions.md), either as the
whole document or under the key `interventions`. An array field (`vector`, `value`, `mean`,
`factors`) is a (nested) JSON list of numbers, or `{"npz": "name"}`: the array `name` of the `.npz`
next to the JSON file (`steer.json` -> `steer.npz`, e.g. written by `np.savez`). The npz is read
with `allow_pickle=False` only, and each array's header (dtype, shape) is checked against the
protocol's bounds before its data are read. Errors name the file and the field:
`steer.json: interventions[1].vector: expected ..., received ...`.
"""

from __future__ import annotations

import json
import logging
import math
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from latentpi.client.collect.options import CollectOptions
from latentpi.client.collect.workers import connect
from latentpi.client.libero_env import POLICY_RESOLUTION
from latentpi.client.policy_client import ServerRejected
from latentpi.client.rollout import QueryCondition, conditioned, parse_response
from latentpi.client.storage.condition import (
    ARRAY_FIELDS,
    BASELINE_NAME,
    TASK_PLACEHOLDER,
    Condition,
    render,
)
from latentpi.protocol.errors import ValidationError
from latentpi.protocol.interventions import (
    MAX_INTERVENTION_ELEMENTS,
    Intervention,
    interventions_from_wire,
)
from latentpi.protocol.messages import MAX_PROMPT_CHARS, MAX_PROMPT_VARIANTS

logger = logging.getLogger(__name__)

# Inline arrays are for small vectors; 16 M values as JSON text would be ~200 MB: use an npz.
MAX_INTERVENE_BYTES = 32 << 20
MAX_NAME_CHARS = 200
_NPZ_DTYPES = (np.dtype("<f4"), np.dtype("<f8"), np.dtype(">f4"), np.dtype(">f8"))


# -- the condition from the arguments ----------------------------------------------------------
def load_condition(options: CollectOptions) -> Condition:
    """The run's condition; a bad file or template raises ValidationError naming it."""
    interventions = () if options.intervene is None else load_interventions(options.intervene)
    prompt = TASK_PLACEHOLDER if options.prompt_variant is None else options.prompt_variant
    counterfactual = tuple(options.counterfactual_prompts)
    _check_template("--prompt-variant", prompt)
    for template in counterfactual:
        _check_template("--counterfactual-prompt", template)
    if len(counterfactual) > MAX_PROMPT_VARIANTS:
        raise ValidationError(
            "--counterfactual-prompt",
            f"at most {MAX_PROMPT_VARIANTS} prompts (the server's limit)",
            f"{len(counterfactual)} prompts",
        )
    name = options.condition
    if name is None:
        name = default_name(options.intervene, prompt)
    elif not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS:
        raise ValidationError("--condition", f"a name of 1 to {MAX_NAME_CHARS} characters", name)
    return Condition(name, interventions, prompt, counterfactual)


def default_name(intervene: Path | None, prompt: str) -> str:
    """`baseline`, or the intervene file's stem and/or `prompt="<template>"`, joined by `+`."""
    parts = [] if intervene is None else [Path(intervene).stem]
    if prompt != TASK_PLACEHOLDER:
        parts.append(f"prompt={json.dumps(prompt, ensure_ascii=False)}")
    return "+".join(parts) or BASELINE_NAME


def _check_template(field: str, template: object) -> None:
    if not isinstance(template, str) or len(template) > MAX_PROMPT_CHARS:
        raise ValidationError(
            field,
            f"a prompt of at most {MAX_PROMPT_CHARS} characters ({{task}}: the task's)",
            template,
        )


def check_prompts(condition: Condition, instructions: Sequence[str]) -> None:
    """Every rendered prompt within the protocol's length (before the server starts)."""
    for instruction in instructions:
        for field, template in [
            ("--prompt-variant", condition.prompt),
            *(("--counterfactual-prompt", t) for t in condition.counterfactual_prompts),
        ]:
            if len(render(template, instruction)) > MAX_PROMPT_CHARS:
                raise ValidationError(
                    field,
                    f"a prompt of at most {MAX_PROMPT_CHARS} characters with {{task}} = "
                    f"{instruction!r}",
                    template,
                )


# -- the intervene file ------------------------------------------------------------------------
def load_interventions(path: Path) -> tuple[Intervention, ...]:
    """The file's interventions, validated by the protocol (`interventions_from_wire`)."""
    path = Path(path)
    entries = _read_entries(path)
    with _Npz(path.with_suffix(".npz"), path) as npz:
        for index, entry in enumerate(entries):
            if isinstance(entry, dict):
                for field in ARRAY_FIELDS:
                    if field in entry:
                        where = f"interventions[{index}].{field}"
                        entry[field] = _array(where, entry[field], npz, path)
    try:
        return interventions_from_wire(entries)
    except ValidationError as error:
        raise error.renamed(f"{path}: {error.field}") from None


def _read_entries(path: Path) -> list[Any]:
    expected = "a JSON file with the interventions list (or a map with the key interventions)"
    if not path.is_file():
        raise ValidationError(f"--intervene {path}", expected, "no such file")
    size = path.stat().st_size
    if size > MAX_INTERVENE_BYTES:
        raise ValidationError(
            f"{path}",
            f"at most {MAX_INTERVENE_BYTES} bytes (big arrays go in {path.stem}.npz: "
            '{"npz": "name"})',
            f"{size} bytes",
        )
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValidationError(f"{path}", f"{expected} ({error})", "unparseable JSON") from None
    if isinstance(data, Mapping):
        if set(data) != {"interventions"}:
            raise ValidationError(f"{path}", expected, f"a map with keys {sorted(data)}")
        data = data["interventions"]
    if not isinstance(data, list):
        raise ValidationError(f"{path}: interventions", "a list of intervention maps", data)
    return data


def _array(field: str, value: Any, npz: _Npz, path: Path) -> Any:
    """An inline list -> float64 array, `{"npz": name}` -> the npz's array; anything else is left
    for the protocol to refuse."""
    if isinstance(value, list):
        try:
            array = np.asarray(value)
        except (ValueError, RecursionError):
            array = None
        if array is None or array.dtype.kind not in "iuf" or array.dtype == np.bool_:
            raise ValidationError(
                f"{path}: {field}",
                'a (nested, rectangular) list of numbers, or {"npz": name}',
                "a ragged list or one with non-numbers",
            )
        return array.astype(np.float64)
    if isinstance(value, Mapping):
        if set(value) != {"npz"} or not isinstance(value["npz"], str):
            raise ValidationError(f"{path}: {field}", '{"npz": "name"} or a list of numbers', value)
        return npz.array(field, value["npz"])
    return value


class _Npz:
    """The sibling npz, opened on first use; arrays checked from their headers before reading."""

    def __init__(self, path: Path, source: Path) -> None:
        self.path, self.source = path, source
        self._file: Any = None
        self._values = 0  # read so far: all arrays together are bounded, not only each one

    def __enter__(self) -> _Npz:
        return self

    def __exit__(self, *_: object) -> None:
        if self._file is not None:
            self._file.close()

    def _open(self, field: str) -> Any:
        if self._file is None:
            if not self.path.is_file():
                raise ValidationError(
                    f"{self.source}: {field}",
                    f"an array of {self.path.name} (the .npz next to the JSON file)",
                    f"no file {self.path}",
                )
            try:
                self._file = np.load(self.path, allow_pickle=False)
            except (OSError, ValueError, zipfile.BadZipFile) as error:
                raise ValidationError(
                    f"{self.source}: {field}", f"a readable {self.path.name}", str(error)
                ) from None
            if not hasattr(self._file, "files"):
                self._file = None
                raise ValidationError(
                    f"{self.source}: {field}", f"{self.path.name} an npz archive", "a single .npy"
                )
        return self._file

    def array(self, field: str, name: str) -> np.ndarray:
        npz = self._open(field)
        where = f"{self.source}: {field}"
        if name not in npz.files:
            raise ValidationError(
                where,
                f"an array of {self.path.name} (it has {', '.join(npz.files) or 'none'})",
                name,
            )
        dtype, shape = _header(npz, name, where)
        expected = (
            f"{self.path.name}[{name}]: a float32 or float64 array of at most "
            f"{MAX_INTERVENTION_ELEMENTS} values (never unpickled)"
        )
        if dtype not in _NPZ_DTYPES or dtype.hasobject:
            raise ValidationError(where, expected, f"dtype {dtype}")
        if len(shape) > 3 or math.prod(shape) > MAX_INTERVENTION_ELEMENTS:
            raise ValidationError(where, expected + " and at most 3 axes", f"shape {shape}")
        self._values += math.prod(shape)
        if self._values > MAX_INTERVENTION_ELEMENTS:
            raise ValidationError(
                where,
                f"arrays of at most {MAX_INTERVENTION_ELEMENTS} values in all (the protocol's bound)",
                f"{self._values} values so far",
            )
        try:
            return np.asarray(npz[name], dtype.newbyteorder("="))
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            raise ValidationError(where, expected, str(error)) from None


def _header(npz: Any, name: str, where: str) -> tuple[np.dtype, tuple[int, ...]]:
    """(dtype, shape) from the .npy header, without reading the data."""
    fmt = np.lib.format
    try:
        with npz.zip.open(f"{name}.npy") as member:
            version = fmt.read_magic(member)
            read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(
                version
            )
            if read is None:
                raise ValueError(f"npy format version {version}")
            shape, _, dtype = read(member)
    except (OSError, ValueError, KeyError, SyntaxError, zipfile.BadZipFile) as error:
        raise ValidationError(where, "a readable .npy array header", str(error)) from None
    return np.dtype(dtype), tuple(shape)


# -- against the server ------------------------------------------------------------------------
def check_with_server(
    condition: Condition,
    url: str,
    options: CollectOptions,
    metadata: Mapping[str, Any],
    instruction: str,
) -> tuple[Mapping[str, Any], ...]:
    """One request with a blank observation under the condition, before any episode: the server
    resolves the interventions against its model (layers, segments, widths) and the prompts
    against its limits; a refusal is a ValidationError naming the file and field. Returns the
    server's records of the interventions."""
    if condition.is_baseline and not condition.counterfactual_prompts:
        return ()
    prompt, counterfactual = condition.render(instruction)
    query = QueryCondition(prompt, counterfactual, tuple(condition.wire_interventions()))
    side = (POLICY_RESOLUTION, POLICY_RESOLUTION, 3)
    request = {
        "observation/image": np.zeros(side, np.uint8),
        "observation/wrist_image": np.zeros(side, np.uint8),
        "observation/state": np.zeros(8, np.float32),
        "noise_seed": 0,
        **query.fields(),
    }
    with connect(url, options.api_key, options.retry_timeout_s, metadata) as client:
        try:
            response = client.infer(request)
        except ServerRejected as error:
            raise _refused(str(error), options) from None
    records = conditioned(query, parse_response(response, options.replan_steps))[1]
    logger.info("the server applies the interventions as %s", list(records))
    return records


def _refused(text: str, options: CollectOptions) -> ValidationError:
    """The server's refusal, under the argument it is about: `FILE.json: interventions[1]...`."""
    message = text.removeprefix("bad request: ")
    source = (
        str(options.intervene)
        if message.startswith("interventions") and options.intervene is not None
        else "--prompt-variant / --counterfactual-prompt"
        if message.startswith("prompt")
        else "the condition"
    )
    error = ValidationError(source, "what the server accepts", None)
    error.args = (f"{source}: {message} (the server refused it)",)
    return error

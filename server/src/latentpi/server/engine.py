"""The model side of the server: one request → model inputs (CPU), a batch → one compiled model
call (device) → each request's actions and latents.

`PolicyEngine.prepare` runs per request on worker threads (validation, transforms, tokenization,
noise); `run_batch` runs on the single model thread that the batcher owns.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from latentpi.protocol.errors import ValidationError
from latentpi.protocol.latent_layout import ArrayLayout, latent_bytes, latent_layouts
from latentpi.protocol.latent_spec import LatentSpec
from latentpi.protocol.messages import PolicyRequest, PolicyResponse, ServerMetadata
from latentpi.server import device as _device
from latentpi.server.metrics import DeviceReport
from latentpi.server.model.capture import CompiledSampler
from latentpi.server.model.configs import ModelConfig, token_layout
from latentpi.server.model.intervene import EditPlan, EditValues, model_dims, plan_of, stack_values
from latentpi.server.model.pi0 import Observation
from latentpi.server.policy.libero import LiberoPolicyTransform
from latentpi.server.readouts import Readouts
from latentpi.server.settings import ServerSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedRequest:
    """One validated request, ready to be stacked into a batch."""

    inputs: Mapping[str, Any]  # LiberoPolicyTransform.inputs(...) for this request
    noise: np.ndarray  # (action_horizon, action_dim) float32
    spec: LatentSpec | None  # resolved against the model; None = plain inference
    edits: EditPlan | None = None  # the interventions' structure; None = none
    edit_values: EditValues = ()  # their arrays and scales (no batch axis)
    records: tuple[dict[str, Any], ...] = ()  # what the response says was done
    # The same observation and noise under other prompts: (prompt, model inputs) per variant.
    variants: tuple[tuple[str, Mapping[str, Any]], ...] = ()
    readouts: Mapping[str, Any] | None = None  # read-outs of the captured latents

    def rows(self) -> list[PreparedRequest]:
        """The model rows this request needs: its own, then one per prompt variant."""
        return [self] + [
            dataclasses.replace(self, inputs=inputs, variants=()) for _, inputs in self.variants
        ]

    @property
    def group(self) -> tuple[LatentSpec | None, EditPlan | None]:
        """Requests that can share one compiled call."""
        return self.spec, self.edits


@dataclass
class PolicyEngine:
    model: ModelConfig
    params: Any
    transform: LiberoPolicyTransform
    settings: ServerSettings
    config_summary: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    sampler: CompiledSampler = field(init=False)
    device: Any = field(init=False)
    _param_bytes: dict[tuple[str, str], int] = field(init=False)
    _metadata: ServerMetadata = field(init=False)
    _rng: np.random.Generator = field(init=False)
    _rng_lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _readouts: Readouts = field(init=False)

    def __post_init__(self) -> None:
        self.device = _device.serving_device()
        _device.check_resident(self.params, self.device)  # else every call copies the weights
        self._param_bytes = _device.param_bytes(self.params)
        self.sampler = CompiledSampler(
            self.model, by_row=self.batch_invariant, max_programs=self.settings.max_programs
        )
        self._readouts = Readouts(self.model, self.transform.tokenizer)
        self._rng = np.random.default_rng(self.seed)
        self._metadata = ServerMetadata(
            model=self.model.variant,
            token_layout=token_layout(self.model),
            depth=(self.model.expert_0.depth, self.model.expert_1.depth),
            width=(self.model.expert_0.width, self.model.expert_1.width),
            num_heads=self.model.expert_0.num_heads,
            action_horizon=self.model.action_horizon,
            action_dim=self.model.action_dim,
            num_steps=self.model.num_steps,
            config={
                **self.config_summary,
                "batch_invariant": self.batch_invariant,
                "device": _device.describe(self.device),
            },
        )

    @property
    def batch_invariant(self) -> bool:
        if self.settings.batch_invariant is not None:
            return self.settings.batch_invariant
        import jax

        return jax.default_backend() == "cpu"

    # -- the app's interface --------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return self._metadata.to_wire()

    def device_report(self) -> DeviceReport:
        return DeviceReport(str(self.device), self._param_bytes, _device.memory_stats(self.device))

    def prepare(self, request: PolicyRequest) -> PreparedRequest:
        inputs = self.transform.inputs(
            request.image, request.wrist_image, request.state, request.prompt
        )
        spec = self.sampler.resolve(request.latent_spec) if request.collect_latents else None
        prepared = PreparedRequest(
            inputs=inputs,
            noise=self._noise(request),
            spec=spec,
            variants=tuple((p, self._with_prompt(inputs, p)) for p in request.prompt_variants),
            readouts=request.readouts,
        )
        if spec is not None:
            self._check_response_size(spec, rows=1 + len(request.prompt_variants))
        if request.readouts and spec is not None:
            self._readouts.check(request.readouts, latent_layouts(spec, self._metadata.shape))
        if not request.interventions:
            return prepared
        dims = model_dims(self.model)
        resolved = [i.resolve(dims, index) for index, i in enumerate(request.interventions)]
        return dataclasses.replace(
            prepared,
            edits=plan_of(self.model, resolved),
            edit_values=tuple(i.values() for i in resolved),
            records=tuple(i.to_wire(arrays=False) for i in resolved),
        )

    def _check_response_size(self, spec: LatentSpec, rows: int) -> None:
        size = rows * latent_bytes(latent_layouts(spec, self._metadata.shape))
        limit = self.settings.max_response_bytes
        if size > limit:
            raise ValidationError(
                "latent_spec",
                f"a selection of at most {limit} bytes per response (the server's "
                f"--max-response-bytes; {rows} row(s) with the prompt variants)",
                f"{size} bytes",
            )

    def run_batch(self, items: Sequence[PreparedRequest]) -> list[dict[str, Any]]:
        """One model call per chunk of at most max_batch rows (a request with prompt variants
        brings several rows); each request gets its own rows back."""
        rows = [row for item in items for row in item.rows()]
        start = time.monotonic()
        results = [r for chunk in self._chunks(rows) for r in self._run_rows(chunk)]
        infer_ms = (time.monotonic() - start) * 1000
        spec = items[0].spec
        layouts = latent_layouts(spec, self._metadata.shape) if spec is not None else {}
        responses, first = [], 0
        for item in items:
            count = 1 + len(item.variants)
            own = results[first : first + count]
            responses.append(self._response(item, own, layouts, spec, infer_ms))
            first += count
        return responses

    def _chunks(self, rows: Sequence[PreparedRequest]) -> list[Sequence[PreparedRequest]]:
        size = self.settings.max_batch
        return [rows[i : i + size] for i in range(0, len(rows), size)]

    def _run_rows(
        self, rows: Sequence[PreparedRequest]
    ) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
        padded = self.settings.padded_batch_size(len(rows))
        full = list(rows) + [rows[0]] * (padded - len(rows))  # padding rows are dropped below
        edits = rows[0].edits
        values = stack_values([r.edit_values for r in full]) if edits is not None else None
        actions, latents = self.sampler.sample_actions(
            self.params,
            _stack_observation(full),
            np.stack([r.noise for r in full]),
            rows[0].spec,
            edits=edits,
            edit_values=values,
        )
        return [
            (actions[i], {name: array[i] for name, array in latents.items()})
            for i in range(len(rows))
        ]

    def is_compiled(self, items: Sequence[PreparedRequest]) -> bool:
        image = next(iter(items[0].inputs["image"].values()))
        return all(
            self.sampler.is_compiled(size, str(image.dtype), items[0].spec, edits=items[0].edits)
            for size in self._padded_sizes(items)
        )

    def compile(self, items: Sequence[PreparedRequest]) -> None:
        """Compile what `run_batch(items)` needs, without running it (on the compile thread)."""
        first = items[0].rows()[0]
        for size in self._padded_sizes(items):
            rows = [first] * size
            noise = np.stack([r.noise for r in rows])
            edits = first.edits
            values = stack_values([r.edit_values for r in rows]) if edits is not None else None
            self.sampler.precompile(
                self.params, _stack_observation(rows), noise, first.spec, edits, values
            )

    def _padded_sizes(self, items: Sequence[PreparedRequest]) -> set[int]:
        rows = sum(1 + len(item.variants) for item in items)
        chunks = [self.settings.max_batch] * (rows // self.settings.max_batch)
        if rows % self.settings.max_batch:
            chunks.append(rows % self.settings.max_batch)
        return {self.settings.padded_batch_size(n) for n in chunks}

    def warmup(
        self, specs: Sequence[LatentSpec | None] = (None,), batch_sizes: Sequence[int] = (1,)
    ) -> None:
        """Compile every (spec, padded batch size) pair before the server reports healthy, so the
        first requests of a run never wait for a compile."""
        dummy = self.prepare(_dummy_request())
        sizes = sorted(
            {self.settings.padded_batch_size(min(n, self.settings.max_batch)) for n in batch_sizes}
        )
        for spec in specs:
            item = PreparedRequest(dummy.inputs, dummy.noise, self.sampler.resolve(spec))
            for size in sizes:
                self.run_batch([item] * size)

    def _with_prompt(self, inputs: Mapping[str, Any], prompt: str) -> dict[str, Any]:
        """The same model inputs under another prompt (only the tokens change)."""
        tokens, mask = self.transform.tokenizer.tokenize(prompt)
        return {**inputs, "tokenized_prompt": tokens, "tokenized_prompt_mask": mask}

    # -- helpers --------------------------------------------------------------------------------
    def _noise(self, request: PolicyRequest) -> np.ndarray:
        """The request's own noise, or noise from its seed, or from the server's generator."""
        shape = (self.model.action_horizon, self.model.action_dim)
        if request.noise is not None:
            if request.noise.shape != shape:
                raise ValidationError("noise", f"a float32 array of shape {shape}", request.noise)
            return request.noise.astype(np.float32)  # a float64 copy casts as openpi's jnp.asarray
        if request.noise_seed is not None:
            return np.random.default_rng(request.noise_seed).standard_normal(
                shape, dtype=np.float32
            )
        with self._rng_lock:
            return self._rng.standard_normal(shape, dtype=np.float32)

    def _response(
        self,
        item: PreparedRequest,
        rows: Sequence[tuple[np.ndarray, dict[str, np.ndarray]]],
        layouts: Mapping[str, ArrayLayout],
        spec: LatentSpec | None,
        infer_ms: float,
    ) -> dict[str, Any]:
        """Row 0 is the request's own prompt; the others its prompt variants, in order."""
        (actions, latents), variant_rows = rows[0], rows[1:]
        variants = tuple(
            {"prompt": prompt, "actions": self._actions(row_actions, inputs), **row_latents}
            for (prompt, inputs), (row_actions, row_latents) in zip(
                item.variants, variant_rows, strict=True
            )
        )
        response = PolicyResponse(
            actions=self._actions(actions, item.inputs),
            latents=latents,
            latent_layout=layouts,
            latent_spec=spec,
            policy_timing={"infer_ms": infer_ms},
            interventions=item.records,
            prompt_variants=variants,
            readouts=(
                self._readouts.compute(self.params, item.readouts, latents, layouts)
                if item.readouts
                else {}
            ),
        )
        return response.to_wire()

    def _actions(self, actions: np.ndarray, inputs: Mapping[str, Any]) -> np.ndarray:
        return self.transform.outputs(np.asarray(actions, np.float32), inputs["state"])


def _stack_observation(rows: Sequence[PreparedRequest]) -> Observation:
    first = rows[0].inputs
    return Observation(
        images={slot: np.stack([r.inputs["image"][slot] for r in rows]) for slot in first["image"]},
        image_masks={
            slot: np.array([bool(r.inputs["image_mask"][slot]) for r in rows])
            for slot in first["image_mask"]
        },
        state=np.stack([r.inputs["state"] for r in rows]).astype(np.float32),
        tokenized_prompt=np.stack([r.inputs["tokenized_prompt"] for r in rows]).astype(np.int32),
        tokenized_prompt_mask=np.stack([r.inputs["tokenized_prompt_mask"] for r in rows]).astype(
            bool
        ),
    )


def _dummy_request() -> PolicyRequest:
    image = np.zeros((224, 224, 3), np.uint8)
    return PolicyRequest(
        image=image, wrist_image=image, state=np.zeros(8, np.float32), prompt="warm up"
    )

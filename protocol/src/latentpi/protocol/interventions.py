"""What a request asks the model to change while it runs: `Intervention`s and the `Site`s they act on.

A request's optional `interventions` list sits next to its `latent_spec`. Each entry names a site
(an expert, the layers, a point in the layer, token positions, and for the action expert the
denoising steps) and an operation:

  add                 site += scale · vector                              (activation steering)
  set / patch         site  = value                                       (activation patching)
  ablate              site  = mean, or 0 without one
  scale_units         site[..., units] *= factors                         (e.g. FFN neurons)
  attention_knockout  queries of one segment may not attend to keys of another

Points: `residual` (the residual stream entering the layer), `attn_out` (the attention block's
output, before it is added to the residual stream) and `mlp_hidden` (the FFN hidden units after the
gate, width mlp_dim). Arrays broadcast over the site: (width,) for every position and layer,
(positions, width) per position, (layers, positions, width) per listed layer and position.

The server compiles one function per intervention *structure* (`Intervention.structure()`: the
op, the resolved site and the arrays' shapes); the arrays and scales are arguments, so a new vector
or scale never recompiles. Every array is bounded (MAX_INTERVENTION_ELEMENTS) and finite.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import ml_dtypes
import numpy as np

from latentpi.protocol.errors import ValidationError
from latentpi.protocol.latent_spec import TokenLayout, resolve_indices

Op = Literal["add", "set", "patch", "ablate", "scale_units", "attention_knockout"]
Point = Literal["residual", "attn_out", "mlp_hidden"]

OPS: tuple[str, ...] = ("add", "set", "patch", "ablate", "scale_units", "attention_knockout")
POINTS: tuple[str, ...] = ("residual", "attn_out", "mlp_hidden")
MAX_INTERVENTIONS = 16
# 16 M values = 64 MB of float32: prompt states of every layer of pi0 (18 × 48 × 2048 = 1.8 M)
# fit many times over; anything near the frame limit is refused before it is copied.
MAX_INTERVENTION_ELEMENTS = 16 * 2**20
_ARRAY_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(ml_dtypes.bfloat16))
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_SITE_KEYS = ("expert", "point", "layers", "segment", "positions", "steps")


@dataclass(frozen=True)
class ModelDims:
    """What resolving a site needs to know of the model (from the server metadata)."""

    layout: TokenLayout
    depth: int
    num_steps: int
    width: tuple[int, int]
    mlp_dim: tuple[int, int]


@dataclass(frozen=True)
class Site:
    """Where an intervention acts. Resolved (`resolve`), every field is explicit: layers and steps
    non-negative, positions absolute [start, stop) in the expert's own sequence."""

    expert: int
    point: Point = "residual"
    layers: tuple[int, ...] | None = None  # layers 0..depth-1 (negative from the end); None = all
    segment: str | None = None  # a segment of the expert's token layout; None = its whole sequence
    positions: tuple[int, int] | None = None  # [start, stop) within the segment (or sequence)
    steps: tuple[int, ...] | None = None  # expert 1 only: denoising steps; None = all

    def __post_init__(self) -> None:
        if not _is_int(self.expert) or self.expert not in (0, 1):
            raise ValidationError("site.expert", "0 or 1", self.expert)
        if not isinstance(self.point, str) or self.point not in POINTS:
            raise ValidationError("site.point", f"one of {', '.join(POINTS)}", self.point)
        _check_ints("site.layers", self.layers)
        _check_ints("site.steps", self.steps)
        if self.segment is not None and not isinstance(self.segment, str):
            raise ValidationError("site.segment", "null or a segment name", self.segment)
        if self.positions is not None and not (
            isinstance(self.positions, tuple)
            and len(self.positions) == 2
            and all(_is_int(p) and p >= 0 for p in self.positions)
        ):
            raise ValidationError("site.positions", "[start, stop] with 0 <= start", self.positions)
        if self.expert == 0 and self.steps is not None:
            raise ValidationError(
                "site.steps", "null for expert 0 (it runs once per call)", self.steps
            )

    @classmethod
    def from_wire(cls, data: Any, field: str = "site") -> Site:
        if not isinstance(data, Mapping):
            raise ValidationError(field, "a map with expert, point, layers, ...", data)
        unknown = [key for key in data if key not in _SITE_KEYS]
        if unknown:
            raise ValidationError(f"{field}.{unknown[0]}", f"one of {list(_SITE_KEYS)}", unknown[0])
        if "expert" not in data:
            raise ValidationError(f"{field}.expert", "present (0 or 1)", "nothing (missing key)")
        return cls(
            expert=data["expert"],
            point=data.get("point", "residual"),
            layers=_tuple(data.get("layers")),
            segment=data.get("segment"),
            positions=_tuple(data.get("positions")),
            steps=_tuple(data.get("steps")),
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key in _SITE_KEYS
            if (value := getattr(self, key)) is not None
        }

    def resolve(self, dims: ModelDims, field: str = "site") -> Site:
        layers = resolve_indices(f"{field}.layers", self.layers, dims.depth)
        steps = (
            None
            if self.expert == 0
            else resolve_indices(f"{field}.steps", self.steps, dims.num_steps)
        )
        start, stop = _span(dims.layout, self.expert, self.segment, f"{field}.segment")
        if self.positions is not None:
            first, last = self.positions
            if not first < last <= stop - start:
                raise ValidationError(
                    f"{field}.positions",
                    f"[start, stop] with start < stop <= {stop - start}",
                    list(self.positions),
                )
            start, stop = start + first, start + last
        return dataclasses.replace(self, layers=layers, steps=steps, positions=(start, stop))

    def width(self, dims: ModelDims) -> int:
        return dims.mlp_dim[self.expert] if self.point == "mlp_hidden" else dims.width[self.expert]


@dataclass(frozen=True, eq=False)
class Intervention:
    """One operation at one site; arrays are float32 numpy (bfloat16 and float64 are cast)."""

    op: Op
    site: Site | None = None  # every op but attention_knockout
    scale: float = 1.0  # add
    vector: np.ndarray | None = None  # add
    value: np.ndarray | None = None  # set / patch
    mean: np.ndarray | None = None  # ablate (None: zero)
    units: tuple[int, ...] | None = None  # scale_units: indices along the site's width
    factors: np.ndarray | None = None  # scale_units: one factor per unit
    query: tuple[int, str] | None = None  # attention_knockout: (expert, segment) of the queries
    key: tuple[int, str] | None = None  # attention_knockout: (expert, segment) of the keys
    layers: tuple[int, ...] | None = None  # attention_knockout: layers (None = all)
    steps: tuple[int, ...] | None = None  # attention_knockout with expert-1 queries

    def __post_init__(self) -> None:
        if not isinstance(self.op, str) or self.op not in OPS:  # an array would compare elementwise
            raise ValidationError("interventions.op", f"one of {', '.join(OPS)}", self.op)
        if self.op == "patch":
            object.__setattr__(self, "op", "set")
        if self.op == "attention_knockout":
            self._check_knockout()
        elif not isinstance(self.site, Site):
            raise ValidationError("interventions.site", "a site map", self.site)
        for name in _OP_FIELDS:
            if name not in _OP_FIELDS_OF[self.op] and getattr(self, name) is not None:
                raise ValidationError(
                    f"interventions.{name}", f"absent for op {self.op}", getattr(self, name)
                )
        required = {"add": "vector", "set": "value", "scale_units": "factors"}.get(self.op)
        if required is not None and getattr(self, required) is None:
            raise ValidationError(f"interventions.{required}", f"an array for op {self.op}", None)
        if not (isinstance(self.scale, int | float) and not isinstance(self.scale, bool)):
            raise ValidationError("interventions.scale", "a number", self.scale)
        if not (np.isfinite(self.scale) and abs(self.scale) <= _FLOAT32_MAX):  # sent as float32
            raise ValidationError("interventions.scale", "a finite number (float32)", self.scale)
        object.__setattr__(self, "scale", float(self.scale))
        for name in ("vector", "value", "mean", "factors"):
            array = getattr(self, name)
            if array is not None:
                object.__setattr__(self, name, _array(f"interventions.{name}", array))
        if self.op == "scale_units":
            self._check_units()

    def _check_knockout(self) -> None:
        for name in ("query", "key"):
            ref = getattr(self, name)
            if not (
                isinstance(ref, tuple)
                and len(ref) == 2
                and _is_int(ref[0])
                and ref[0] in (0, 1)
                and isinstance(ref[1], str)
            ):
                raise ValidationError(
                    f"interventions.{name}", "{expert: 0 or 1, segment: name}", ref
                )
        if self.query[0] == 0 and self.key[0] == 1:  # type: ignore[index]
            raise ValidationError(
                "interventions.key",
                "an expert-0 segment for expert-0 queries (the prefix never sees the suffix)",
                self.key,
            )
        _check_ints("interventions.layers", self.layers)
        _check_ints("interventions.steps", self.steps)
        if self.query[0] == 0 and self.steps is not None:  # type: ignore[index]
            raise ValidationError(
                "interventions.steps",
                "null for expert-0 queries (the prefix runs once per call)",
                self.steps,
            )

    def _check_units(self) -> None:
        _check_ints("interventions.units", self.units)
        if self.units is None or self.factors is None or self.factors.shape != (len(self.units),):
            raise ValidationError(
                "interventions.factors", "one factor per unit (shape (len(units),))", self.factors
            )

    # -- wire -----------------------------------------------------------------------------------
    @classmethod
    def from_wire(cls, data: Any) -> Intervention:
        if not isinstance(data, Mapping):
            raise ValidationError("interventions", "a list of maps with op and site", data)
        unknown = [key for key in data if key not in _KEYS]
        if unknown:
            raise ValidationError(
                f"interventions.{unknown[0]}", f"one of {list(_KEYS)}", unknown[0]
            )
        if "op" not in data:
            raise ValidationError("interventions.op", "present", "nothing (missing key)")
        site = data.get("site")
        return cls(
            op=data["op"],
            site=None if site is None else Site.from_wire(site, "interventions.site"),
            scale=data.get("scale", 1.0),
            vector=data.get("vector"),
            value=data.get("value"),
            mean=data.get("mean"),
            units=_tuple(data.get("units")),
            factors=data.get("factors"),
            query=_segment_ref("interventions.query", data.get("query")),
            key=_segment_ref("interventions.key", data.get("key")),
            layers=_tuple(data.get("layers")),
            steps=_tuple(data.get("steps")),
        )

    def to_wire(self, *, arrays: bool = True) -> dict[str, Any]:
        """The wire map; `arrays=False` gives the record a response or a file keeps (shapes and
        scalars, not the arrays)."""
        out: dict[str, Any] = {"op": self.op}
        if self.site is not None:
            out["site"] = self.site.to_wire()
        if self.op == "add":
            out["scale"] = self.scale
        for name in ("vector", "value", "mean", "factors"):
            array = getattr(self, name)
            if array is not None:
                out[name if arrays else f"{name}_shape"] = array if arrays else list(array.shape)
        for name in ("units", "layers", "steps"):
            if (value := getattr(self, name)) is not None:
                out[name] = list(value)
        for name in ("query", "key"):
            if (ref := getattr(self, name)) is not None:
                out[name] = {"expert": ref[0], "segment": ref[1]}
        return out

    # -- against a model ------------------------------------------------------------------------
    def resolve(self, dims: ModelDims, index: int = 0) -> Intervention:
        """Check every index, name and shape against the model; canonical (hashable) structure."""
        field = f"interventions[{index}]"
        if self.op == "attention_knockout":
            for name in ("query", "key"):
                expert, segment = getattr(self, name)
                _span(dims.layout, expert, segment, f"{field}.{name}.segment")
            layers = resolve_indices(f"{field}.layers", self.layers, dims.depth)
            steps = (
                None
                if self.query[0] == 0
                else resolve_indices(f"{field}.steps", self.steps, dims.num_steps)
            )  # type: ignore[index]
            return dataclasses.replace(self, layers=layers, steps=steps)
        site = self.site.resolve(dims, f"{field}.site")  # type: ignore[union-attr]
        width = site.width(dims)
        length = site.positions[1] - site.positions[0]  # type: ignore[index]
        for name in ("vector", "value", "mean"):
            array = getattr(self, name)
            if array is not None:
                _check_site_shape(
                    f"{field}.{name}", array, len(site.layers or ()), length, width, name == "mean"
                )
        if self.units is not None:
            bad = [u for u in self.units if not 0 <= u < width]
            if bad:
                raise ValidationError(f"{field}.units", f"indices in [0, {width})", bad[0])
        return dataclasses.replace(self, site=site)

    def structure(self) -> tuple[Any, ...]:
        """What the compiled function depends on (resolved interventions only): op, site, shapes,
        unit indices — never the arrays' values or the scale."""
        shapes = tuple(
            None if (array := getattr(self, name)) is None else array.shape
            for name in ("vector", "value", "mean", "factors")
        )
        return (
            self.op,
            self.site,
            shapes,
            self.units,
            self.query,
            self.key,
            self.layers,
            self.steps,
        )

    def values(self) -> dict[str, np.ndarray]:
        """The arguments of the compiled function for this intervention (float32)."""
        out = {
            name: array
            for name in ("vector", "value", "mean", "factors")
            if (array := getattr(self, name)) is not None
        }
        if self.op == "add":
            out["scale"] = np.float32(self.scale)  # type: ignore[assignment]
        return out


# The fields each op takes (scale has a default and is only recorded for add).
_OP_FIELDS = ("vector", "value", "mean", "units", "factors", "query", "key", "layers", "steps")
_OP_FIELDS_OF = {
    "add": ("vector",),
    "set": ("value",),
    "ablate": ("mean",),
    "scale_units": ("units", "factors"),
    "attention_knockout": ("query", "key", "layers", "steps"),
}
_KEYS = (
    "op", "site", "scale", "vector", "value", "mean", "units", "factors", "query", "key",
    "layers", "steps",
)  # fmt: skip


def interventions_from_wire(data: Any) -> tuple[Intervention, ...]:
    if not isinstance(data, list | tuple):
        raise ValidationError("interventions", "a list of intervention maps", data)
    if not 0 < len(data) <= MAX_INTERVENTIONS:
        raise ValidationError(
            "interventions", f"1 to {MAX_INTERVENTIONS} entries", f"{len(data)} entries"
        )
    interventions = tuple(_entry(index, entry) for index, entry in enumerate(data))
    total = sum(array.size for i in interventions for array in i.values().values())
    if total > MAX_INTERVENTION_ELEMENTS:
        raise ValidationError(
            "interventions", f"at most {MAX_INTERVENTION_ELEMENTS} array values in all", total
        )
    return interventions


def _entry(index: int, data: Any) -> Intervention:
    """One entry; its errors name it: `interventions[2].site.layers: expected ...`."""
    try:
        return Intervention.from_wire(data)
    except ValidationError as error:
        field = error.field.removeprefix("interventions").removeprefix(".")
        raise error.renamed(f"interventions[{index}]" + (f".{field}" if field else "")) from None


# -- helpers ----------------------------------------------------------------------------------------
def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _tuple(value: Any) -> Any:
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu":
        return tuple(int(v) for v in value)
    return tuple(value) if isinstance(value, list) else value


def _check_ints(field: str, value: object) -> None:
    if value is None:
        return
    if not isinstance(value, tuple) or not value or not all(_is_int(v) for v in value):
        raise ValidationError(field, "null or a non-empty list of integers", value)


def _segment_ref(field: str, value: Any) -> tuple[int, str] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) != {"expert", "segment"}:
        raise ValidationError(field, "{expert: 0 or 1, segment: name}", value)
    return (value["expert"], value["segment"])


def _array(field: str, value: Any) -> np.ndarray:
    expected = f"a finite float array of at most {MAX_INTERVENTION_ELEMENTS} values"
    if not isinstance(value, np.ndarray) or value.dtype not in _ARRAY_DTYPES or value.ndim > 3:
        raise ValidationError(field, expected + " and at most 3 axes", value)
    if not 0 < value.size <= MAX_INTERVENTION_ELEMENTS:
        raise ValidationError(field, expected, value)
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: refused below
        array = value.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValidationError(field, expected, "an array with NaN or infinity")
    return array


def _span(layout: TokenLayout, expert: int, segment: str | None, field: str) -> tuple[int, int]:
    if segment is None:
        return 0, layout.length(expert)
    try:
        return layout.span(expert, segment)
    except KeyError:
        names = ", ".join(layout.names(expert))
        raise ValidationError(
            field, f"a segment of expert {expert} among {names}", segment
        ) from None


def _check_site_shape(
    field: str, array: np.ndarray, layers: int, length: int, width: int, vector_only: bool
) -> None:
    allowed = [(width,)] if vector_only else [(width,), (length, width), (layers, length, width)]
    if array.shape not in allowed:
        shapes = " or ".join(str(shape) for shape in allowed)
        raise ValidationError(field, f"shape {shapes} for this site", array)

"""Property tests of message validation: whatever a peer sends, `PolicyRequest.from_wire` (and the
resolution of its latent_spec and interventions against a model) either accepts it or raises a
`ValidationError` naming a field, never another exception; valid requests round-trip; error texts
cost a bounded amount of time and memory whatever the received value.

Settings: wire_strategies.profile (derandomized in CI; LATENTPI_FUZZ_EXAMPLES for a long run).
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from wire_strategies import (
    REQUEST_KEYS,
    SMALL_DIMS,
    interventions,
    latent_specs,
    mutated,
    peak_memory,
    profile,
    valid_requests,
    wire_values,
)

from latentpi.protocol.codec import packb, unpackb
from latentpi.protocol.errors import ValidationError, describe
from latentpi.protocol.interventions import interventions_from_wire
from latentpi.protocol.latent_spec import LatentSpec
from latentpi.protocol.messages import PolicyRequest, PolicyResponse, ServerMetadata


def over_the_wire(value: Any) -> Any:
    """What the server's decoder hands to validation: lists, dicts, read-only array views."""
    return unpackb(packb(value))


def accept_or_refuse(wire: Any) -> PolicyRequest | None:
    """The server's validation of one request: from_wire, then resolution against the model.
    Returns the request when it is valid; a ValidationError propagates; nothing else may."""
    try:
        request = PolicyRequest.from_wire(wire)
        if request.latent_spec is not None:
            request.latent_spec.resolve(SMALL_DIMS.layout, SMALL_DIMS.depth, SMALL_DIMS.num_steps)
        for index, intervention in enumerate(request.interventions):
            intervention.resolve(SMALL_DIMS, index)
    except ValidationError as error:
        assert error.field and error.expected and error.received is not None
        assert len(str(error)) < 1000  # texts go back to the client: short, never data
        return None
    return request


# -- any value, anywhere --------------------------------------------------------------------------
@profile(250)
@given(wire_values)
def test_any_value_is_a_request_or_a_validation_error(value: Any) -> None:
    wire = over_the_wire(value)
    accept_or_refuse(wire)
    for parse in (PolicyResponse.from_wire, ServerMetadata.from_wire, LatentSpec.from_wire):
        with contextlib.suppress(ValidationError):
            parse(wire)


@profile(250)
@given(valid_requests(), st.sampled_from(REQUEST_KEYS), wire_values)
def test_any_field_replaced_by_any_value_is_accepted_or_named(
    request: dict[str, Any], key: str, value: Any
) -> None:
    accept_or_refuse(over_the_wire({**request, key: value}))


@profile(250)
@given(valid_requests().flatmap(lambda request: st.tuples(st.just(request), mutated(request))))
def test_mutated_requests_are_accepted_or_named(pair: tuple[dict[str, Any], Any]) -> None:
    """One change anywhere inside a valid request (nested latent_spec, interventions, sites,
    readouts included): accepted, or refused with a ValidationError."""
    accept_or_refuse(over_the_wire(pair[1]))


@profile(150)
@given(
    latent_specs().flatmap(mutated),
    st.lists(interventions(), min_size=1, max_size=2).flatmap(mutated),
)
def test_mutated_specs_and_interventions_alone_raise_only_validation_errors(
    spec: Any, entries: Any
) -> None:
    for parse in (LatentSpec.from_wire, interventions_from_wire):
        try:
            parsed = parse(over_the_wire(spec if parse is LatentSpec.from_wire else entries))
            if isinstance(parsed, LatentSpec):
                parsed.resolve(SMALL_DIMS.layout, SMALL_DIMS.depth, SMALL_DIMS.num_steps)
            else:
                for index, intervention in enumerate(parsed):
                    intervention.resolve(SMALL_DIMS, index)
        except ValidationError:
            pass


# -- valid requests -------------------------------------------------------------------------------
@profile(150)
@given(valid_requests())
def test_valid_requests_round_trip(request: dict[str, Any]) -> None:
    parsed = accept_or_refuse(over_the_wire(request))
    assert parsed is not None, "a generated valid request was refused"
    again = PolicyRequest.from_wire(over_the_wire(parsed.to_wire()))
    assert packb(again.to_wire()) == packb(parsed.to_wire())
    assert again.latent_spec == parsed.latent_spec
    assert [i.structure() for i in again.interventions] == [
        i.structure() for i in parsed.interventions
    ]


@profile(150)
@given(latent_specs())
def test_latent_spec_round_trips_and_resolution_is_canonical(wire: dict[str, Any]) -> None:
    spec = LatentSpec.from_wire(over_the_wire(wire))
    assert LatentSpec.from_wire(over_the_wire(spec.to_wire())) == spec
    resolved = spec.resolve(SMALL_DIMS.layout, SMALL_DIMS.depth, SMALL_DIMS.num_steps)
    again = resolved.resolve(SMALL_DIMS.layout, SMALL_DIMS.depth, SMALL_DIMS.num_steps)
    assert again == resolved and hash(again) == hash(resolved)
    assert all(0 <= layer <= SMALL_DIMS.depth for layer in resolved.layers or ())
    assert all(0 <= step < SMALL_DIMS.num_steps for step in resolved.steps or ())


@profile(150)
@given(interventions(), st.integers(1, 40))
def test_intervention_arrays_must_match_the_site_width(entry: dict[str, Any], width: int) -> None:
    """The valid entry resolves; the same entry with its array one of any other width is refused
    with the field named, at resolution (the wire cannot know the model's width)."""
    (parsed,) = interventions_from_wire(over_the_wire([entry]))
    resolved = parsed.resolve(SMALL_DIMS, 0)
    assert resolved.structure() == parsed.resolve(SMALL_DIMS, 0).structure()
    name = next((n for n in ("vector", "value", "mean") if n in entry), None)
    if name is None or width == entry[name].shape[0]:
        return
    (wrong,) = interventions_from_wire(over_the_wire([{**entry, name: np.ones(width, np.float32)}]))
    with pytest.raises(ValidationError, match=rf"^interventions\[0\]\.{name}: expected shape"):
        wrong.resolve(SMALL_DIMS, 0)


# -- regressions found by the properties above ----------------------------------------------------
BASE = {
    "observation/image": np.zeros((4, 4, 3), np.uint8),
    "observation/wrist_image": np.zeros((4, 4, 3), np.uint8),
    "observation/state": np.zeros(8),
    "prompt": "pick up the bowl",
}
ARRAY = np.arange(3.0)
KNOCKOUT = {"op": "attention_knockout", "key": {"expert": 0, "segment": "prompt"}}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"latent_spec": {"pooling": ARRAY}}, "latent_spec.pooling"),
        ({"latent_spec": {"dtype": ARRAY}}, "latent_spec.dtype"),
        ({"latent_spec": {"attention": ARRAY}}, "latent_spec.attention"),
        ({"interventions": [{"op": ARRAY}]}, "interventions[0].op"),
        ({"interventions": [{"op": "ablate", "site": {"expert": 0, "point": ARRAY}}]},
         "interventions[0].site.point"),
        ({"interventions": [{**KNOCKOUT, "query": {"expert": ARRAY, "segment": "prompt"}}]},
         "interventions[0].query"),
        ({"latent_spec": "default", "readouts": {"action_lens": ARRAY}}, "readouts.action_lens"),
    ],
    ids=["pooling", "dtype", "attention", "op", "point", "knockout expert", "action_lens"],
)  # fmt: skip
def test_an_array_where_a_name_belongs_is_named_not_an_internal_error(
    changes: dict[str, Any], field: str
) -> None:
    """Was: `array in ("none", "mean")` compares elementwise and raised numpy's ValueError ("truth
    value of an array ... is ambiguous"), which the server answers as an internal error."""
    with pytest.raises(ValidationError) as error:
        PolicyRequest.from_wire(over_the_wire({**BASE, **changes}))
    assert error.value.field == field
    assert "float64" in str(error.value) and "(3,)" in str(error.value)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"interventions": [{**KNOCKOUT, "query": {"expert": True, "segment": "prompt"}}]},
         "interventions[0].query"),
        ({"interventions": [{"op": "add", "site": {"expert": 0}, "vector": np.ones(16, np.float32),
                             "scale": 1e39}]}, "interventions[0].scale"),
        ({"noise": np.full((5, 4), 1e39)}, "noise"),
        ({"observation/state": np.full(8, -1e39)}, "observation/state"),
    ],
    ids=["knockout expert true", "scale over float32", "float64 noise over float32",
         "float64 state over float32"],
)  # fmt: skip
def test_values_that_would_reach_the_model_as_garbage_are_refused(
    changes: dict[str, Any], field: str
) -> None:
    """Was accepted: a bool expert (True == 1), a scale, float64 noise or state that float32 (what
    the model computes in) turns into infinity."""
    with pytest.raises(ValidationError) as error:
        PolicyRequest.from_wire(over_the_wire({**BASE, **changes}))
    assert error.value.field == field


class CountingRepr:
    calls = 0

    def __repr__(self) -> str:
        CountingRepr.calls += 1
        return "counted"


def test_describing_a_huge_received_value_reprs_only_what_is_shown() -> None:
    """Was: repr(value) in full, then cut to 80 characters."""
    CountingRepr.calls = 0
    text = describe([CountingRepr() for _ in range(100_000)])
    assert text.endswith("... (list)") and len(text) < 100
    assert CountingRepr.calls < 20


def test_a_refused_prompt_of_many_arrays_costs_less_memory_than_its_frame() -> None:
    """Was: numpy's repr of every array (seconds of CPU on the event loop for a 16 MB frame, and
    a string several times the frame's size), for an error text cut to 80 characters."""
    prompt = [np.linspace(0, 1, 1000) for _ in range(200)]
    frame = packb({**BASE, "prompt": prompt})
    wire = unpackb(frame)  # arrays are views into the frame: no copy
    with peak_memory() as peak, pytest.raises(ValidationError, match=r"^prompt: expected"):
        PolicyRequest.from_wire(wire)
    assert peak() < len(frame) // 10, f"{peak()} bytes for a {len(frame)}-byte frame"

"""Interventions on the wire (protocol/interventions.py): round trips through the codec, resolution
against a model's dimensions (pi0's real sizes), the structure that keys the compiled functions, and
validation that names the field of every bad entry."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest
from conftest import PI0_LAYOUT, PI05_LAYOUT

from latentpi.protocol.codec import packb, unpackb
from latentpi.protocol.errors import ValidationError
from latentpi.protocol.interventions import (
    MAX_INTERVENTION_ELEMENTS,
    MAX_INTERVENTIONS,
    Intervention,
    ModelDims,
    Site,
    interventions_from_wire,
)
from latentpi.protocol.messages import PolicyRequest, PolicyResponse

PI0 = ModelDims(
    layout=PI0_LAYOUT, depth=18, num_steps=10, width=(2048, 1024), mlp_dim=(16384, 4096)
)
PI05 = ModelDims(
    layout=PI05_LAYOUT, depth=18, num_steps=10, width=(2048, 1024), mlp_dim=(16384, 4096)
)
RNG = np.random.default_rng(0)


def vector(width: int, dtype: Any = np.float32) -> np.ndarray:
    return RNG.normal(size=width).astype(dtype)


def base_request(**extra: Any) -> dict[str, Any]:
    image = np.zeros((8, 8, 3), np.uint8)
    return {
        "observation/image": image,
        "observation/wrist_image": image,
        "observation/state": np.zeros(8),
        "prompt": "pick up the bowl",
        **extra,
    }


def wire_round_trip(data: Any) -> Any:
    return unpackb(packb(data))


# -- round trips ------------------------------------------------------------------------------------
EVERY_OP = [
    {"op": "add", "site": {"expert": 0, "layers": [0, -1], "segment": "prompt"}, "scale": 2.5,
     "vector": vector(2048)},
    {"op": "set", "site": {"expert": 1, "point": "attn_out", "segment": "actions",
                           "positions": [3, 5], "steps": [0, 9]}, "value": vector(1024)},
    {"op": "ablate", "site": {"expert": 0, "point": "mlp_hidden", "layers": [4]},
     "mean": vector(16384)},
    {"op": "ablate", "site": {"expert": 1}},
    {"op": "scale_units", "site": {"expert": 0, "point": "mlp_hidden", "layers": [2]},
     "units": [7, 11, 4095], "factors": np.array([0.0, 2.0, -1.0], np.float32)},
    {"op": "attention_knockout", "query": {"expert": 1, "segment": "actions"},
     "key": {"expert": 0, "segment": "prompt"}, "layers": [0, 1], "steps": [3]},
]  # fmt: skip


@pytest.mark.parametrize("data", EVERY_OP, ids=lambda d: d["op"])
def test_every_op_round_trips_through_the_codec(data: dict[str, Any]) -> None:
    intervention = Intervention.from_wire(data)
    back = Intervention.from_wire(wire_round_trip(intervention.to_wire()))
    assert back.structure() == intervention.structure()
    assert back.to_wire(arrays=False) == intervention.to_wire(arrays=False)
    for name, array in intervention.values().items():
        np.testing.assert_array_equal(back.values()[name], array)
        assert back.values()[name].dtype == np.float32
    resolved = back.resolve(PI0)
    assert resolved.structure() == intervention.resolve(PI0).structure()


def test_patch_is_set_and_bfloat16_and_float64_arrays_become_float32_exactly() -> None:
    values = vector(2048, ml_dtypes.bfloat16)
    patch = Intervention.from_wire(
        wire_round_trip({"op": "patch", "site": {"expert": 0}, "value": values})
    )
    assert patch.op == "set" and patch.to_wire()["op"] == "set"
    assert patch.value is not None and patch.value.dtype == np.float32
    np.testing.assert_array_equal(patch.value, values.astype(np.float32))
    wide = Intervention(op="add", site=Site(expert=1), vector=vector(1024, np.float64))
    assert wide.vector is not None and wide.vector.dtype == np.float32


def test_request_round_trip_keeps_interventions_and_a_plain_request_has_none() -> None:
    data = base_request(interventions=[EVERY_OP[0], EVERY_OP[-1]], noise_seed=3)
    request = PolicyRequest.from_wire(wire_round_trip(data))
    assert [i.op for i in request.interventions] == ["add", "attention_knockout"]
    again = PolicyRequest.from_wire(wire_round_trip(request.to_wire()))
    assert [i.to_wire(arrays=False) for i in again.interventions] == [
        i.to_wire(arrays=False) for i in request.interventions
    ]
    np.testing.assert_array_equal(again.interventions[0].vector, EVERY_OP[0]["vector"])
    plain = PolicyRequest.from_wire(base_request())
    assert plain.interventions == () and "interventions" not in plain.to_wire()
    assert PolicyRequest.from_wire(base_request(interventions=None)).interventions == ()


def test_response_round_trip_keeps_the_records() -> None:
    record = Intervention.from_wire(EVERY_OP[0]).resolve(PI0).to_wire(arrays=False)
    response = PolicyResponse(actions=np.zeros((50, 7)), interventions=(record,))
    back = PolicyResponse.from_wire(wire_round_trip(response.to_wire()))
    assert [dict(r) for r in back.interventions] == [record]
    assert "interventions" not in PolicyResponse(actions=np.zeros((50, 7))).to_wire()
    with pytest.raises(ValidationError, match="interventions: expected a list of maps"):
        PolicyResponse.from_wire({"actions": np.zeros((50, 7)), "interventions": ["add"]})


# -- resolution and structure -------------------------------------------------------------------------
def test_resolve_makes_every_field_explicit_and_absolute() -> None:
    add = Intervention.from_wire(
        {"op": "add", "site": {"expert": 0, "layers": [-1, 0, 17], "segment": "prompt",
                               "positions": [2, 5]}, "vector": vector(2048)}
    ).resolve(PI0)  # fmt: skip
    # Layers in the listed order (a per-layer array follows it), negatives resolved, repeats dropped.
    assert add.site == Site(expert=0, point="residual", layers=(17, 0), segment="prompt",
                            positions=(770, 773), steps=None)  # fmt: skip
    expert_1 = Intervention.from_wire(
        {"op": "ablate", "site": {"expert": 1, "steps": [-1]}}
    ).resolve(PI0)
    assert expert_1.site is not None
    assert expert_1.site.layers == tuple(range(18)) and expert_1.site.steps == (9,)
    assert expert_1.site.positions == (0, 51)
    assert Intervention.from_wire({"op": "ablate", "site": {"expert": 1}}).resolve(
        PI05
    ).site.positions == (0, 10)  # type: ignore[union-attr]
    knockout = Intervention.from_wire(EVERY_OP[-1] | {"layers": None, "steps": None}).resolve(PI0)
    assert knockout.layers == tuple(range(18)) and knockout.steps == tuple(range(10))


def test_the_record_has_the_resolved_site_shapes_and_scale_but_no_arrays() -> None:
    add = Intervention.from_wire(
        {"op": "add", "site": {"expert": 1, "segment": "actions", "layers": [3], "steps": [1]},
         "scale": -2.0, "vector": vector(1024)}
    ).resolve(PI0)  # fmt: skip
    assert add.to_wire(arrays=False) == {
        "op": "add",
        "site": {"expert": 1, "point": "residual", "layers": [3], "segment": "actions",
                 "positions": [1, 51], "steps": [1]},
        "scale": -2.0,
        "vector_shape": [1024],
    }  # fmt: skip
    units = Intervention.from_wire(EVERY_OP[4]).resolve(PI0).to_wire(arrays=False)
    assert units["factors_shape"] == [3] and units["units"] == [7, 11, 4095]
    assert not any(isinstance(v, np.ndarray) for v in units.values())


def test_structure_ignores_values_and_sees_shapes_layers_and_units() -> None:
    def add(vec: np.ndarray, scale: float = 1.0, layers: list[int] | None = None) -> Any:
        site = {"expert": 0, "segment": "prompt", "layers": layers or [1]}
        return Intervention.from_wire(
            {"op": "add", "site": site, "scale": scale, "vector": vec}
        ).resolve(PI0)

    first = add(vector(2048), 1.0)
    assert add(vector(2048), -7.5).structure() == first.structure()
    assert hash(add(vector(2048), 3.0).structure()) == hash(first.structure())
    assert add(vector(2048), layers=[2]).structure() != first.structure()
    assert add(np.ones((48, 2048), np.float32)).structure() != first.structure()
    assert add(vector(2048), layers=[1, -17]).structure() == first.structure()  # same layer
    assert first.values()["scale"].dtype == np.float32 and float(first.values()["scale"]) == 1.0
    assert set(first.values()) == {"vector", "scale"}


def test_sizes_are_bounded() -> None:
    entry = {"op": "add", "site": {"expert": 1}, "vector": vector(1024)}
    assert len(interventions_from_wire([entry] * MAX_INTERVENTIONS)) == MAX_INTERVENTIONS
    with pytest.raises(ValidationError, match=r"interventions: expected 1 to 16 entries"):
        interventions_from_wire([entry] * (MAX_INTERVENTIONS + 1))
    # each array under the limit, all of them together over it
    big = {"op": "set", "site": {"expert": 0}, "value": np.zeros((3, 816, 2048), np.float32)}
    assert big["value"].size * 4 > MAX_INTERVENTION_ELEMENTS > big["value"].size
    with pytest.raises(ValidationError, match=r"interventions: expected at most 16777216 array"):
        interventions_from_wire([big] * 4)
    with pytest.raises(ValidationError, match=r"interventions.value: expected a finite float"):
        Intervention.from_wire(
            {"op": "set", "site": {"expert": 0}, "value": np.zeros((2, 4096, 2049), np.float32)}
        )


# -- validation -------------------------------------------------------------------------------------
def _add(site: dict[str, Any], width: int = 2048, **extra: Any) -> dict[str, Any]:
    return {"op": "add", "site": site, "vector": vector(width), **extra}


def _knockout(query: tuple[int, str], key: tuple[int, str], **extra: Any) -> dict[str, Any]:
    return {
        "op": "attention_knockout",
        "query": {"expert": query[0], "segment": query[1]},
        "key": {"expert": key[0], "segment": key[1]},
        **extra,
    }


# (wire entry, fragment of the message: the field, with the entry's index, and what was expected)
BAD_ENTRIES: list[tuple[str, Any, str]] = [
    ("not a map", "add", "interventions[0]: expected a list of maps with op"),
    ("unknown op", _add({"expert": 0}) | {"op": "steer"}, "interventions[0].op: expected one of add"),
    ("missing op", {"site": {"expert": 0}}, "interventions[0].op: expected present"),
    ("unknown key", _add({"expert": 0}) | {"vectr": 1}, "interventions[0].vectr: expected one of"),
    ("unknown site key", _add({"expert": 0, "layer": [1]}), "interventions[0].site.layer: expected"),
    ("site missing expert", _add({"layers": [1]}), "interventions[0].site.expert: expected present"),
    ("expert 2", _add({"expert": 2}), "interventions[0].site.expert: expected 0 or 1"),
    ("expert True", _add({"expert": True}), "interventions[0].site.expert: expected 0 or 1"),
    ("unknown point", _add({"expert": 0, "point": "mlp"}), "interventions[0].site.point: expected one of residual"),
    ("layers not ints", _add({"expert": 0, "layers": [1.5]}), "interventions[0].site.layers: expected null or a"),
    ("empty layers", _add({"expert": 0, "layers": []}), "interventions[0].site.layers: expected null or a non-empty"),
    ("steps for expert 0", _add({"expert": 0, "steps": [1]}), "interventions[0].site.steps: expected null for expert 0"),
    ("negative position", _add({"expert": 0, "positions": [-1, 3]}), "interventions[0].site.positions: expected"),
    ("three positions", _add({"expert": 0, "positions": [1, 2, 3]}), "interventions[0].site.positions: expected"),
    ("segment not a name", _add({"expert": 0, "segment": 3}), "interventions[0].site.segment: expected null or a"),
    ("add without vector", {"op": "add", "site": {"expert": 0}}, "interventions[0].vector: expected an array for op add"),
    ("set without value", {"op": "set", "site": {"expert": 0}}, "interventions[0].value: expected an array for op set"),
    ("no site", {"op": "ablate"}, "interventions[0].site: expected a site map"),
    ("NaN vector", _add({"expert": 0}) | {"vector": np.full(2048, np.nan, np.float32)}, "interventions[0].vector: expected a finite float array"),
    ("inf value", {"op": "set", "site": {"expert": 0}, "value": np.full(2048, np.inf)}, "interventions[0].value: expected a finite float array"),
    ("int vector", _add({"expert": 0}) | {"vector": np.ones(2048, np.int64)}, "interventions[0].vector: expected a finite float array"),
    ("float16 vector", _add({"expert": 0}) | {"vector": np.ones(2048, np.float16)}, "interventions[0].vector: expected a finite float array"),
    ("list vector", _add({"expert": 0}) | {"vector": [1.0] * 2048}, "interventions[0].vector: expected a finite float array"),
    ("4-axis value", {"op": "set", "site": {"expert": 0}, "value": np.ones((1, 1, 1, 2048), np.float32)}, "interventions[0].value: expected a finite float array"),
    ("empty vector", _add({"expert": 0}) | {"vector": np.ones(0, np.float32)}, "interventions[0].vector: expected a finite float array"),
    ("scale a string", _add({"expert": 0}, scale="big"), "interventions[0].scale: expected a number"),
    ("scale a bool", _add({"expert": 0}, scale=True), "interventions[0].scale: expected a number"),
    ("scale NaN", _add({"expert": 0}, scale=float("nan")), "interventions[0].scale: expected a finite number"),
    ("scale_units without units", {"op": "scale_units", "site": {"expert": 0, "point": "mlp_hidden"}, "factors": np.ones(2, np.float32)}, "interventions[0].factors: expected one factor per unit"),
    ("scale_units without factors", {"op": "scale_units", "site": {"expert": 0, "point": "mlp_hidden"}, "units": [1, 2]}, "interventions[0].factors: expected an array for op scale_units"),
    ("factors not matching units", {"op": "scale_units", "site": {"expert": 0, "point": "mlp_hidden"}, "units": [1, 2], "factors": np.ones(3, np.float32)}, "interventions[0].factors: expected one factor per unit"),
    ("units not ints", {"op": "scale_units", "site": {"expert": 0}, "units": ["a"], "factors": np.ones(1, np.float32)}, "interventions[0].units: expected null or a non-empty list"),
    ("knockout prefix onto suffix", _knockout((0, "prompt"), (1, "actions")), "interventions[0].key: expected an expert-0 segment for expert-0 queries"),
    ("knockout without key", {"op": "attention_knockout", "query": {"expert": 1, "segment": "actions"}}, "interventions[0].key: expected {expert: 0 or 1, segment: name}"),
    ("knockout key not a map", _knockout((1, "actions"), (0, "prompt")) | {"key": "prompt"}, "interventions[0].key: expected {expert: 0 or 1, segment: name}"),
    ("knockout query expert 3", _knockout((3, "actions"), (0, "prompt")), "interventions[0].query: expected {expert: 0 or 1"),
    ("knockout layers not ints", _knockout((1, "actions"), (0, "prompt"), layers=["a"]), "interventions[0].layers: expected null or a non-empty list"),
]  # fmt: skip


@pytest.mark.parametrize(
    "entry, fragment", [c[1:] for c in BAD_ENTRIES], ids=[c[0] for c in BAD_ENTRIES]
)
def test_bad_entries_are_refused_naming_the_field(entry: Any, fragment: str) -> None:
    with pytest.raises(ValidationError) as error:
        interventions_from_wire(wire_round_trip([entry]))
    assert fragment in str(error.value), str(error.value)
    with pytest.raises(ValidationError) as from_request:
        PolicyRequest.from_wire(base_request(interventions=[entry]))
    assert str(from_request.value) == str(error.value)


def test_the_list_itself_is_checked() -> None:
    for bad, fragment in (
        ({"op": "add"}, "interventions: expected a list of intervention maps"),
        ([], "interventions: expected 1 to 16 entries"),
        ("add", "interventions: expected a list of intervention maps"),
    ):
        with pytest.raises(ValidationError, match=fragment.replace("(", r"\(")):
            PolicyRequest.from_wire(base_request(interventions=bad))
    with pytest.raises(ValidationError, match="interventions: expected a tuple of Intervention"):
        PolicyRequest(
            image=np.zeros((8, 8, 3), np.uint8),
            wrist_image=np.zeros((8, 8, 3), np.uint8),
            state=np.zeros(8),
            prompt="p",
            interventions=[Intervention.from_wire(EVERY_OP[3])],  # type: ignore[arg-type]
        )


# (entry, fragment): valid on their own, refused against pi0's dimensions, with the entry's index
BAD_FOR_THE_MODEL: list[tuple[str, Any, str]] = [
    ("wrong width", _add({"expert": 0}, width=1024), "interventions[1].vector: expected shape (2048,) or (816, 2048) or (18, 816, 2048) for this site"),
    ("expert-1 width for mlp", _add({"expert": 1, "point": "mlp_hidden"}, width=1024), "interventions[1].vector: expected shape (4096,)"),
    ("layer out of range", _add({"expert": 0, "layers": [18]}), "interventions[1].site.layers: expected indices in [-18, 17]"),
    ("negative layer out of range", _add({"expert": 0, "layers": [-19]}), "interventions[1].site.layers: expected indices in [-18, 17]"),
    ("step out of range", _add({"expert": 1, "steps": [10]}, width=1024), "interventions[1].site.steps: expected indices in [-10, 9]"),
    ("unknown segment", _add({"expert": 0, "segment": "nose"}), "interventions[1].site.segment: expected a segment of expert 0 among base_0_rgb"),
    ("expert-0 segment for expert 1", _add({"expert": 1, "segment": "prompt"}, width=1024), "interventions[1].site.segment: expected a segment of expert 1 among state, actions"),
    ("positions past the segment", _add({"expert": 0, "segment": "prompt", "positions": [40, 49]}), "interventions[1].site.positions: expected [start, stop] with start < stop <= 48"),
    ("empty positions", _add({"expert": 0, "segment": "prompt", "positions": [5, 5]}), "interventions[1].site.positions: expected [start, stop] with start < stop"),
    ("positions past the sequence", _add({"expert": 1, "positions": [0, 52]}, width=1024), "interventions[1].site.positions: expected [start, stop] with start < stop <= 51"),
    ("value for other layers", {"op": "set", "site": {"expert": 0, "segment": "prompt", "layers": [0, 1]}, "value": np.ones((3, 48, 2048), np.float32)}, "interventions[1].value: expected shape (2048,) or (48, 2048) or (2, 48, 2048)"),
    ("value for other positions", {"op": "set", "site": {"expert": 0, "segment": "prompt"}, "value": np.ones((47, 2048), np.float32)}, "interventions[1].value: expected shape"),
    ("mean per position", {"op": "ablate", "site": {"expert": 0, "segment": "prompt"}, "mean": np.ones((48, 2048), np.float32)}, "interventions[1].mean: expected shape (2048,) for this site"),
    ("unit out of range", {"op": "scale_units", "site": {"expert": 0, "point": "mlp_hidden"}, "units": [16384], "factors": np.ones(1, np.float32)}, "interventions[1].units: expected indices in [0, 16384)"),
    ("negative unit", {"op": "scale_units", "site": {"expert": 1, "point": "mlp_hidden"}, "units": [-1], "factors": np.ones(1, np.float32)}, "interventions[1].units: expected indices in [0, 4096)"),
    ("knockout unknown query segment", _knockout((1, "nose"), (0, "prompt")), "interventions[1].query.segment: expected a segment of expert 1 among state, actions"),
    ("knockout unknown key segment", _knockout((1, "actions"), (0, "wrist")), "interventions[1].key.segment: expected a segment of expert 0 among base_0_rgb"),
    ("knockout layer out of range", _knockout((1, "actions"), (0, "prompt"), layers=[18]), "interventions[1].layers: expected indices in [-18, 17]"),
    ("knockout step out of range", _knockout((1, "actions"), (0, "prompt"), steps=[10]), "interventions[1].steps: expected indices in [-10, 9]"),
]  # fmt: skip


@pytest.mark.parametrize(
    "entry, fragment", [c[1:] for c in BAD_FOR_THE_MODEL], ids=[c[0] for c in BAD_FOR_THE_MODEL]
)
def test_entries_are_checked_against_the_model(entry: Any, fragment: str) -> None:
    good = _add({"expert": 1}, width=1024)
    entries = interventions_from_wire(wire_round_trip([good, entry]))
    entries[0].resolve(PI0, 0)
    with pytest.raises(ValidationError) as error:
        entries[1].resolve(PI0, 1)
    assert fragment in str(error.value), str(error.value)


def test_pi05_has_no_state_segment() -> None:
    entry = Intervention.from_wire(_add({"expert": 1, "segment": "state"}, width=1024))
    with pytest.raises(
        ValidationError, match=r"site.segment: expected a segment of expert 1 among actions"
    ):
        entry.resolve(PI05)
    assert entry.resolve(PI0).site.positions == (0, 1)  # type: ignore[union-attr]


# -- malformed sites and knockouts: named errors --------------------------------------------------
def test_a_float_expert_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"site\.expert"):
        Intervention.from_wire(_add({"expert": 1.0}, width=1024)).resolve(PI0)


def test_positions_not_a_list_are_refused() -> None:
    with pytest.raises(ValidationError, match=r"site\.positions"):
        Intervention.from_wire(_add({"expert": 0, "positions": 3}))


def test_knockout_steps_for_prefix_queries_are_refused() -> None:
    with pytest.raises(ValidationError, match="steps"):
        Intervention.from_wire(_knockout((0, "base_0_rgb"), (0, "prompt"), steps=[1])).resolve(PI0)

"""LatentSpec, presets and TokenLayout (the shared contract) and the latent layouts derived from them."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
from conftest import PI0_LAYOUT, pi0_metadata, pi05_metadata

from latentpi.protocol.codec import packb, unpackb
from latentpi.protocol.errors import ValidationError
from latentpi.protocol.latent_layout import latent_bytes, latent_layouts
from latentpi.protocol.latent_spec import DEFAULT_PRESET, PRESETS, LatentSpec, TokenLayout, preset


def test_presets_round_trip_through_the_wire() -> None:
    for name, spec in PRESETS.items():
        assert LatentSpec.from_wire(name) is spec
        assert LatentSpec.from_wire(unpackb(packb(spec.to_wire()))) == spec
    assert DEFAULT_PRESET in PRESETS


def test_from_wire_overrides_a_preset_and_defaults_missing_keys() -> None:
    spec = LatentSpec.from_wire({"preset": "pooled", "layers": [0, -1], "pooling": "last"})
    assert spec == dataclasses.replace(PRESETS["pooled"], layers=(0, -1), pooling="last")
    assert LatentSpec.from_wire({}) == LatentSpec()


def test_specs_are_hashable_and_equal_specs_hash_equal() -> None:
    a = LatentSpec.from_wire({"layers": [1, 2], "segments_0": ["prompt"]})
    b = LatentSpec(layers=(1, 2), segments_0=("prompt",))
    assert a == b and hash(a) == hash(b) and len({a, b, PRESETS["full"]}) == 2


def test_resolve_canonicalises_so_equal_captures_hash_equal() -> None:
    negative = LatentSpec(layers=(-1, 0, 18), steps=(-1,)).resolve(PI0_LAYOUT, 18, 10)
    assert negative.layers == (18, 0) and negative.steps == (9,)
    assert negative.segments_0 == PI0_LAYOUT.names(0) and negative.segments_1 == PI0_LAYOUT.names(1)
    assert LatentSpec(layers=(18, 0), steps=(9,)).resolve(PI0_LAYOUT, 18, 10) == negative
    assert hash(negative.resolve(PI0_LAYOUT, 18, 10)) == hash(negative)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (LatentSpec(layers=(19,)), "latent_spec.layers"),
        (LatentSpec(layers=(-20,)), "latent_spec.layers"),
        (LatentSpec(steps=(10,)), "latent_spec.steps"),
        (LatentSpec(segments_0=("wrist",)), "latent_spec.segments_0"),
        (LatentSpec(segments_1=("prompt",)), "latent_spec.segments_1"),
    ],
)
def test_resolve_errors_name_the_field(spec: LatentSpec, field: str) -> None:
    with pytest.raises(ValidationError, match=f"^{re.escape(field)}: expected"):
        spec.resolve(PI0_LAYOUT, 18, 10)


def test_text_only_needs_a_prompt_segment() -> None:
    layout = TokenLayout(expert_0=(("image", 0, 256),), expert_1=(("actions", 0, 10),))
    with pytest.raises(ValidationError, match=r"latent_spec\.text_only"):
        LatentSpec().resolve(layout, 18, 10)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ("nope", "latent_spec"),
        ([1], "latent_spec"),
        ({"preset": "nope"}, "latent_spec"),
        ({"bogus": 1}, "latent_spec.bogus"),
        ({"pooling": "max"}, "latent_spec.pooling"),
        ({"attention": "all"}, "latent_spec.attention"),
        ({"dtype": "float64"}, "latent_spec.dtype"),
        ({"expert_0": 1}, "latent_spec.expert_0"),
        ({"layers": [1.5]}, "latent_spec.layers"),
        ({"layers": [True]}, "latent_spec.layers"),
        ({"steps": []}, "latent_spec.steps"),
        ({"segments_0": [3]}, "latent_spec.segments_0"),
        ({"expert_0": False, "expert_1": False, "text_only": False}, "latent_spec"),
    ],
)
def test_from_wire_errors_name_the_field(data: Any, field: str) -> None:
    with pytest.raises(ValidationError, match=f"^{re.escape(field)}: expected"):
        LatentSpec.from_wire(data)


def test_token_layout_round_trips_and_answers_spans() -> None:
    assert TokenLayout.from_wire(unpackb(packb(PI0_LAYOUT.to_wire()))) == PI0_LAYOUT
    assert (
        PI0_LAYOUT.span(0, "prompt") == (768, 816)
        and PI0_LAYOUT.length(0) == 816
        and PI0_LAYOUT.length(1) == 51
    )
    with pytest.raises(KeyError):
        PI0_LAYOUT.span(1, "prompt")


# -- layouts and bytes per call (the numbers docs/protocol.md quotes) -----------------------------

PI0_BYTES = {
    "full": 174_170_160,
    "text": 7_471_152,
    "pooled": 2_179_072,
    "default": 5_720_112,
    "attention": 9_792,
}
PI05_BYTES = {
    "full": 189_579_464,
    "text": 31_129_800,
    "pooled": 1_400_832,
    "default": 15_954_120,
    "attention": 4_752,
}


@pytest.mark.parametrize(
    ("metadata", "expected"), [(pi0_metadata(), PI0_BYTES), (pi05_metadata(), PI05_BYTES)]
)
def test_bytes_per_call_of_each_preset(metadata: Any, expected: dict[str, int]) -> None:
    assert {
        name: latent_bytes(latent_layouts(spec, metadata.shape)) for name, spec in PRESETS.items()
    } == expected


def test_pi0_full_layout_matches_the_model() -> None:
    layouts = latent_layouts(preset("full"), pi0_metadata().shape)
    assert layouts["expert_0_hidden_states"].shape == (19, 816, 2048)
    assert layouts["expert_0_hidden_states"].labels["segments"][-1] == ["prompt", 768, 816]
    assert layouts["expert_1_hidden_states"].shape == (10, 19, 51, 1024)
    assert layouts["text_only_hidden_states"].shape == (19, 48, 2048)
    assert layouts["prompt_mask"].shape == (48,) and layouts["prompt_mask"].dtype == "bool"


def test_selected_segments_are_concatenated_in_request_order() -> None:
    spec = LatentSpec(segments_0=("prompt", "base_0_rgb"), expert_1=False, text_only=False)
    entry = latent_layouts(spec, pi0_metadata().shape)["expert_0_hidden_states"]
    assert entry.shape == (19, 304, 2048)
    assert entry.labels["segments"] == [["prompt", 0, 48], ["base_0_rgb", 48, 304]]


def test_attention_layouts_have_one_layer_per_attention_block() -> None:
    spec = LatentSpec(
        expert_0=False,
        expert_1=False,
        text_only=False,
        attention="per_head",
        layers=(0, 18),
        steps=(0, -1),
    )
    layouts = latent_layouts(spec, pi05_metadata().shape)
    e0, e1 = layouts["attention_mass_expert_0"], layouts["attention_mass_expert_1"]
    assert e0.axes == ("layer", "head", "query_segment", "key_segment") and e0.shape == (1, 8, 4, 4)
    assert (
        e1.shape == (2, 1, 8, 1, 5)
        and e1.labels["key_segments"][-1] == "actions"
        and e1.labels["steps"] == [0, 9]
    )

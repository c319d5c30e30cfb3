"""Every call of the "Seed usage" section of docs/analysis.md runs verbatim on a real task file."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from latentpi.client.rollout import EpisodeResult, Sample
from latentpi.client.storage import TaskHeader, TaskWriter, task_path
from latentpi.protocol.latent_layout import latent_layouts
from latentpi.protocol.latent_spec import LatentSpec
from latentpi.protocol.messages import ServerMetadata

from test_analysis_api import LAYOUT  # isort: skip

DOC = Path(__file__).parents[2] / "docs" / "analysis.md"
# deep enough for the seed's layer_idx=5 (entries 0..6)
METADATA = ServerMetadata(
    model="pi0_tiny", token_layout=LAYOUT, depth=(6, 6), width=(16, 8), num_heads=2,
    action_horizon=3, action_dim=7, num_steps=3,
)  # fmt: skip
SPEC = LatentSpec(attention="per_head")


def seed_usage_code() -> str:
    section = DOC.read_text().split("## Seed usage", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "docs/analysis.md: the Seed usage section has no python block"
    return "\n".join(blocks)


def random_latents(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random arrays of exactly the shapes the protocol's layouts give for SPEC."""
    out = {}
    for name, layout in latent_layouts(SPEC, METADATA.shape).items():
        if name == "prompt_mask":
            out[name] = np.arange(layout.shape[0]) < 4
        elif name.startswith("attention"):
            mass = rng.random(layout.shape)
            out[name] = (mass / mass.sum(axis=-1, keepdims=True)).astype(np.float32)
        else:
            out[name] = rng.normal(size=layout.shape).astype(np.float32)
    return out


def write_suite_task(
    root: Path, suite: str, task: int, episodes: int = 3, samples: int = 6
) -> Path:
    header = TaskHeader(
        suite=suite, task_id=task, task_name=f"task_{task}", instruction=f"do thing {task}",
        bddl_file="/none.bddl", model_config="pi0_tiny", checkpoint="random", latent_spec=SPEC,
        server_metadata=METADATA.to_wire(),
    )  # fmt: skip
    layouts = latent_layouts(SPEC, METADATA.shape)
    path = task_path(root, suite, task, f"task_{task}")
    rng = np.random.default_rng(task)
    with TaskWriter(path, header) as writer:
        for e in range(episodes):
            with writer.episode(e, init_state_idx=e, seed=0) as out:
                for t in range(samples):
                    latents = random_latents(rng)
                    out.add(Sample(5 * t, np.zeros((3, 7)), rng.normal(size=8), latents, layouts))
                out.finish(EpisodeResult(e % 2 == 0, 5 * samples, samples, samples, 0.1, e))
    return path


def test_seed_usage_section_runs_verbatim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_suite_task(tmp_path / "runs", "libero_10", 10)
    write_suite_task(tmp_path / "runs", "libero_10", 3)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(seed_usage_code(), str(DOC), "exec"), namespace)
    separation, states = namespace["separation"], namespace["states"]
    assert (separation.rollout_step, separation.sample_index, separation.timestep) == (20, 4, 20)
    assert separation.layer == 5 and np.isfinite(separation.cka)
    assert states.dimensions == {"position": 14, "hidden": 16} and states.layer == 5
    assert "nearest sampled step" not in separation.note
    assert capsys.readouterr().out  # the block prints what it found


def test_task_id_lookup_needs_the_suite_only_when_ambiguous(tmp_path: Path) -> None:
    from latentpi.client.analysis import api
    from latentpi.protocol.errors import ValidationError

    write_suite_task(tmp_path, "libero_10", 10, episodes=1, samples=2)
    write_suite_task(tmp_path, "libero_goal", 10, episodes=1, samples=2)
    with pytest.raises(ValidationError) as info:
        api.load_inference_task_data(task_id=10, data_dir=tmp_path)
    assert info.value.field == "suite" and "libero_goal" in str(info.value)
    with api.load_inference_task_data(task_id=10, data_dir=tmp_path, suite="libero_goal") as data:
        assert data.attrs["suite"] == "libero_goal"
    with api.load_inference_task_data(task_id=10, data_dir=tmp_path / "libero_10") as data:
        assert data.task_id == 10
    with pytest.raises(ValidationError) as info:
        api.load_inference_task_data(task_id=4, data_dir=tmp_path)
    assert info.value.field == "task_id"

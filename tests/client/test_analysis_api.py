"""The seed's analysis API on real task files (written by the real TaskWriter) with planted effects."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from latentpi.client.analysis import api, cohort, metrics, probes
from latentpi.client.rollout import EpisodeResult, Sample
from latentpi.client.storage import TaskHeader, TaskWriter, task_path
from latentpi.protocol.errors import ValidationError
from latentpi.protocol.latent_layout import latent_layouts
from latentpi.protocol.latent_spec import LatentSpec, TokenLayout
from latentpi.protocol.messages import ServerMetadata

LAYOUT = TokenLayout(
    expert_0=(("base_0_rgb", 0, 4), ("left_wrist_0_rgb", 4, 8), ("prompt", 8, 14)),
    expert_1=(("state", 0, 1), ("actions", 1, 4)),
)
METADATA = ServerMetadata(
    model="pi0_tiny", token_layout=LAYOUT, depth=(3, 3), width=(16, 8), num_heads=2,
    action_horizon=3, action_dim=7, num_steps=3,
)  # fmt: skip
FULL = LatentSpec(attention="per_head")
VALID = 4  # prompt positions 4 and 5 are padding; position 0 is BOS
DRIFT = np.array([0.0, 0.1, 0.2, 0.3])  # per residual entry; entry 0 (embeddings) never moves


@dataclasses.dataclass(frozen=True)
class Planted:
    """What one synthetic episode holds: prompt states drifting at DRIFT per sample, an action
    expert reading the prompt mean through a fixed map, attention to the prompt declining."""

    task: int
    episode: int
    samples: int
    success: bool

    def rng(self, *salt: int) -> np.random.Generator:
        return np.random.default_rng([self.task, self.episode, *salt])

    def prompt(self, t: int) -> np.ndarray:
        """(L, 6, 16): the task's tokens, moved along a task-fixed direction; junk padding."""
        task = np.random.default_rng([99, self.task])
        base, direction = task.normal(size=(4, 6, 16)), task.normal(size=(4, 1, 16))
        states = (
            base + (t * DRIFT + 0.05 * self.rng(t, 1).normal(size=4))[:, None, None] * direction
        )
        states[0] = base[0]
        states[2, :VALID] += 1.5 * self.success  # success is readable at entry 2
        states[:, VALID:] = self.rng(t, 2).normal(scale=50.0, size=(4, 6 - VALID, 16))
        # BOS: a huge-norm state that changes every sample (Gemma's BOS), never part of the drift
        states[1:, 0] = self.rng(t, 5).normal(scale=40.0, size=(3, 16))
        return states

    def state(self, t: int) -> np.ndarray:
        """(8,) the robot state sent: the eef position is the action expert's last-entry mean
        read through a fixed map; the gripper closes over time."""
        action_mean = self.latents(t)["expert_1_hidden_states"][-1, 3, 1:].mean(axis=0)
        eef = action_mean @ np.random.default_rng(11).normal(size=(8, 3))
        return np.r_[eef, np.zeros(3), 0.04 - 0.002 * t, -0.04 + 0.002 * t]

    def latents(self, t: int) -> dict[str, np.ndarray]:
        prompt = self.prompt(t)
        expert_0 = self.rng(t, 3).normal(size=(4, 14, 16))
        expert_0[:, 8:] = prompt
        read = np.random.default_rng(7).normal(size=(16, 8))
        action_mean = prompt[:, 1:VALID].mean(axis=1) @ read  # (L, 8)
        steps = np.arange(3)[:, None, None, None]
        expert_1 = action_mean[None, :, None] + (2 - steps) * self.rng(t, 4).normal(
            size=(3, 4, 4, 8)
        )
        expert_1[:, :, 1:] -= (
            expert_1[:, :, 1:].mean(axis=2, keepdims=True) - action_mean[None, :, None]
        )
        share = 0.8 - 0.1 * t
        mass_1 = np.full((3, 3, 2, 2, 5), 0.1)  # (step, layer, head, query, key)
        mass_1[..., 1, :] = (1 - share) / 4
        mass_1[..., 1, 2] = share  # actions -> prompt
        return {
            "expert_0_hidden_states": expert_0.astype(np.float32),
            "expert_1_hidden_states": expert_1.astype(np.float32),
            "text_only_hidden_states": prompt.astype(np.float32),
            "prompt_mask": np.arange(6) < VALID,
            "attention_mass_expert_0": np.full(
                (3, 2, 3, 3), 1 / 3, np.float32
            ),  # (layer, head, q, k)
            "attention_mass_expert_1": mass_1.astype(np.float32),
        }


def write_task(root: Path, task: int, episodes: list[Planted], spec: LatentSpec = FULL) -> Path:
    header = TaskHeader(
        suite="libero_object", task_id=task, task_name=f"task_{task}", instruction=f"do thing {task}",
        bddl_file="/none.bddl", model_config="pi0_tiny", checkpoint="random",
        latent_spec=spec, server_metadata=METADATA.to_wire(),
    )  # fmt: skip
    layouts = latent_layouts(spec, METADATA.shape)
    path = task_path(root, "libero_object", task, f"task_{task}")
    with TaskWriter(path, header) as writer:
        for planted in episodes:
            with writer.episode(planted.episode, init_state_idx=planted.episode, seed=0) as out:
                for t in range(planted.samples):
                    latents = on_device(planted.latents(t), spec)
                    state = planted.state(t)
                    out.add(Sample(5 * t, np.zeros((3, 7)), state, latents, layouts))
                n = planted.samples
                out.finish(EpisodeResult(planted.success, 5 * n, n, n, 0.1, planted.episode))
    return path


def on_device(full: dict[str, np.ndarray], spec: LatentSpec) -> dict[str, np.ndarray]:
    """What the device returns for `spec`: its layers, mean pooling over each segment's valid
    positions, its dtype, its attention read-out."""
    layers = list(spec.layers) if spec.layers is not None else list(range(4))
    mask = full["prompt_mask"]
    e0 = full["expert_0_hidden_states"][layers]  # (L, 14, 16)
    e1 = full["expert_1_hidden_states"][:, layers]  # (T, L, 4, 8)
    text = full["text_only_hidden_states"][layers]  # (L, 6, 16)
    if spec.pooling == "mean":
        e0 = np.stack([e0[:, 0:4].mean(1), e0[:, 4:8].mean(1), e0[:, 8:][:, mask].mean(1)], axis=1)
        e1 = np.stack([e1[:, :, 0], e1[:, :, 1:].mean(2)], axis=2)
        text = text[:, mask].mean(1)
    cast = ml_dtypes.bfloat16 if spec.dtype == "bfloat16" else np.float32
    out = {
        "expert_0_hidden_states": e0.astype(cast),
        "expert_1_hidden_states": e1.astype(cast),
        "text_only_hidden_states": text.astype(cast),
        "prompt_mask": mask,
    }
    if spec.attention != "none":
        attention_layers = [layer for layer in layers if layer < 3]
        mass_0 = full["attention_mass_expert_0"][attention_layers]
        mass_1 = full["attention_mass_expert_1"][:, attention_layers]
        if spec.attention == "head_mean":
            mass_0, mass_1 = mass_0.mean(axis=1), mass_1.mean(axis=2)
        out |= {"attention_mass_expert_0": mass_0, "attention_mass_expert_1": mass_1}
    return out


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> api.TaskData:
    root = tmp_path_factory.mktemp("runs")
    path = write_task(root, 0, [Planted(0, 0, 6, True), Planted(0, 1, 3, False)])
    with api.load_inference_task_data(path) as data:
        yield data


def test_language_loss_trajectory_matches_planted_drift(task: api.TaskData) -> None:
    loss = api.get_language_loss_trajectory(task, episode_idx=0)
    assert loss.layers == [0, 1, 2, 3]
    np.testing.assert_array_equal(loss.timesteps, [0, 5, 10, 15, 20, 25])
    assert loss.cosine_distance.shape == (6, 4)
    np.testing.assert_allclose(loss.cosine_distance[:, 0], 0, atol=1e-7)  # embeddings never move
    assert np.all(np.diff(loss.relative_l2[:, 3]) > 0)
    planted = Planted(0, 0, 6, True)
    states = np.stack([planted.prompt(t) for t in range(6)])
    mask = np.arange(6) < VALID
    expected = metrics.language_drift(states.astype(np.float32), metrics.without_bos(mask))
    np.testing.assert_allclose(loss.relative_l2, expected.relative_l2, atol=1e-6)
    with_bos = metrics.language_drift(states.astype(np.float32), mask)
    assert np.max(np.abs(with_bos.relative_l2[:, 1:] - loss.relative_l2[:, 1:])) > 0.3
    assert loss.bos_excluded and loss.note == ""
    one = api.get_language_loss_trajectory(task, 0, layer_idx=-1)
    np.testing.assert_array_equal(one.cosine_distance, loss.cosine_distance[:, 3])
    assert one.layers == [3]
    # the prompt segment of the full prefix gives the same numbers through the token layout
    via_prefix = api.get_language_loss_trajectory(task, 0, expert_type="expert_0")
    np.testing.assert_allclose(via_prefix.relative_l2, loss.relative_l2, atol=1e-12)


def test_centred_and_normalised_drift(task: api.TaskData) -> None:
    loss = api.get_language_loss_trajectory(task, 0)
    vectors = [api.sample_vectors(task, e.index)[0] for e in task.episodes]
    centre = np.concatenate(vectors).mean(axis=0)
    first, last = vectors[0][0] - centre, vectors[0][-1] - centre
    cos = (
        np.sum(first * last, axis=-1)
        / np.linalg.norm(first, axis=-1)
        / np.linalg.norm(last, axis=-1)
    )
    np.testing.assert_allclose(loss.centred_cosine_distance[-1, 1:], 1 - cos[1:], atol=1e-9)
    # the spread: RMS distance between the two episodes at samples 0..2 (the shorter one's length)
    gap = np.sqrt(np.mean(np.sum((vectors[0][:3] - vectors[1][:3]) ** 2, axis=-1), axis=0))
    moved = np.linalg.norm(vectors[0][-1] - vectors[0][0], axis=-1)
    np.testing.assert_allclose(loss.normalised_l2[-1, 1:], moved[1:] / gap[1:], rtol=1e-9)
    assert np.all(np.isnan(loss.normalised_l2[:, 0]))  # entry 0: identical in both, no spread


def test_rollout_step_is_an_env_step_nearest_sampled_query(task: api.TaskData) -> None:
    assert api.nearest_sample(task, 0, 20) == (4, 20)
    assert api.nearest_sample(task, 0, 22) == (4, 20)
    assert api.nearest_sample(task, 0, 500) == (5, 25)
    off = api.analyze_expert_separation(task, 0, rollout_step=22, layer_idx=2)
    assert (off.sample_index, off.timestep) == (4, 20) and "nearest sampled step 20" in off.note


def test_expert_separation_is_width_free_and_sees_the_shared_signal(task: api.TaskData) -> None:
    result = api.analyze_expert_separation(task, episode_idx=0, rollout_step=20, layer_idx=2)
    assert (result.layer, result.rollout_step, result.sample_index, result.timestep) == (
        2,
        20,
        4,
        20,
    )
    assert result.n_samples == 6 and result.note == ""
    assert result.cka_layers.shape == (4, 4)
    assert result.cka > 0.9  # expert 1's action mean is a linear image of the prompt mean
    assert result.rsa > 0.8
    loss = api.get_language_loss_trajectory(task, 0, layer_idx=2)
    assert result.drift_expert_0 == pytest.approx(loss.cosine_distance[4])
    assert result.drift_expert_1 > 0
    short = api.analyze_expert_separation(task, episode_idx=1, rollout_step=10, layer_idx=2)
    assert np.isnan(short.cka) and "needs at least 4" in short.note
    assert np.isfinite(short.drift_expert_0)


def test_hidden_states_for_dimensions_take_the_seed_arguments(task: api.TaskData) -> None:
    """(task_data, episode_idx, rollout_step, layer_idx, expert_type): one sample, one layer."""
    planted = Planted(0, 0, 6, True)
    got = api.get_hidden_states_for_dimensions(task, 0, 20, layer_idx=1, expert_type="text_only")
    np.testing.assert_allclose(got.states, planted.prompt(4)[1], atol=1e-5)
    assert got.axes == ("position", "hidden") and got.dimensions == {"position": 6, "hidden": 16}
    assert (got.sample_index, got.timestep, got.layer, got.step) == (4, 20, 1, None)
    e1 = api.get_hidden_states_for_dimensions(task, 0, 9, layer_idx=3, expert_type="expert_1")
    assert e1.dimensions == {"position": 4, "hidden": 8} and (e1.timestep, e1.step) == (10, 2)
    np.testing.assert_allclose(
        e1.states, planted.latents(2)["expert_1_hidden_states"][2, 3], atol=1e-5
    )
    assert [s[0] for s in e1.positions] == ["state", "actions"]


def test_hidden_units_trajectory_follows_the_prompt_mean(task: api.TaskData) -> None:
    got = api.get_hidden_units_trajectory(task, 0, [3, 0, 15], layer_idx=1)
    planted = Planted(0, 0, 6, True)
    mean = np.stack([planted.prompt(t)[1, 1:VALID].mean(axis=0) for t in range(6)])
    np.testing.assert_allclose(got, mean[:, [3, 0, 15]], atol=1e-5)
    with pytest.raises(ValidationError) as info:
        api.get_hidden_units_trajectory(task, 0, [16])
    assert info.value.field == "dimensions"


def test_attention_share_and_denoising_steps(task: api.TaskData) -> None:
    share, layers = api.get_attention_share(task, 0)
    assert layers == [0, 1, 2] and share.shape == (6, 3, 3)
    np.testing.assert_allclose(share[:, 0, 0], 0.8 - 0.1 * np.arange(6), atol=1e-6)
    heads, _ = api.get_attention_share(task, 0, per_head=True)
    assert heads.shape == (6, 3, 3, 2)
    np.testing.assert_allclose(heads.mean(axis=-1), share, atol=1e-6)
    steps = api.get_step_similarity(task, 0)
    assert steps.cosine_to_last.shape == (4, 3)
    np.testing.assert_allclose(steps.cosine_to_last[:, -1], 1, atol=1e-6)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda d: api.get_language_loss_trajectory(d, 7), "episode_idx"),
        (lambda d: api.get_language_loss_trajectory(d, 0, layer_idx=9), "layer_idx"),
        (lambda d: api.get_language_loss_trajectory(d, 0, expert_type="expert_2"), "expert_type"),
        (
            lambda d: api.analyze_expert_separation(d, 0, rollout_step=-6, layer_idx=1),
            "rollout_step",
        ),
        (lambda d: api.get_hidden_states_for_dimensions(d, 0, 20, layer_idx=7), "layer_idx"),
        (lambda d: api.get_attention_share(d, 0, keys=("image",)), "keys"),
    ],
)
def test_bad_requests_name_the_field(task: api.TaskData, call, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        call(task)
    assert info.value.field == field


def test_layer_subset_pooled_bfloat16_capture(tmp_path: Path) -> None:
    """A capture of entries (0, 3) only, mean-pooled on the device, in bfloat16."""
    spec = LatentSpec(layers=(0, 3), pooling="mean", dtype="bfloat16")
    planted = Planted(1, 0, 5, True)
    path = write_task(tmp_path, 1, [planted], spec)
    with api.load_inference_task_data(path) as data:
        loss = api.get_language_loss_trajectory(data, 0)
        assert loss.layers == [0, 3]
        states = np.stack([planted.prompt(t) for t in range(5)])[:, [0, 3]]
        expected = metrics.language_drift(states, np.arange(6) < VALID)
        np.testing.assert_allclose(loss.relative_l2, expected.relative_l2, atol=0.02)  # bf16
        assert not loss.bos_excluded and "BOS inside" in loss.note  # pooled on the device
        via_prefix = api.get_language_loss_trajectory(data, 0, expert_type="expert_0", layer_idx=3)
        np.testing.assert_allclose(via_prefix.relative_l2, loss.relative_l2[:, 1], atol=1e-12)
        assert api.get_language_loss_trajectory(data, 0, "expert_1").cosine_distance.shape == (5, 2)
        with pytest.raises(ValidationError) as info:
            api.get_language_loss_trajectory(data, 0, layer_idx=1)  # not recorded
        assert info.value.field == "layer_idx" and "[0, 3]" in str(info.value)


# -- across episodes and tasks ----------------------------------------------------------------


def test_cohort_probes_find_success_at_its_layer_and_the_task_where_not_given_away(
    tmp_path: Path,
) -> None:
    datas = []
    for task_id in range(2):
        episodes = [Planted(task_id, e, 4 + e % 3, e % 2 == 0) for e in range(8)]
        datas.append(api.load_inference_task_data(write_task(tmp_path, task_id, episodes)))
    try:
        features = cohort.episode_features(datas, samples=(0, 3))
        assert features.window == 4 and features.mean.shape == (16, 4, 16)
        assert features.drift.shape == (16, 4, 4)
        config = probes.ProbeConfig(n_splits=4, n_shuffles=200, n_bootstrap=50)
        success = cohort.success_by_layer(features, "mean", config)
        auroc = probes.scores(success)
        assert auroc[2] > 0.9 and success[2].p_value_family < 0.01 and success[2].ci[0] > 0.6
        assert set(success[2].within) == {"0", "1"}
        assert success[0].p_value > 0.05  # the embeddings cannot know the outcome
        # the prompt's own entry 0 holds the task trivially: the ceiling, not a finding
        prompt = cohort.task_by_layer(features, config)
        assert prompt[0][0].score == 1.0
        # the action expert reads the prompt: the task is there; the image tokens (random
        # here) do not carry it, so the probe can fail
        actions = cohort.episode_features(datas, "expert_1", samples=(0, 3))
        images = cohort.episode_features(datas, "expert_0", samples=(0, 3), segment="base_0_rgb")
        assert images.source == "expert_0:base_0_rgb"
        found = cohort.task_by_layer(actions, config)
        assert all(r.score > 0.9 and r.p_value_family < 0.01 for r in found[1][1:])
        absent = cohort.task_by_layer(images, config)
        assert all(r.p_value > 0.05 for row in absent for r in row)
        # continuous: the eef position is a linear read-out of the action expert's last entry
        eef = cohort.regression_by_layer(actions, "eef_position", config)
        assert eef[3].score > 0.8 and eef[3].p_value < 0.01
        with pytest.raises(ValidationError) as info:
            cohort.episode_features(datas, window=5)
        assert info.value.field == "window"
    finally:
        for data in datas:
            data.close()

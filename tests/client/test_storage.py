"""HDF5 task files: round trips (bfloat16 bit-exact), attributes, lazy reads, resume, consolidation."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from pathlib import Path

import h5py
import ml_dtypes
import numpy as np
import pytest

from latentpi.client.rollout import EpisodeResult, Sample
from latentpi.client.storage import (
    FORMAT_VERSION,
    TaskFile,
    TaskHeader,
    TaskWriter,
    completed_episodes,
    task_path,
)
from latentpi.protocol import ValidationError, preset
from latentpi.protocol.latent_layout import ArrayLayout

LAYERS, PROMPT, WIDTH = 5, 12, 64
LAYOUTS = {
    "text_only_hidden_states": ArrayLayout(
        ("layer", "position", "hidden"),
        (LAYERS, PROMPT, WIDTH),
        "bfloat16",
        {"layers": [0, 1, 2, 3, 4]},
    ),
    "expert_1_hidden_states": ArrayLayout(
        ("step", "layer", "position", "hidden"), (1, LAYERS, 3, WIDTH), "float32", {"steps": [9]}
    ),
    "prompt_mask": ArrayLayout(("position",), (PROMPT,), "bool"),
}


def header(**changes: object) -> TaskHeader:
    fields = dict(
        suite="libero_object",
        task_id=3,
        task_name="pick_up_the_milk",
        instruction="pick up the milk",
        bddl_file="/bddl/pick_up_the_milk.bddl",
        model_config="pi0_libero",
        checkpoint="gs://openpi-assets/checkpoints/pi0_libero",
        latent_spec=preset("default"),
        server_metadata={"token_layout": {"expert_0": {"prompt": [768, 816]}}},
        arguments={"stride": 5},
    )
    fields.update(changes)
    return TaskHeader(**fields)  # type: ignore[arg-type]


def make_sample(episode: int, index: int, images: bool = True) -> Sample:
    rng = np.random.default_rng(1000 * episode + index)
    latents = {
        "text_only_hidden_states": rng.normal(size=(LAYERS, PROMPT, WIDTH)).astype(
            ml_dtypes.bfloat16
        ),
        "expert_1_hidden_states": rng.normal(size=(1, LAYERS, 3, WIDTH)).astype(np.float32),
        "prompt_mask": np.arange(PROMPT) < 7 + index,
    }
    return Sample(
        timestep=5 * index,
        actions=rng.normal(size=(10, 7)),
        state=rng.normal(size=8),
        latents=latents,
        layouts=LAYOUTS,
        images={"image": rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)} if images else {},
    )


def write_episode(writer: TaskWriter, episode: int, samples: int = 3, success: bool = True) -> None:
    with writer.episode(episode, init_state_idx=episode + 10, seed=7, attrs={"stride": 5}) as out:
        for index in range(samples):
            out.add(make_sample(episode, index))
        out.finish(EpisodeResult(success, 5 * samples, samples, samples, 1.5, episode + 10))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return task_path(tmp_path, "libero_object", 3, "pick_up_the_milk")


def test_round_trip_arrays_bit_exact_and_attributes(path: Path) -> None:
    with TaskWriter(path, header()) as writer:
        write_episode(writer, 0, samples=3, success=True)
        write_episode(writer, 1, samples=2, success=False)

    with TaskFile(path) as task:
        assert task.attrs["format_version"] == FORMAT_VERSION
        assert task.attrs["suite"] == "libero_object" and task.attrs["task_id"] == 3
        assert task.attrs["instruction"] == "pick up the milk"
        assert task.attrs["checkpoint"].endswith("pi0_libero")
        assert task.attrs["server_metadata"]["token_layout"]["expert_0"]["prompt"] == [768, 816]
        assert task.attrs["arguments"] == {"stride": 5}
        assert "h5py" in task.attrs["versions"] and task.attrs["created"]
        assert task.latent_spec == preset("default")
        assert [e.index for e in task.episodes] == [0, 1]
        first, second = task.episodes
        assert (first.success, second.success) == (True, False)
        assert (first.total_steps, first.init_state_idx, first.num_samples) == (15, 10, 3)
        assert (
            first.attrs["seed"] == 7
            and first.attrs["stride"] == 5
            and first.attrs["duration_s"] == 1.5
        )
        assert set(first.names) == {
            "timesteps",
            "actions",
            "states",
            "images/image",
            "prompt_mask",
            "text_only_hidden_states",
            "expert_1_hidden_states",
        }
        np.testing.assert_array_equal(first["timesteps"][:], [0, 5, 10])
        for index in range(3):
            expected = make_sample(0, index)
            text = first["text_only_hidden_states"][index]
            assert text.dtype == ml_dtypes.bfloat16
            # bit-exact: compare the bit patterns, not the values
            np.testing.assert_array_equal(
                text.view(np.uint16), expected.latents["text_only_hidden_states"].view(np.uint16)
            )
            np.testing.assert_array_equal(
                first["expert_1_hidden_states"][index], expected.latents["expert_1_hidden_states"]
            )
            np.testing.assert_array_equal(
                first["prompt_mask"][index], expected.latents["prompt_mask"]
            )
            np.testing.assert_array_equal(first["actions"][index], expected.actions)
            np.testing.assert_array_equal(first["states"][index], expected.state)
            np.testing.assert_array_equal(first["images/image"][index], expected.images["image"])
        assert first["text_only_hidden_states"].axes == ("sample", "layer", "position", "hidden")
        assert first.axes("expert_1_hidden_states") == (
            "sample",
            "step",
            "layer",
            "position",
            "hidden",
        )
        assert first["actions"].axes == ("sample", "horizon", "action")
        assert first["prompt_mask"].dtype == np.bool_
        assert first["expert_1_hidden_states"].layout["steps"] == [9]
        assert first["text_only_hidden_states"].layout["shape"] == [LAYERS, PROMPT, WIDTH]
        assert np.asarray(second["text_only_hidden_states"]).shape == (2, LAYERS, PROMPT, WIDTH)


def test_datasets_are_chunked_per_sample_and_compressed(path: Path) -> None:
    with TaskWriter(path, header(), compression="gzip") as writer:
        write_episode(writer, 0)
    with h5py.File(path, "r") as f:
        dataset = f["episode_0000/text_only_hidden_states"]
        assert dataset.chunks[0] == 1 and dataset.compression == "gzip" and dataset.shuffle
        assert dataset.attrs["logical_dtype"] == "bfloat16"
        float_type = dataset.id.get_type()  # an HDF5 float: sign 15, exponent 7-14 (bias 127)
        assert isinstance(float_type, h5py.h5t.TypeFloatID) and float_type.get_size() == 2
        assert float_type.get_fields() == (15, 7, 8, 0, 7) and float_type.get_ebias() == 127
        # small per-sample datasets: many samples per chunk
        assert f["episode_0000/states"].chunks[0] > 100


def test_plain_h5py_reads_bfloat16_as_floats_bit_for_bit(path: Path) -> None:
    values = (
        np.random.default_rng(3).normal(size=(LAYERS, PROMPT, WIDTH)).astype(ml_dtypes.bfloat16)
    )
    values[0, 0, :6] = [np.inf, -np.inf, np.nan, -0.0, 1e-40, 3e38]  # specials and a subnormal
    sample = make_sample(0, 0)
    sample = Sample(sample.timestep, sample.actions, sample.state,
                    {**sample.latents, "text_only_hidden_states": values}, LAYOUTS)  # fmt: skip
    with TaskWriter(path, header()) as writer:
        with writer.episode(0, init_state_idx=0, seed=7) as out:
            out.add(sample)
            out.add(sample)
            out.finish(EpisodeResult(True, 5, 2, 2, 1.0, 0))
        writer.close(consolidate=True)
    bits = values.view(np.uint16)
    with h5py.File(path, "r") as f:
        plain = f["episode_0000/text_only_hidden_states"][()]  # no latentpi, no ml_dtypes
        assert plain.dtype == np.float32
        np.testing.assert_array_equal(plain[1].astype(ml_dtypes.bfloat16).view(np.uint16), bits)
    with TaskFile(path) as task:
        array = task.episodes[0]["text_only_hidden_states"]
        for key in ((), 1, (slice(None), 0), (Ellipsis, 3), (-1, slice(1, 4), 2), (slice(0, 0),)):
            expected = np.stack([bits, bits])[key]
            got = array[key]
            assert got.dtype == ml_dtypes.bfloat16, key
            np.testing.assert_array_equal(got.view(np.uint16), expected, err_msg=str(key))


def test_lazy_read_does_not_load_the_whole_array(path: Path) -> None:
    big = np.random.default_rng(0).normal(size=(19, 256, 1024)).astype(np.float32)  # 20 MB a sample
    with (
        TaskWriter(path, header(), compression="none") as writer,
        writer.episode(0, init_state_idx=0, seed=7) as out,
    ):
        for index in range(3):
            out.add(
                Sample(
                    index,
                    np.zeros((10, 7)),
                    np.zeros(8),
                    {"x": big + index},
                    {"x": ArrayLayout(("layer", "position", "hidden"), big.shape, "float32")},
                )
            )
        out.finish(EpisodeResult(False, 15, 3, 3, 1.0, 0))
    with TaskFile(path) as task:
        array = task.episodes[0]["x"]
        assert array.shape == (3, 19, 256, 1024)
        assert task._file["episode_0000/x"].chunks == (1, 1, 256, 1024)  # one layer per chunk
        tracemalloc.start()
        layer = array[2, -1]
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    np.testing.assert_array_equal(layer, big[-1] + 2)
    assert peak < 4 * layer.nbytes < big.nbytes


def test_resume_skips_completed_and_refuses_duplicates(path: Path) -> None:
    with TaskWriter(path, header()) as writer:
        write_episode(writer, 0)
        write_episode(writer, 2)
        created = TaskFile(path).attrs["created"]
    assert completed_episodes(path) == {0, 2}
    with TaskWriter(path, header(arguments={"stride": 5, "resumed": True})) as writer:
        assert writer.completed == {0, 2}
        with pytest.raises(ValidationError, match="episode_idx"):
            writer.episode(2, init_state_idx=0, seed=7)
        write_episode(writer, 1)
    with TaskFile(path) as task:
        assert [e.index for e in task.episodes] == [0, 1, 2]
        assert task.attrs["arguments"] == {"stride": 5, "resumed": True}
        assert task.attrs["created"] == created


@pytest.mark.parametrize(
    ("change", "attribute"),
    [
        ({"latent_spec": preset("pooled")}, "latent_spec"),
        ({"checkpoint": "gs://elsewhere"}, "checkpoint"),
        ({"model_config": "pi05_libero"}, "model_config"),
    ],
)
def test_resume_with_another_spec_or_model_is_refused(
    path: Path, change: dict, attribute: str
) -> None:
    with TaskWriter(path, header()) as writer:
        write_episode(writer, 0)
    with pytest.raises(ValidationError, match=f"root attribute {attribute}: expected"):
        TaskWriter(path, header(**change))
    assert completed_episodes(path) == {0}  # nothing touched


def test_aborted_and_leftover_episodes_are_not_completed(path: Path) -> None:
    with TaskWriter(path, header()) as writer:
        with (
            pytest.raises(RuntimeError, match="policy died"),
            writer.episode(0, init_state_idx=0, seed=7) as out,
        ):
            out.add(make_sample(0, 0))
            raise RuntimeError("policy died")
        assert writer.completed == set()
        out = writer.episode(1, init_state_idx=0, seed=7)
        out.add(make_sample(1, 0))
        out._file.flush()  # a crash would leave this .tmp behind
    leftovers = list(path.with_name(path.name + ".d").glob("*.tmp"))
    assert [p.name for p in leftovers] == ["episode_0001.h5.tmp"]
    assert completed_episodes(path) == set()
    out._file.close()
    with TaskWriter(path, header()) as writer:
        assert not list(writer.dir.glob("*.tmp"))
        write_episode(writer, 1)
    assert completed_episodes(path) == {1}


def test_samples_must_keep_their_names_and_shapes(path: Path) -> None:
    with TaskWriter(path, header()) as writer, writer.episode(0, init_state_idx=0, seed=7) as out:
        out.add(make_sample(0, 0))
        bad = make_sample(0, 1)
        wrong_shape = dict(bad.latents, prompt_mask=np.ones(PROMPT + 1, dtype=bool))
        with pytest.raises(ValidationError, match="prompt_mask: expected dtype bool shape"):
            out.add(Sample(1, bad.actions, bad.state, wrong_shape, LAYOUTS, bad.images))
        missing = {k: v for k, v in bad.latents.items() if k != "prompt_mask"}
        with pytest.raises(ValidationError, match="sample arrays"):
            out.add(Sample(1, bad.actions, bad.state, missing, LAYOUTS, bad.images))


def test_one_writer_per_task_and_bad_compression(path: Path) -> None:
    with TaskWriter(path, header()), pytest.raises(RuntimeError, match="another process"):
        TaskWriter(path, header())
    with pytest.raises(ValidationError, match="compression"):
        TaskWriter(path, header(), compression="zstd")


def test_consolidate_then_extend_then_consolidate(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with TaskWriter(path, header()) as writer:
        write_episode(writer, 0)
        write_episode(writer, 1)
        writer.consolidate()
    assert not path.with_name(path.name + ".d").exists()
    with h5py.File(path, "r") as f:
        assert all(isinstance(f.get(n, getlink=True), h5py.HardLink) for n in f)
    monkeypatch.chdir(tmp_path.parent)  # external links must not depend on the working directory
    with TaskWriter(path, header()) as writer:
        write_episode(writer, 2)
    assert completed_episodes(path) == {0, 1, 2}
    with TaskFile(path) as task:
        assert [e.index for e in task.episodes] == [0, 1, 2]
        np.testing.assert_array_equal(task.episode(1)["actions"][0], make_sample(1, 0).actions)
    TaskWriter(path, header()).close(consolidate=True)
    with TaskFile(path) as task:
        assert [e.index for e in task.episodes] == [0, 1, 2]
        np.testing.assert_array_equal(task.episode(2)["actions"][1], make_sample(2, 1).actions)
    assert not path.with_name(path.name + ".d").exists()


def test_failed_episode_keeps_its_error_seed_and_replay_data(path: Path) -> None:
    replay = {
        "executed_actions": np.arange(21, dtype=np.float64).reshape(3, 7),
        "query_noise_seeds": np.array([2**62 + 1], np.int64),
        "query_sim_states": np.linspace(0, 1, 2 * 9).reshape(2, 9),
    }
    result = EpisodeResult(
        False, 3, 1, 1, 0.5, 0, error="ValueError: unstable simulation", env_seed=2**32 - 1,
        replay=replay,
    )  # fmt: skip
    with TaskWriter(path, header()) as writer:
        with writer.episode(0, init_state_idx=0, seed=7) as out:
            out.add(make_sample(0, 0))
            out.finish(result)
        writer.close(consolidate=True)
    with TaskFile(path) as task:
        (episode,) = task.episodes
        assert episode.attrs["error"] == "ValueError: unstable simulation"
        assert episode.attrs["env_seed"] == 2**32 - 1 and episode.success is False
        for name, array in replay.items():
            np.testing.assert_array_equal(episode[f"replay/{name}"][()], array)


def test_resume_with_other_episode_arguments_is_refused(path: Path) -> None:
    arguments = {"seed": 7, "stride": 5, "max_steps": 300, "replan_steps": 5, "num_steps_wait": 10}
    with TaskWriter(path, header(episode_arguments=arguments)) as writer:
        write_episode(writer, 0)
    for name, value in (("stride", 10), ("seed", 8), ("num_steps_wait", 3)):
        changed = header(episode_arguments={**arguments, name: value})
        with pytest.raises(ValidationError, match=r"root attribute episode_arguments: expected"):
            TaskWriter(path, changed)
    with TaskWriter(path, header(episode_arguments=arguments)) as writer:
        assert writer.completed == {0}


def test_the_file_keeps_the_history_of_runs(path: Path) -> None:
    first, second = header(arguments={"trials": 1}), header(arguments={"trials": 2})
    with TaskWriter(path, first) as writer:
        write_episode(writer, 0)
    with TaskWriter(path, first):  # the same run reopening the file is not a new entry
        pass
    with TaskWriter(path, second) as writer:
        write_episode(writer, 1)
        writer.close(consolidate=True)
    with TaskFile(path) as task:
        runs = task.attrs["runs"]
        assert [run["run_id"] for run in runs] == [first.run_id, second.run_id]
        assert [run["arguments"]["trials"] for run in runs] == [1, 2]
        assert task.attrs["arguments"] == {"trials": 2}  # the latest run's
        assert {"h5py", "numpy"} <= set(runs[0]["versions"])


def test_an_unconsolidated_task_opens_in_plain_h5py_from_anywhere(path: Path) -> None:
    """While collecting, the task file is an index of relative external links: h5py alone (no
    latentpi, another working directory) follows them."""
    with TaskWriter(path, header()) as writer:
        write_episode(writer, 0)
        write_episode(writer, 1)
        script = (
            "import h5py, sys\n"
            "with h5py.File(sys.argv[1], 'r') as f:\n"
            "    print(sorted(f), f['episode_0001/states'].shape, bool(f['episode_0000'].attrs['success']))"
        )
        done = subprocess.run(
            [sys.executable, "-c", script, str(path)], cwd="/", capture_output=True, text=True
        )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['episode_0000', 'episode_0001'] (3, 8) True"

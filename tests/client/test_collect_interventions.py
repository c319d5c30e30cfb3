"""`latentpi collect --intervene / --prompt-variant / --counterfactual-prompt / --condition`.

Unit tests (no LIBERO): the intervene file's parsing (inline lists, the sibling npz read without
pickles, errors naming file and field), the condition's name and digest, its round trip through a
task file, resume identity, and a condition crossing a process boundary (spawn / Ray pickle the job).

Slow tests (real LIBERO, one real pi0_tiny server for the module): bad files stop before anything
is written (exit 2 from the CLI), files record the condition, a zero-effect intervention gives the
baseline's episode bit for bit while a real one changes it, resume under another condition is
refused, and the counterfactual prompts' stored actions equal runs driven by those prompts.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from latentpi.client.collect import CollectOptions, collect
from latentpi.client.collect.condition import default_name, load_condition, load_interventions
from latentpi.client.rollout import EpisodeResult, QueryCondition, Sample, variant_actions
from latentpi.client.server_process import EmbeddedServer
from latentpi.client.storage import TaskFile, TaskHeader, TaskWriter
from latentpi.client.storage.condition import BASELINE, Condition
from latentpi.protocol import ValidationError
from latentpi.protocol.latent_spec import PRESETS
from latentpi.protocol.messages import PolicyResponse

KEY = "test-key"
CLI = (sys.executable, "-c", "from latentpi.cli import main; main()", "collect")
EXPERT_1_WIDTH = 32  # pi0_tiny
rng = np.random.default_rng(0)
DIRECTION = rng.standard_normal(EXPERT_1_WIDTH).astype(np.float32)


def write_intervene(folder: Path, stem: str, entries: Any, **arrays: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.json"
    path.write_text(json.dumps(entries))
    if arrays:
        np.savez(folder / f"{stem}.npz", **arrays)
    return path


def zero_effect(folder: Path) -> Path:
    """An add with scale 0 on expert 1 (vector from the npz) and factors 1 on expert-0 units."""
    entries = [
        {
            "op": "add",
            "site": {"expert": 1, "layers": [1], "segment": "actions"},
            "scale": 0.0,
            "vector": {"npz": "direction"},
        },
        {
            "op": "scale_units",
            "site": {"expert": 0, "point": "mlp_hidden", "layers": [0, 2]},
            "units": [3, 7],
            "factors": [1.0, 1.0],
        },
    ]
    return write_intervene(folder, "zero", entries, direction=DIRECTION)


def strong_add(folder: Path) -> Path:
    entries = [
        {
            "op": "add",
            "site": {"expert": 1, "layers": [1]},
            "scale": 50.0,
            "vector": DIRECTION.tolist(),
        }
    ]
    return write_intervene(folder, "steer", entries)


def error_of(path: Path) -> str:
    with pytest.raises(ValidationError) as caught:
        load_interventions(path)
    return str(caught.value)


# -- the file, without LIBERO -------------------------------------------------------------------
def test_a_file_with_inline_lists_and_npz_arrays_parses_to_the_protocols_interventions(
    tmp_path: Path,
) -> None:
    first, second = load_interventions(zero_effect(tmp_path))
    assert first.op == "add" and first.scale == 0.0 and first.site.segment == "actions"
    np.testing.assert_array_equal(first.vector, DIRECTION)
    assert second.units == (3, 7) and second.factors.dtype == np.float32
    np.testing.assert_array_equal(second.factors, [1.0, 1.0])
    # the map form, and float64 npz arrays (cast to float32, as the protocol sends them)
    path = write_intervene(
        tmp_path / "map", "m", {"interventions": [{"op": "ablate", "site": {"expert": 0},
                                                   "mean": {"npz": "m"}}]},
        m=np.arange(64, dtype=np.float64),
    )  # fmt: skip
    (ablate,) = load_interventions(path)
    assert ablate.mean.dtype == np.float32 and ablate.mean[5] == 5.0


@pytest.mark.parametrize(
    ("content", "arrays", "expected"),
    [
        ("[{", {}, r"bad\.json: expected a JSON file with the interventions list"),
        ('[{"op": "steer", "site": {"expert": 0}}]', {}, r"bad\.json: interventions\[0\]\.op: "),
        ('{"interventions": [], "x": 1}', {}, r"bad\.json: expected a JSON file.*keys \['interventions', 'x'\]"),
        ("[]", {}, r"bad\.json: interventions: expected 1 to 16 entries"),
        (
            '[{"op": "add", "site": {"expert": 0}, "vector": [1, 2]},'
            ' {"op": "add", "site": {"expert": 0}, "vector": [[1], [1, 2]]}]',
            {},
            r"bad\.json: interventions\[1\]\.vector: expected a \(nested, rectangular\) list",
        ),
        ('[{"op": "add", "site": {"expert": 0}, "vector": [true]}]', {}, r"interventions\[0\]\.vector"),
        ('[{"op": "add", "site": {"expert": 0}, "vector": [1e999]}]', {}, r"interventions\[0\]\.vector: expected a finite"),
        ('[{"op": "add", "site": {"expert": 0}, "vector": {"npz": "v"}}]', {}, r"interventions\[0\]\.vector: expected an array of bad\.npz.*no file"),
        ('[{"op": "add", "site": {"expert": 0}, "vector": {"npz": "w"}}]', {"v": np.ones(4)}, r"interventions\[0\]\.vector: expected an array of bad\.npz \(it has v\), received 'w'"),
        (
            '[{"op": "add", "site": {"expert": 0}, "vector": {"npz": "v"}}]',
            {"v": np.array([{"pickled": True}], dtype=object)},
            r"bad\.json: interventions\[0\]\.vector: expected bad\.npz\[v\]: a float32 or float64 array .*never unpickled.*dtype object",
        ),
        ('[{"op": "add", "site": {"expert": 0}, "vector": {"npz": "v"}}]', {"v": np.ones(4, np.int64)}, r"dtype int64"),
        ('[{"op": "add", "site": {"expert": 0}, "vector": {"npz": "v"}}]', {"v": np.ones((1, 1, 1, 2), np.float32)}, r"at most 3 axes"),
        ('[{"op": "add", "site": {"expert": 0}, "vector": {"npy": "v"}}]', {}, r"interventions\[0\]\.vector: expected \{\"npz\": \"name\"\}"),
    ],
)  # fmt: skip
def test_a_bad_file_names_the_file_and_the_field(
    tmp_path: Path, content: str, arrays: dict[str, np.ndarray], expected: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    if arrays:
        np.savez(tmp_path / "bad.npz", **arrays)
    assert re.search(expected, error_of(path)), error_of(path)


def test_an_npz_array_over_the_protocols_bound_is_refused_from_its_header(tmp_path: Path) -> None:
    # a header claiming 2**30 values: refused before any data is read (the data is not there)
    path = tmp_path / "big.json"
    path.write_text('[{"op": "add", "site": {"expert": 0}, "vector": {"npz": "v"}}]')
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        member, {"descr": "<f4", "fortran_order": False, "shape": (2**15, 2**15)}
    )
    with zipfile.ZipFile(tmp_path / "big.npz", "w") as archive:
        archive.writestr("v.npy", member.getvalue())
    assert "shape (32768, 32768)" in error_of(path)
    # and so are arrays that pass one by one but not together (before the later ones are read)
    path.write_text(json.dumps([{"op": "add", "site": {"expert": 0}, "vector": {"npz": "v"}}] * 3))
    with zipfile.ZipFile(tmp_path / "big.npz", "w") as archive:
        member = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            member, {"descr": "<f4", "fortran_order": False, "shape": (2**23 + 1,)}
        )
        archive.writestr("v.npy", member.getvalue() + b"\0" * 4 * (2**23 + 1))
    assert "interventions[1].vector: expected arrays of at most 16777216 values in all" in error_of(
        path
    )


def test_prompts_and_names(tmp_path: Path) -> None:
    base = CollectOptions(suite="libero_object", out=tmp_path)
    assert load_condition(base).record() == BASELINE.record()
    assert load_condition(base).is_baseline
    assert (
        default_name(Path("x/steer_up.json"), "do not {task}") == 'steer_up+prompt="do not {task}"'
    )
    assert default_name(None, "") == 'prompt=""'
    cf = load_condition(replace(base, counterfactual_prompts=("", "do not {task}")))
    assert cf.name == "baseline" and cf.is_baseline  # counterfactuals only observe
    assert cf.render("open it") == ("open it", ("", "do not open it"))
    assert load_condition(replace(base, condition="mine", prompt_variant="")).name == "mine"
    with pytest.raises(ValidationError, match=r"--counterfactual-prompt: expected at most 16"):
        load_condition(replace(base, prompt_variant="", counterfactual_prompts=("a",) * 17))
    with pytest.raises(ValidationError, match=r"--condition: expected a name"):
        load_condition(replace(base, condition=" "))
    with pytest.raises(
        ValidationError, match=r"--intervene .*missing\.json: expected .*no such file"
    ):
        load_condition(replace(base, intervene=tmp_path / "missing.json"))


def test_the_digest_follows_the_content_not_the_formatting(tmp_path: Path) -> None:
    path = zero_effect(tmp_path)
    first = load_condition(CollectOptions(suite="libero_object", out=tmp_path, intervene=path))
    path.write_text(json.dumps(json.loads(path.read_text()), indent=4))
    again = load_condition(CollectOptions(suite="libero_object", out=tmp_path, intervene=path))
    assert first.interventions_sha256 == again.interventions_sha256 is not None
    np.savez(tmp_path / "zero.npz", direction=DIRECTION * 2)
    changed = load_condition(CollectOptions(suite="libero_object", out=tmp_path, intervene=path))
    assert changed.interventions_sha256 != first.interventions_sha256


def test_variant_actions_are_checked_against_what_was_sent() -> None:
    actions = np.zeros((4, 7))
    variants = ({"prompt": "", "actions": actions + 1}, {"prompt": "b", "actions": actions + 2})
    response = PolicyResponse(actions=actions, prompt_variants=variants)
    counterfactual = variant_actions(response, ("", "b"))
    assert counterfactual.shape == (2, 4, 7) and counterfactual.dtype == np.float64
    np.testing.assert_array_equal(counterfactual[1], actions + 2)
    with pytest.raises(ValidationError, match=r"prompt_variants: expected one entry per prompt"):
        variant_actions(response, ("", "c"))
    with pytest.raises(ValidationError, match=r"prompt_variants: expected one entry per prompt"):
        variant_actions(PolicyResponse(actions=actions), ("",))  # a server that ignored them
    short = PolicyResponse(
        actions=actions, prompt_variants=({"prompt": "", "actions": actions[:2]},)
    )
    with pytest.raises(ValidationError, match=r"prompt_variants\[0\]\.actions"):
        variant_actions(short, ("",))
    assert QueryCondition("", ("b",)).fields() == {"prompt": "", "prompt_variants": ["b"]}
    assert QueryCondition("open it").fields() == {"prompt": "open it"}


@pytest.mark.slow  # reads LIBERO's task list (seconds); no server is started
def test_the_cli_refuses_a_bad_condition_before_the_server_starts(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from latentpi.cli import main

    pickled = write_intervene(
        tmp_path, "pickled", [{"op": "add", "site": {"expert": 0}, "vector": {"npz": "v"}}],
        v=np.array([{"evil": 1}], dtype=object),
    )  # fmt: skip
    base = ["--suite", "libero_object", "--tasks", "0", "--out", str(tmp_path / "out")]
    for extra, message in [
        (["--intervene", str(pickled)], f"{pickled}: interventions[0].vector: expected pickled.npz[v]"),
        (["--counterfactual-prompt", "x"] * 17, "--counterfactual-prompt: expected at most 16"),
        (["--condition", ""], "--condition: expected a name of 1 to 200 characters"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as caught:
            main(["collect", *base, *extra])
        assert caught.value.code == 2
        assert message in capsys.readouterr().err
    assert not list((tmp_path / "out").rglob("*.h5*"))


# -- the file's record of the condition ---------------------------------------------------------
def header(condition: Condition) -> TaskHeader:
    return TaskHeader(
        suite="libero_object", task_id=0, task_name="t", instruction="pick it", bddl_file="t.bddl",
        model_config="pi0_tiny", checkpoint="random weights", latent_spec=PRESETS["attention"],
        condition=condition,
    )  # fmt: skip


def write_episode(writer: TaskWriter, k: int, condition: Condition) -> None:
    prompt, counterfactual = condition.render("pick it")
    replay = {"counterfactual_actions": np.full((2, len(counterfactual), 4, 7), 0.5)}
    result = EpisodeResult(
        success=False, total_steps=10, num_queries=2, num_samples=1, duration_s=1.0,
        init_state_idx=k, replay=replay, prompt=prompt, counterfactual_prompts=counterfactual,
        interventions=({"op": "add", "vector_shape": [32]},),
    )  # fmt: skip
    sample = Sample(0, np.zeros((4, 7)), np.zeros(8), {}, {})
    with writer.episode(k, init_state_idx=k, seed=7) as episode:
        episode.add(sample)
        episode.finish(result)


def test_a_task_file_records_the_condition_and_refuses_another(tmp_path: Path) -> None:
    intervene = zero_effect(tmp_path)
    options = CollectOptions(
        suite="libero_object", out=tmp_path, intervene=intervene, prompt_variant="",
        counterfactual_prompts=("do not {task}",),
    )  # fmt: skip
    condition = load_condition(options)
    path = tmp_path / "task.h5"
    with TaskWriter(path, header(condition)) as writer:
        write_episode(writer, 0, condition)
    for consolidated in (False, True):  # the index of episode files, then one self-contained file
        with TaskFile(path) as task:
            stored = task.condition
            assert task.attrs["condition"] == condition.record()
            episode = task.episode(0)
            assert episode.attrs["prompt"] == ""
            assert episode.attrs["counterfactual_prompts"] == ["do not pick it"]
            assert episode.attrs["interventions"] == [{"op": "add", "vector_shape": [32]}]
            assert episode["replay/counterfactual_actions"].shape == (2, 1, 4, 7)
        assert stored.record() == condition.record()
        assert stored.name == 'zero+prompt=""' and stored.prompt == ""
        np.testing.assert_array_equal(stored.interventions[0].vector, DIRECTION)
        np.testing.assert_array_equal(stored.interventions[1].factors, [1.0, 1.0])
        with h5py.File(path, "r") as f:
            np.testing.assert_array_equal(f["condition/interventions/0/vector"], DIRECTION)
            assert set(f["condition/interventions"]) == {"0", "1"}
        if not consolidated:
            with TaskWriter(path, header(condition)) as writer:  # the same condition resumes
                writer.close(consolidate=True)
    # another condition (here: the baseline) is refused, naming both
    with pytest.raises(
        ValidationError, match=r"root attribute condition: expected condition 'zero"
    ):
        TaskWriter(path, header(BASELINE))
    with pytest.raises(ValidationError, match=r"received condition 'baseline' \(0 intervention"):
        TaskWriter(path, header(BASELINE))


def test_a_file_without_a_condition_reads_and_resumes_as_the_baseline(tmp_path: Path) -> None:
    path = tmp_path / "task.h5"
    with TaskWriter(path, header(BASELINE)) as writer:
        write_episode(writer, 0, BASELINE)
        writer.close(consolidate=True)
    with h5py.File(path, "r+") as f:
        del f.attrs["condition"]  # as written before conditions existed
    with TaskFile(path) as task:
        assert task.condition.record() == BASELINE.record()
    TaskWriter(path, header(BASELINE)).close()
    intervened = load_condition(
        CollectOptions(suite="libero_object", out=tmp_path, intervene=zero_effect(tmp_path))
    )
    with pytest.raises(ValidationError, match=r"root attribute condition"):
        TaskWriter(path, header(intervened))


def test_a_condition_survives_pickling_with_its_job(tmp_path: Path) -> None:
    """Workers (spawn) and Ray actors receive the job pickled: the arrays must come along."""
    condition = load_condition(
        CollectOptions(suite="libero_object", out=tmp_path, intervene=zero_effect(tmp_path),
                       counterfactual_prompts=("{task}!",))
    )  # fmt: skip
    copy = pickle.loads(pickle.dumps(header(condition))).condition
    assert copy.record() == condition.record()
    np.testing.assert_array_equal(copy.wire_interventions()[0]["vector"], DIRECTION)


# -- real LIBERO, real server --------------------------------------------------------------------
MAX_STEPS, STRIDE = 10, 5  # two queries, both sampled


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    with EmbeddedServer("pi0_tiny", api_key=KEY) as server:
        yield server.url


def run(out: Path, url: str, **changes: Any) -> CollectOptions:
    options = CollectOptions(
        suite="libero_object", out=out, tasks="0", trials=1, max_steps=MAX_STEPS, stride=STRIDE,
        server=url, api_key=KEY, num_steps_wait=3,
    )  # fmt: skip
    options = replace(options, **changes)
    collect(options, progress=False)
    return options


def episode_arrays(out: Path) -> dict[str, np.ndarray]:
    (path,) = (out / "libero_object").glob("task_*.h5")
    with TaskFile(path) as task:
        episode = task.episode(0)
        return {name: episode[name][()] for name in episode.names}


@pytest.fixture(scope="module")
def baseline(server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("baseline")
    run(out, server_url)
    return out


@pytest.mark.slow
def test_bad_files_stop_before_anything_is_written(server_url: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # wrong width for this model: only the server knows it (refused on the probe, exit 2)
    wide = write_intervene(
        tmp_path, "wide", [{"op": "add", "site": {"expert": 1}, "vector": [0.0] * 2048}]
    )
    args = [
        "--suite", "libero_object", "--tasks", "0", "--trials", "1", "--max-steps", "5",
        "--out", str(out), "--server", server_url, "--api-key", KEY, "--intervene", str(wide),
    ]  # fmt: skip
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr
    assert f"{wide}: interventions[0].vector: expected shape (32,)" in done.stderr
    assert not (out / "libero_object").exists()
    # a layer the model does not have, a segment of the other expert: named the same way
    for entry, field in [
        ({"op": "ablate", "site": {"expert": 0, "layers": [7]}}, r"interventions\[0\]\.site\.layers"),
        ({"op": "ablate", "site": {"expert": 1, "segment": "prompt"}}, r"interventions\[0\]\.site\.segment"),
    ]:  # fmt: skip
        path = write_intervene(tmp_path, "site", [entry])
        with pytest.raises(ValidationError, match=rf"site\.json: {field}: expected"):
            run(out, server_url, intervene=path)
    with pytest.raises(ValidationError, match=r"bad\.json: interventions\[0\]\.op"):
        run(out, server_url, intervene=write_intervene(tmp_path, "bad", [{"op": "x"}]))
    assert not (out / "libero_object").exists()


@pytest.mark.slow
def test_a_zero_effect_intervention_is_the_baseline_bit_for_bit_and_a_real_one_is_not(
    server_url: str, baseline: Path, tmp_path: Path
) -> None:
    reference = episode_arrays(baseline)
    intervene = zero_effect(tmp_path / "files")
    zero = run(tmp_path / "zero", server_url, intervene=intervene)
    same = episode_arrays(tmp_path / "zero")
    assert set(same) == set(reference)
    for name, array in reference.items():  # actions, states, latents, executed actions, ...
        np.testing.assert_array_equal(same[name], array, err_msg=name)
    (path,) = (tmp_path / "zero" / "libero_object").glob("task_*.h5")
    with TaskFile(path) as task:
        condition = task.condition
        assert condition.name == "zero" and task.attrs["condition"]["prompt"] == "{task}"
        np.testing.assert_array_equal(condition.interventions[0].vector, DIRECTION)
        records = task.episode(0).attrs["interventions"]  # the server's, resolved
        assert records[0]["site"]["layers"] == [1] and records[0]["vector_shape"] == [32]
        assert task.attrs["arguments"]["intervene"] == str(intervene)
    with TaskFile(next((baseline / "libero_object").glob("task_*.h5"))) as task:
        assert task.condition.is_baseline and task.attrs["condition"]["name"] == "baseline"

    # the same condition resumes (nothing left to do); another is refused before simulating
    assert collect(zero, progress=False).episodes_run == 0
    with pytest.raises(
        ValidationError, match=r"root attribute condition: expected condition 'zero'"
    ):
        collect(replace(zero, intervene=None), progress=False)
    with pytest.raises(
        ValidationError, match=r"root attribute condition: expected condition 'baseline'"
    ):
        collect(replace(zero, out=baseline), progress=False)

    # a real one: the same first observation, other actions (one query suffices)
    run(tmp_path / "steer", server_url, intervene=strong_add(tmp_path / "files"), max_steps=5)
    steered = episode_arrays(tmp_path / "steer")
    for name in ("replay/query_sim_states", "states"):
        np.testing.assert_array_equal(steered[name][0], reference[name][0], err_msg=name)
    assert not np.array_equal(steered["actions"][0], reference["actions"][0])
    executed = steered["replay/executed_actions"]
    assert not np.array_equal(executed, reference["replay/executed_actions"][: len(executed)])


@pytest.mark.xfail(
    strict=True,
    reason="server bug found here: with an expert-1 `add` (even scale 0) in the program, the "
    "mean-pooled expert-1 entry of the last layer's output (entry `depth`, pooled after the scan) "
    "differs from the plain program's by 1 ulp (reduction order); unpooled and `last` pooling "
    "are bit-identical, and so are the actions. Fix belongs in server/model/capture.py.",
)
@pytest.mark.slow
def test_a_zero_effect_add_leaves_mean_pooled_expert_1_latents_bit_identical(
    server_url: str,
) -> None:
    from latentpi.client.policy_client import LatentpiPolicyClient

    image = rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)
    request = {
        "observation/image": image, "observation/wrist_image": image[::-1],
        "observation/state": np.ones(8, np.float32), "prompt": "pick it up", "noise_seed": 3,
        "latent_spec": {"preset": "pooled"},
    }  # fmt: skip
    add = [{"op": "add", "site": {"expert": 1}, "scale": 0.0, "vector": DIRECTION}]
    with LatentpiPolicyClient(server_url, KEY) as client:
        plain = client.infer(request)
        zero = client.infer({**request, "interventions": add})
    np.testing.assert_array_equal(zero["actions"], plain["actions"])
    np.testing.assert_array_equal(zero["expert_1_hidden_states"], plain["expert_1_hidden_states"])


@pytest.mark.slow
def test_counterfactual_prompts_store_what_those_prompts_would_have_done(
    server_url: str, baseline: Path, tmp_path: Path
) -> None:
    prompts = ("do not {task}", "")
    run(tmp_path / "cf", server_url, counterfactual_prompts=prompts)
    observed = episode_arrays(tmp_path / "cf")
    counterfactual = observed["replay/counterfactual_actions"]
    assert counterfactual.shape == (2, 2, 50, 7) and counterfactual.dtype == np.float64
    # the counterfactuals only observe: the episode is the baseline's
    reference = episode_arrays(baseline)
    for name in ("actions", "replay/executed_actions", "replay/query_sim_states"):
        np.testing.assert_array_equal(observed[name], reference[name], err_msg=name)
    (path,) = (tmp_path / "cf" / "libero_object").glob("task_*.h5")
    with TaskFile(path) as task:
        instruction = task.attrs["instruction"]
        assert task.episode(0).attrs["counterfactual_prompts"] == [f"do not {instruction}", ""]
        assert (
            task.condition.counterfactual_prompts == prompts and task.condition.name == "baseline"
        )
    # each equals a run driven by that prompt, at the first query (same observation and noise)
    for index, prompt in enumerate(prompts):
        out = tmp_path / f"driven_{index}"
        run(out, server_url, prompt_variant=prompt, max_steps=5)
        driven = episode_arrays(out)
        np.testing.assert_array_equal(driven["actions"][0], counterfactual[0, index])
        assert not np.array_equal(driven["actions"][0], reference["actions"][0])
        with TaskFile(next((out / "libero_object").glob("task_*.h5"))) as task:
            assert task.episode(0).attrs["prompt"] == prompt.replace("{task}", instruction)

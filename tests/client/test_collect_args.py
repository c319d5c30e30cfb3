"""Bad `latentpi collect` arguments fail before any server or simulation starts, naming the argument.

The run goes through the real `latentpi` dispatcher in this process with the default embedded
server; each case must return within seconds (no model load, no environment) and leave no files.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from latentpi.cli import main
from latentpi.client.collect import task_range
from latentpi.client.collect.identity import model_identity, same_model
from latentpi.client.collect.options import (
    CollectOptions,
    check_options,
    load_latent_spec,
    option_warnings,
    select_tasks,
)
from latentpi.client.collect.seeding import episode_seed, query_noise_seed
from latentpi.protocol import ValidationError
from latentpi.protocol.latent_spec import PRESETS, LatentSpec


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as caught:
        main(["collect", *args])
    return int(caught.value.code or 0), capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, range(10)),
        (":", range(10)),
        ("2:5", range(2, 5)),
        ("3", range(3, 4)),
        ("-1", range(9, 10)),
        ("-2:", range(8, 10)),
        (":3", range(0, 3)),
        ("0:10", range(10)),
    ],
)
def test_task_range(text: str | None, expected: range) -> None:
    assert task_range(text, 10) == expected


@pytest.mark.parametrize("text", ["5:20", "10", "3:3", "4:2", "a:b", "1:2:3", "-11", "11:"])
def test_task_range_out_of_bounds_names_the_argument(text: str) -> None:
    with pytest.raises(
        ValidationError, match=r"--tasks: expected A:B or A with task ids in \[0, 10\)"
    ):
        task_range(text, 10)


def test_latents_preset_or_spec_file(tmp_path: Path) -> None:
    assert load_latent_spec("pooled") == PRESETS["pooled"]
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"layers": [0, -1], "dtype": "bfloat16"}))
    assert load_latent_spec(str(spec_file)) == LatentSpec(layers=(0, -1), dtype="bfloat16")
    spec_file.write_text(json.dumps("text"))
    assert load_latent_spec(str(spec_file)) == PRESETS["text"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", r"--latents: expected a preset \(.*\) or a readable spec.json \(Expecting"),
        ('{"pooling": "median"}', r"--latents: expected a valid latent spec \(latent_spec.pooling"),
        ('{"colour": 1}', r"--latents: expected a valid latent spec \(latent_spec.colour"),
        ('"nope"', r"--latents: expected a valid latent spec \(latent_spec: expected a preset"),
    ],
)
def test_bad_spec_files_name_the_argument(tmp_path: Path, content: str, message: str) -> None:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(content)
    with pytest.raises(ValidationError, match=message):
        load_latent_spec(str(spec_file))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stride": 0}, r"--stride: expected a positive integer, received 0"),
        ({"trials": -1}, r"--trials: expected a positive integer"),
        ({"workers": 0}, r"--workers: expected a positive integer"),
        ({"max_steps": 0}, r"--max-steps: expected a positive integer"),
        ({"server": "http://host:8000"}, r"--server: expected a ws:// or wss:// URL or 'embedded'"),
        ({"latents": "everything"}, r"--latents: expected a preset"),
        ({"suite": "libero_100"}, r"--suite: expected one of libero_spatial"),
    ],
)
def test_check_options_names_the_argument(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    fields = {"suite": "libero_object", "out": tmp_path, **change}
    with pytest.raises(ValidationError, match=message):
        check_options(CollectOptions(**fields))  # type: ignore[arg-type]


def test_unwritable_out_names_the_argument(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValidationError, match=r"--out: expected a writable folder"):
        check_options(CollectOptions(suite="libero_object", out=blocker / "sub"))


@pytest.mark.slow  # reads LIBERO's task list (seconds)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--suite", "libero_100"], "argument --suite: invalid choice: 'libero_100'"),
        (["--suite", "libero_object", "--tasks", "5:20"], "--tasks: expected A:B or A"),
        (["--suite", "libero_goal", "--stride", "0"], "--stride: expected a positive integer"),
        (["--suite", "libero_object", "--trials", "51"], "--trials: expected at most 50"),
        (["--suite", "libero_object", "--latents", "nope"], "--latents: expected a preset"),
        (["--suite", "libero_10", "--workers", "0"], "--workers: expected a positive integer"),
    ],
)
def test_cli_fails_fast_before_the_server_starts(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "out"
    start = time.monotonic()
    code, err = run(capsys, *args, "--out", str(out))  # no --server: it would be embedded
    assert code == 2
    assert message in err
    assert time.monotonic() - start < 60  # no model loaded (pi0_tiny alone takes ~30 s)
    assert not list(out.rglob("*.h5*"))


def test_cli_unwritable_out(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = run(capsys, "--suite", "libero_object", "--out", str(blocker / "out"))
    assert code == 2
    assert "latentpi collect: --out: expected a writable folder" in err


# -- issue 11: horizon, episodes, task names, warnings, model identity, client-only installs ------
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_steps": 991}, r"--max-steps: expected at most 990 \(LIBERO's env horizon 1000"),
        ({"max_steps": 900, "num_steps_wait": 101}, r"--max-steps: expected at most 899"),
        ({"suite": "libero_10", "num_steps_wait": 481}, r"--max-steps: expected at most 519"),
        ({"trials": 3, "episodes": "3"}, r"--episodes: expected A:B or A with episode indices"),
        ({"error_retries": -1}, r"error_retries: expected an integer >= 0"),
    ],
)
def test_what_the_env_would_refuse_mid_run_is_refused_first(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    fields = {"suite": "libero_object", "out": tmp_path, **change}
    with pytest.raises(ValidationError, match=message):
        check_options(CollectOptions(**fields))  # type: ignore[arg-type]
    check_options(CollectOptions(suite="libero_object", out=tmp_path, max_steps=990))


def test_tasks_by_name_range_and_id() -> None:
    names = ["open_the_drawer", "turn_on_the_stove", "put_the_bowl_on_the_plate", "push_the_plate"]
    assert select_tasks(None, names) == [0, 1, 2, 3]
    assert select_tasks("turn_on_the_stove", names) == [1]
    assert select_tasks("push_the_plate, 0:2, 1", names) == [3, 0, 1]
    assert select_tasks("-1", names) == [3]
    with pytest.raises(ValidationError, match=r"--tasks: expected task ids .* or task names"):
        select_tasks("open_the_door", names)


def test_warnings_for_arguments_that_are_valid_but_likely_wrong(tmp_path: Path) -> None:
    options = CollectOptions(suite="libero_goal", out=tmp_path, stride=2, workers=4)
    found = option_warnings(options, num_tasks=2)
    assert any("--stride 2 < --replan-steps 5" in warning for warning in found)
    assert any("--workers 4 > 2 task(s)" in warning for warning in found)
    assert option_warnings(CollectOptions(suite="libero_goal", out=tmp_path), 10) == []


def test_episode_arguments_cover_what_changes_an_episode(tmp_path: Path) -> None:
    base = CollectOptions(suite="libero_goal", out=tmp_path)
    changes = {
        "seed": 8, "max_steps": 100, "stride": 10, "replan_steps": 4, "num_steps_wait": 5,
        "save_images": True,
    }  # fmt: skip
    for name, value in changes.items():
        changed = replace(base, **{name: value})
        assert changed.episode_arguments() != base.episode_arguments(), name
    # what does not change an episode is not part of it
    for name, value in {"trials": 3, "workers": 2, "compression": "gzip", "tasks": "1"}.items():
        assert replace(base, **{name: value}).episode_arguments() == base.episode_arguments()


def test_servers_that_name_no_model_are_told_apart_by_their_metadata() -> None:
    first = {"model": None, "token_layout": {"expert_0": {"prompt": [0, 48]}}}
    second = {"model": None, "token_layout": {"expert_0": {"prompt": [0, 200]}}}
    assert model_identity(first) != model_identity(second)
    assert model_identity(first) == model_identity(dict(first))
    assert all("unnamed" in value for value in model_identity({}))
    named = {"model": "pi0", "config": {"name": "pi0_libero", "checkpoint": "gs://x"}}
    assert model_identity(named) == ("pi0_libero", "gs://x")
    # the same model on another host (another device) is the same model; another dtype is not
    on_gpu = {**named, "config": {**named["config"], "device": {"platform": "gpu"}}}
    assert same_model(named, on_gpu) and model_identity(named) == model_identity(on_gpu)
    assert not same_model(named, {**named, "config": {**named["config"], "dtype": "float32"}})


def test_seeds_derive_from_what_the_episode_is() -> None:
    seed = episode_seed(7, "libero_goal", 0, 2)
    assert seed == episode_seed(7, "libero_goal", 0, 2) and 0 <= seed < 2**32
    others = {
        episode_seed(8, "libero_goal", 0, 2),
        episode_seed(7, "libero_spatial", 0, 2),
        episode_seed(7, "libero_goal", 1, 2),
        episode_seed(7, "libero_goal", 0, 3),
    }
    assert seed not in others and len(others) == 4
    noise = [query_noise_seed(7, "libero_goal", 0, 2, query) for query in range(50)]
    assert len(set(noise)) == 50 and all(0 <= value < 2**63 for value in noise)
    assert noise[0] != query_noise_seed(7, "libero_goal", 0, 3, 0)
    # the derivation is part of the data format: it must not change silently
    assert seed == GOLDEN_EPISODE_SEED and noise[0] == GOLDEN_NOISE_SEED


GOLDEN_EPISODE_SEED = 4033369378
GOLDEN_NOISE_SEED = 1332424944494443565


# A client-only install: `latentpi.server` cannot be imported (as on a machine with latentpi-client
# alone); the default embedded server must be refused while the arguments are checked.
CLIENT_ONLY = """
import importlib.abc, sys
class NoServer(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "latentpi.server" or name.startswith("latentpi.server."):
            raise ModuleNotFoundError(name)
        return None
sys.meta_path.insert(0, NoServer())
from latentpi.cli import main
main(sys.argv[1:])
"""


def test_client_only_install_without_server_is_a_clear_argument_error(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", CLIENT_ONLY, "collect", "--suite", "libero_goal", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "latentpi collect: --server: expected ws://HOST:PORT of a running policy server" in (
        done.stderr
    )
    assert "client-only install" in done.stderr and "Traceback" not in done.stderr

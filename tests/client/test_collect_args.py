"""Bad `latentpi collect` arguments fail before any server or simulation starts, naming the argument.

The run goes through the real `latentpi` dispatcher in this process with the default embedded
server; each case must return within seconds (no model load, no environment) and leave no files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from latentpi.cli import main
from latentpi.client.collect import task_range
from latentpi.client.collect.options import CollectOptions, check_options, load_latent_spec
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

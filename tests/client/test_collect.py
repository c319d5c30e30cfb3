"""`latentpi collect` end to end: real LIBERO, a real pi0_tiny server (one for the module, with an API
key), real HDF5 files. Files and shapes against the server's layouts, resume, SIGKILL of the
collector at several moments, a rejected key or spec, the embedded server's lifetime and a server
killed and restarted mid-run (last: it restarts the shared server on the same port)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import h5py
import numpy as np
import pytest
from restartable_server import RestartableServer

from latentpi.client.collect import CollectOptions, collect, plan_tasks
from latentpi.client.collect.events import EpisodeDone, EpisodeRedone, Event
from latentpi.client.collect.run import make_jobs
from latentpi.client.collect.seeding import episode_seed, query_noise_seed
from latentpi.client.collect.task import collect_task
from latentpi.client.libero_env import make_env
from latentpi.client.policy_client import LatentpiPolicyClient, ServerRejected
from latentpi.client.storage import TaskFile, completed_episodes
from latentpi.client.storage.layout import episode_dir
from latentpi.protocol import ValidationError
from latentpi.protocol.latent_layout import latent_layouts
from latentpi.protocol.latent_spec import PRESETS, LatentSpec
from latentpi.protocol.messages import ServerMetadata

pytestmark = pytest.mark.slow

KEY = "test-key"
MAX_STEPS, STRIDE = 10, 5  # two queries per episode, both sampled
CLI = (sys.executable, "-c", "from latentpi.cli import main; main()", "collect")


@pytest.fixture(scope="module")
def server() -> Iterator[RestartableServer]:
    shared = RestartableServer(KEY)
    yield shared
    shared.stop()


@pytest.fixture(scope="module")
def object_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("object")


def options(out: Path, server: RestartableServer, **changes: object) -> CollectOptions:
    base = CollectOptions(
        suite="libero_object",
        out=out,
        tasks="0:2",
        trials=2,
        max_steps=MAX_STEPS,
        stride=STRIDE,
        server=server.url,
        api_key=KEY,
        num_steps_wait=3,
    )
    return replace(base, **changes)


def task_files(out: Path, suite: str = "libero_object") -> list[Path]:
    return sorted((out / suite).glob("task_*.h5"))


def check_task_file(
    path: Path, metadata: dict, spec: LatentSpec, episodes: list[int], images: bool = False
) -> None:
    """Root attributes, one group per episode, and every dataset's shape against the layouts."""
    layouts = latent_layouts(spec, ServerMetadata.from_wire(metadata).shape)
    with TaskFile(path) as task:
        attrs = task.attrs
        assert attrs["format_version"] == 2
        assert attrs["random_weights"] is True or attrs["random_weights"] == 1  # pi0_tiny
        assert any("RANDOM WEIGHTS" in warning for warning in attrs["warnings"])
        assert attrs["episode_arguments"]["stride"] == STRIDE
        assert attrs["bddl"] == Path(attrs["bddl_file"]).read_text()
        assert (
            attrs["env_args"]["control_freq"] == 20 and attrs["env_args"]["camera_heights"] == 256
        )
        assert len(attrs["runs"]) >= 1 and attrs["runs"][-1]["warnings"] == attrs["warnings"]
        assert path.name == f"task_{attrs['task_id']}_{attrs['task_name']}.h5"
        assert attrs["model_config"] == "pi0_tiny"
        assert attrs["checkpoint"] == metadata["config"]["checkpoint"]
        assert attrs["server_metadata"] == json.loads(json.dumps(metadata))
        assert "token_layout" in attrs["server_metadata"]
        assert task.latent_spec == spec
        assert attrs["arguments"]["stride"] == STRIDE and "api_key" not in attrs["arguments"]
        assert {"h5py", "numpy", "mujoco"} <= set(attrs["versions"])
        assert [episode.index for episode in task.episodes] == episodes
        for episode in task.episodes:
            assert episode.init_state_idx == episode.index
            assert episode.success is False and episode.total_steps == MAX_STEPS  # random weights
            n = episode.num_samples
            assert n == 2
            np.testing.assert_array_equal(episode["timesteps"][:], [0, STRIDE])
            assert episode["actions"].shape == (n, metadata["action_horizon"], 7)
            assert episode["states"].shape == (n, 8)
            for name, layout in layouts.items():
                array = episode[name]
                assert array.shape == (n, *layout.shape), name
                assert array[:].dtype.name == layout.dtype, name
                assert array.axes == ("sample", *layout.axes)
            latent_names = set(episode.names) - {"timesteps", "actions", "states"}
            assert {n for n in latent_names if "/" not in n} == set(layouts)  # images/, replay/
            steps = episode["replay/executed_actions"]
            assert steps.shape == (episode.total_steps, 7)
            assert len(episode["replay/query_sim_states"]) == episode.attrs["num_queries"]
            if images:
                assert episode["images/image"].shape == (n, 224, 224, 3)
                assert episode["images/wrist_image"][:].dtype == np.uint8
            else:
                assert not any(name.startswith("images/") for name in episode.names)


def durations(path: Path) -> dict[int, float]:
    with TaskFile(path) as task:
        return {episode.index: float(episode.attrs["duration_s"]) for episode in task.episodes}


# -- files, two suites, resume ------------------------------------------------------------------
def test_collects_two_tasks_with_two_workers_then_resumes(
    server: RestartableServer, object_dir: Path
) -> None:
    events: list[Event] = []
    result = collect(options(object_dir, server, workers=2), on_event=events.append, progress=False)
    metadata = server.metadata()
    paths = task_files(object_dir)
    assert [p.name.split("_")[1] for p in paths] == ["0", "1"]
    for path in paths:
        check_task_file(path, metadata, PRESETS["default"], [0, 1])
        assert not episode_dir(path).exists()  # consolidated
    assert result.episodes_run == 4 and [row.episodes for row in result.tasks] == [2, 2]
    done = [e for e in events if isinstance(e, EpisodeDone)]
    assert sorted((e.task_id, e.episode_idx) for e in done) == [(0, 0), (0, 1), (1, 0), (1, 1)]

    # the same command again: nothing to do, nothing rewritten
    before = {path: (path.stat().st_mtime_ns, durations(path)) for path in paths}
    again = collect(options(object_dir, server, workers=2), progress=False)
    assert again.episodes_run == 0
    assert {path: (path.stat().st_mtime_ns, durations(path)) for path in paths} == before

    # more trials: only the new episode of each task runs; the old ones are kept as they were
    more = collect(options(object_dir, server, trials=3), progress=False)
    assert more.episodes_run == 2
    for path in paths:
        check_task_file(path, metadata, PRESETS["default"], [0, 1, 2])
        assert {k: v for k, v in durations(path).items() if k < 2} == before[path][1]


def test_second_suite_with_a_spec_file_and_images(
    server: RestartableServer, tmp_path: Path
) -> None:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"preset": "pooled", "attention": "head_mean", "steps": [-1]}))
    spec = LatentSpec(text_only=False, pooling="mean", attention="head_mean", steps=(-1,))
    out = tmp_path / "out"
    result = collect(
        options(
            out,
            server,
            suite="libero_goal",
            tasks="-1:",
            trials=1,
            latents=str(spec_file),
            save_images=True,
            video=True,
        ),
        progress=False,
    )
    (path,) = task_files(out, "libero_goal")
    assert path.name.startswith("task_9_")  # -1: is the last of libero_goal's 10 tasks
    check_task_file(path, server.metadata(), spec, [0], images=True)
    # --video: the agent view after the settle period and after each policy step
    (video,) = (out / "libero_goal" / "videos").glob("*")
    assert video.name == "task_9_episode_0000.mp4"
    capture, frames = cv2.VideoCapture(str(video)), []
    while (frame := capture.read())[0]:
        frames.append(frame[1])
    assert len(frames) == MAX_STEPS + 1 and frames[0].shape == (256, 256, 3)
    assert result.tasks[0].size_bytes == path.stat().st_size > 0


def test_changed_spec_or_model_on_resume_is_refused_before_simulating(
    server: RestartableServer, object_dir: Path
) -> None:
    events: list[Event] = []
    with pytest.raises(ValidationError, match=r"root attribute latent_spec") as caught:
        collect(options(object_dir, server, latents="pooled"), on_event=events.append)
    assert "as stored" in str(caught.value)
    # so is another stride, seed or settle period: episode k would not be the same episode
    for change in ({"stride": 10}, {"seed": 8}, {"num_steps_wait": 4}):
        with pytest.raises(ValidationError, match=r"root attribute episode_arguments"):
            collect(options(object_dir, server, **change), on_event=events.append)
    # a file written by another model (its stored model_config differs) is refused the same way
    path = task_files(object_dir)[0]
    with h5py.File(path, "r+") as f:
        f.attrs["model_config"] = "pi05_libero"
    with pytest.raises(
        ValidationError, match=r"root attribute model_config: expected 'pi05_libero'"
    ):
        collect(options(object_dir, server), on_event=events.append)
    assert events == []


# -- the server says no --------------------------------------------------------------------------
def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def cli_args(out: Path, server: RestartableServer, *extra: str) -> list[str]:
    return [
        "--suite", "libero_object", "--tasks", "0:2", "--trials", "2",
        "--max-steps", str(MAX_STEPS), "--stride", str(STRIDE), "--out", str(out),
        "--server", server.url, "--api-key", KEY, *extra,
    ]  # fmt: skip


def test_bad_api_key_stops_at_once_with_the_servers_message(
    server: RestartableServer, tmp_path: Path
) -> None:
    with pytest.raises(ServerRejected, match=r"HTTP 401: invalid or missing API key"):
        collect(options(tmp_path, server, api_key="wrong"))
    assert not (tmp_path / "libero_object").exists()


def test_rejected_spec_stops_at_once_with_the_servers_message(
    server: RestartableServer, tmp_path: Path
) -> None:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"layers": [99]}))  # pi0_tiny has 3 layers
    args = cli_args(tmp_path / "out", server, "--latents", str(spec_file), "--workers", "2")
    done = run_cli(*args)
    assert done.returncode == 1, done.stderr
    assert "stopped (ServerRejected): bad request: latent_spec.layers" in done.stderr
    for path in (tmp_path / "out" / "libero_object").glob("*.h5.d"):
        assert list(path.glob("episode_*")) == []  # nothing half-written, nothing published


# -- SIGKILL of the collector ---------------------------------------------------------------------
def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            continue
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(condition: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return False


def kill_when(
    args: list[str], condition: Callable[[], bool], delay: float = 0.0
) -> tuple[int, dict[int, str]]:
    """Start the CLI, SIGKILL it once `condition` holds (+ delay); its exit code and its children
    (pid -> command line)."""
    process = subprocess.Popen(
        [*CLI, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    kids: dict[int, str] = {}

    def look() -> None:
        for pid in children(process.pid):  # re-read: a fresh child still shows our cmdline
            try:
                kids[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue

    def watch() -> bool:
        look()
        return condition() or process.poll() is not None

    assert wait_for(watch, 300), "the condition never held"
    time.sleep(delay)
    look()
    assert process.poll() is None, "the collector finished before the kill: nothing was tested"
    process.kill()
    return process.wait(), kids


def tmp_episode(out: Path) -> Callable[[], bool]:
    return lambda: any((out / "libero_object").glob("*.h5.d/episode_*.h5.tmp"))


def published_episode(out: Path) -> Callable[[], bool]:
    return lambda: any((out / "libero_object").glob("*.h5.d/episode_*.h5"))


def completed(out: Path) -> dict[str, set[int]]:
    return {p.name: completed_episodes(p) for p in task_files(out)}


def test_sigkill_of_the_collector_at_several_moments_then_resume(
    server: RestartableServer, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = cli_args(out, server)
    seen: dict[str, set[int]] = {}
    moments = [
        (args, tmp_episode(out), 1.5),  # an episode being written
        ([*args, "--workers", "2"], published_episode(out), 0.0),  # just published, maybe unindexed
    ]
    for run_args, condition, delay in moments:
        code, kids = kill_when(run_args, condition, delay)
        assert code == -signal.SIGKILL
        if condition is not moments[0][1]:  # killed just after an episode was published
            assert sum(len(episodes) for episodes in completed(out).values()) >= 1
        # workers die with the collector (PR_SET_PDEATHSIG): no simulation, no lock left behind
        assert wait_for(lambda kids=kids: not any(alive(k) for k in kids), 10)
        now = completed(out)
        for name, episodes in seen.items():
            assert episodes <= now.get(name, set())  # nothing finished is ever lost
        for path in task_files(out):
            with TaskFile(path) as task:  # every task file opens, episodes once each
                indices = [episode.index for episode in task.episodes]
                assert indices == sorted(set(indices)) == sorted(now[path.name])
        seen = now
    before = {path.name: durations(path) for path in task_files(out)}
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    metadata = server.metadata()
    for path in task_files(out):
        check_task_file(path, metadata, PRESETS["default"], [0, 1])
        kept = {k: v for k, v in durations(path).items() if k in before.get(path.name, {})}
        assert kept == before.get(path.name, {})  # episodes finished before the kills not redone
    assert " all         4 " in done.stdout


def test_embedded_server_dies_with_the_collector(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--suite", "libero_object", "--tasks", "0", "--trials", "1", "--max-steps", "5"]
    code, kids = kill_when([*args, "--out", str(out)], tmp_episode(out))
    assert code == -signal.SIGKILL
    (server,) = [pid for pid, command in kids.items() if " serve --config pi0_tiny " in command]
    assert wait_for(lambda: not alive(server), 10), "the embedded server outlived the collector"


# -- last: the shared server is killed and restarted ----------------------------------------------
def test_server_lost_mid_run_is_retried_and_the_episode_redone(
    server: RestartableServer, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = [*cli_args(out, server), "--tasks", "0", "--trials", "2", "--retry-timeout", "600"]
    process = subprocess.Popen(
        [*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert wait_for(tmp_episode(out), 300)
        time.sleep(1.0)
        server.kill()  # the episode in flight loses its server
        server.restart()
        stdout, stderr = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    # (whether the reconnect needed backoff depends on how soon the new server bound its port;
    # backoff itself is tested in test_policy_client.py)
    assert "lost during a request" in stderr and "redoing the episode" in stderr
    assert "redone after a lost connection" in stdout
    (path,) = task_files(out)
    check_task_file(path, server.metadata(), PRESETS["default"], [0, 1])


# -- the episode as the unit: the same scene and actions alone, after a resume, after a retry ----
# libero_goal: its fixtures move with the env seed (libero_object's do not, so it cannot tell).
GOAL = {"suite": "libero_goal", "tasks": "0", "save_images": True}


def episode_record(path: Path, index: int) -> dict[str, object]:
    """Everything episode `index` holds: attributes that must repeat and every array."""
    with TaskFile(path) as task:
        episode = task.episode(index)
        record: dict[str, object] = {
            key: episode.attrs[key]
            for key in ("env_seed", "seed", "init_state_idx", "total_steps", "num_queries")
        }
        for name in episode.names:
            record[name] = episode[name][()]
    return record


def assert_same_episode(got: dict[str, object], expected: dict[str, object]) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(np.asarray(got[key]), value, err_msg=key)
        else:
            assert got[key] == value, key


class FailingEnv:
    """The real env, raising at policy step `at` of the resets numbered in `fail_on` (counted over
    every env the factory built: the collector rebuilds the env after a simulation error)."""

    def __init__(self, env: Any, resets: list[int], fail_on: set[int], at: int) -> None:
        self.env, self.resets, self.fail_on, self.at, self.steps = env, resets, fail_on, at, 0

    def reset(self) -> Any:
        self.resets.append(1)
        self.steps = 0
        return self.env.reset()

    def step(self, action: list[float]) -> Any:
        self.steps += 1
        if len(self.resets) in self.fail_on and self.steps == self.at:
            raise RuntimeError("injected simulation failure")
        return self.env.step(action)

    def __getattr__(self, name: str) -> Any:  # seed, set_init_state, get_sim_state, close
        return getattr(self.env, name)


def test_an_episode_is_the_same_alone_after_a_resume_and_after_a_retry(
    server: RestartableServer, tmp_path: Path
) -> None:
    full = options(tmp_path / "full", server, trials=2, **GOAL)
    collect(full, progress=False)
    (path,) = task_files(tmp_path / "full", "libero_goal")
    reference = {k: episode_record(path, k) for k in range(2)}
    for k, record in reference.items():
        assert record["env_seed"] == episode_seed(7, "libero_goal", 0, k)
        seeds = [query_noise_seed(7, "libero_goal", 0, k, q) for q in range(MAX_STEPS // 5)]
        np.testing.assert_array_equal(record["replay/query_noise_seeds"], seeds)
        assert np.asarray(record["replay/executed_actions"]).shape == (MAX_STEPS, 7)
        assert np.asarray(record["replay/query_sim_states"]).shape[0] == MAX_STEPS // 5
    # the two scenes differ (else nothing below could fail)
    assert not np.array_equal(reference[0]["images/image"], reference[1]["images/image"])

    # episode 1 alone in a fresh folder (its env's first reset), then a resume runs episode 0
    alone = tmp_path / "alone"
    collect(replace(full, out=alone, episodes="1"), progress=False)
    (alone_path,) = task_files(alone, "libero_goal")
    assert completed_episodes(alone_path) == {1}
    assert_same_episode(episode_record(alone_path, 1), reference[1])
    collect(replace(full, out=alone), progress=False)
    for k in range(2):
        assert_same_episode(episode_record(alone_path, k), reference[k])

    # episode 0 fails once (redone on a fresh env: the same), episode 1 every time (recorded)
    retried = replace(full, out=tmp_path / "retried")
    spec, tasks = plan_tasks(retried)
    resets: list[int] = []
    events: list[Event] = []

    def factory(task: Any) -> FailingEnv:
        return FailingEnv(make_env(task), resets, fail_on={1, 3, 4}, at=3 + 4)

    with LatentpiPolicyClient(server.url, KEY) as client:
        (job,) = make_jobs(retried, spec, tasks, client.metadata)
        collect_task(job, client, events.append, env_factory=factory)
    assert len(resets) == 4
    (retried_path,) = task_files(tmp_path / "retried", "libero_goal")
    assert_same_episode(episode_record(retried_path, 0), reference[0])
    failed = episode_record(retried_path, 1)
    with TaskFile(retried_path) as task:
        assert task.episode(1).attrs["error"] == "RuntimeError: injected simulation failure"
        assert task.episode(1).success is False
    assert failed["total_steps"] == 4 - 1  # the 4th policy step raised
    np.testing.assert_array_equal(failed["images/image"], reference[1]["images/image"][:1])
    np.testing.assert_array_equal(failed["actions"], reference[1]["actions"][:1])
    redone = [e for e in events if isinstance(e, EpisodeRedone)]
    assert [(e.episode_idx, e.reason.startswith("simulation error")) for e in redone] == [
        (0, True),
        (1, True),
    ]
    done = [e for e in events if isinstance(e, EpisodeDone)]
    assert [(e.episode_idx, e.error is not None) for e in done] == [(0, False), (1, True)]
    # the success table of the first run, written next to its task files
    table = json.loads((tmp_path / "full" / "libero_goal" / "success.json").read_text())
    assert [(row["task_id"], row["episodes"], row["errors"]) for row in table] == [
        (0, 2, 0),
        ("all", 2, 0),
    ]
    csv_lines = (tmp_path / "full" / "libero_goal" / "success.csv").read_text().splitlines()
    assert csv_lines[0] == "task_id,task_name,episodes,successes,success_rate,errors,file"

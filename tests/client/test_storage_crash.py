"""kill -9 of a writing process at chosen and at random moments loses no finished episode.

A child process writes episodes 0..N-1 (skipping completed ones, as the collector will) and
prints `done k` after each `finish`. Test-only hooks in the child pause it at a named point
(mid-episode, before an episode's publish, before/after the index replace, mid-consolidation) so the
parent can SIGKILL it exactly there; other runs are killed after random delays. Afterwards the
task file opens, every `done` episode is present exactly once with its data, and a resumed run
completes the rest.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from latentpi.client.storage import TaskFile, completed_episodes

EPISODES = 5
SAMPLES = 4

CHILD = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    import ml_dtypes
    from latentpi.client.rollout import EpisodeResult, Sample
    from latentpi.client.storage import TaskHeader, TaskWriter, writer as writer_module, files
    from latentpi.protocol import preset

    path, pause, consolidate = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    episodes, samples = int(sys.argv[4]), int(sys.argv[5])

    def mark(name):
        print(name, flush=True)
        if name == pause:
            print("PAUSED", flush=True)
            time.sleep(600)

    real_publish, real_replace, real_remove = writer_module.publish, os.replace, writer_module.remove

    def publish(tmp, final):
        mark("publish " + final.name)
        real_publish(tmp, final)

    def replace(src, dst):
        real_replace(src, dst)
        mark("replaced " + os.path.basename(dst))

    def remove(path):
        real_remove(path)
        mark("removed " + os.path.basename(path))

    writer_module.publish, files.os.replace, writer_module.remove = publish, replace, remove

    def sample(episode, index):
        rng = np.random.default_rng(100 * episode + index)
        hidden = rng.normal(size=(8, 48, 256)).astype(ml_dtypes.bfloat16)
        return Sample(index * 5, np.full((10, 7), episode + index / 10), np.full(8, float(episode)),
                      {"text_only_hidden_states": hidden}, {})

    header = TaskHeader(suite="libero_goal", task_id=1, task_name="open_the_drawer", instruction="open the drawer",
                        bddl_file="x.bddl", model_config="pi0_libero", checkpoint="ckpt", latent_spec=preset("default"))
    writer = TaskWriter(path, header)
    for episode in range(episodes):
        if episode in writer.completed:
            continue
        with writer.episode(episode, init_state_idx=episode, seed=7) as out:
            for index in range(samples):
                out.add(sample(episode, index))
                mark(f"sample {episode} {index}")
            out.finish(EpisodeResult(episode % 2 == 0, 5 * samples, samples, samples, 0.1, episode))
        print(f"done {episode}", flush=True)
    writer.close(consolidate=consolidate)
    print("closed", flush=True)
    """
)


def start(path: Path, pause: str = "", consolidate: bool = False) -> subprocess.Popen[str]:
    args = [
        sys.executable,
        "-c",
        CHILD,
        str(path),
        pause,
        "1" if consolidate else "0",
        str(EPISODES),
        str(SAMPLES),
    ]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_until_pause(path: Path, pause: str, consolidate: bool = False) -> set[int]:
    """Run the child until it reaches `pause`, SIGKILL it there; return the episodes it reported done."""
    child = start(path, pause, consolidate)
    done: set[int] = set()
    assert child.stdout is not None
    for line in child.stdout:
        if line.startswith("done "):
            done.add(int(line.split()[1]))
        if line.strip() == "PAUSED":
            break
    else:
        child.wait()
        pytest.fail(f"child never reached {pause!r}: {child.stderr.read() if child.stderr else ''}")
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    return done


def kill_after(path: Path, delay: float) -> set[int]:
    child = start(path)
    time.sleep(delay)
    os.kill(child.pid, signal.SIGKILL)
    out, _ = child.communicate()
    return {int(line.split()[1]) for line in out.splitlines() if line.startswith("done ")}


def run_to_end(path: Path, consolidate: bool = False) -> None:
    child = start(path, consolidate=consolidate)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert "closed" in out


def check(path: Path, must_have: set[int]) -> set[int]:
    """The file opens, holds each episode at most once with its own data, and every finished one."""
    completed = completed_episodes(path)
    assert must_have <= completed
    with TaskFile(path) as task:
        indices = [episode.index for episode in task.episodes]
        assert len(indices) == len(set(indices))
        assert set(indices) == completed
        for episode in task.episodes:
            assert episode.num_samples == SAMPLES and episode.success == (episode.index % 2 == 0)
            np.testing.assert_array_equal(
                episode["states"][:, 0], np.full(SAMPLES, float(episode.index))
            )
            expected = np.random.default_rng(100 * episode.index + SAMPLES - 1).normal(
                size=(8, 48, 256)
            )
            np.testing.assert_allclose(
                episode["text_only_hidden_states"][-1].astype(np.float32),
                expected,
                rtol=1e-2,
                atol=1e-2,
            )
    return completed


# (pause point, consolidate): each a moment where a half-done write is on disk.
PAUSES = [
    ("sample 0 2", False),  # first episode half written, no episode complete yet
    ("sample 2 1", False),  # mid-episode, episodes 0 and 1 complete
    ("publish episode_0001.h5", False),  # episode file closed, not yet renamed
    (
        "publish task_1_open_the_drawer.h5",
        False,
    ),  # episode renamed, new index written, not replaced
    ("replaced task_1_open_the_drawer.h5", False),  # index replaced, folder not yet fsynced
    ("replaced episode_0003.h5", False),  # episode renamed, index not yet rewritten
    ("removed episode_0001.h5", True),  # consolidated file in place, episode files half removed
]


@pytest.mark.parametrize(("pause", "consolidate"), PAUSES)
def test_kill_at_a_chosen_moment_then_resume(tmp_path: Path, pause: str, consolidate: bool) -> None:
    path = tmp_path / "libero_goal" / "task_1_open_the_drawer.h5"
    done = run_until_pause(path, pause, consolidate)
    if path.exists() or done:
        check(path, done)
    run_to_end(path, consolidate=True)
    assert check(path, set(range(EPISODES))) == set(range(EPISODES))
    assert not path.with_name(path.name + ".d").exists()


def test_kill_at_random_moments_then_resume(tmp_path: Path) -> None:
    path = tmp_path / "libero_goal" / "task_1_open_the_drawer.h5"
    rng = random.Random(0)
    for _ in range(4):
        done = kill_after(path, rng.uniform(0.8, 2.5))
        if path.exists():
            check(path, done)
    run_to_end(path)
    assert check(path, set(range(EPISODES))) == set(range(EPISODES))

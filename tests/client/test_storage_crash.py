"""kill -9 of a writing process at the N-th occurrence of each storage moment, and at random
moments, loses no finished episode.

A child process writes episodes [first, last) (skipping completed ones, as the collector does) and
prints `done k` after each `finish`. Test-only hooks count every storage moment (a sample added, a
file about to be published, a replace done, a file removed) and pause the child at the N-th
occurrence of a named one, so the parent SIGKILLs it exactly there — after asserting that the
child is alive and has published exactly the episodes expected at that moment (no kill lands on a
finished process or before any episode exists, unless that is the moment under test). Afterwards
the task file opens, every finished episode is present exactly once with its data, and a resumed
run completes the rest.
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
TASK = "task_1_open_the_drawer.h5"

CHILD = textwrap.dedent(
    """
    import collections, os, sys, time
    import numpy as np
    import ml_dtypes
    from latentpi.client.rollout import EpisodeResult, Sample
    from latentpi.client.storage import TaskHeader, TaskWriter, writer as writer_module, files
    from latentpi.protocol import preset

    path, pause, consolidate = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    first, last, samples = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    sample_sleep = float(sys.argv[7])
    seen = collections.Counter()

    def mark(name):
        seen[name] += 1
        label = f"{name} #{seen[name]}"
        print(label, flush=True)
        if label == pause:
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
    real_link = os.link
    def link(src, dst):
        real_link(src, dst)
        mark("linked " + os.path.basename(dst))
    writer_module.os.link = link  # the unpack

    def sample(episode, index):
        rng = np.random.default_rng(100 * episode + index)
        hidden = rng.normal(size=(8, 48, 256)).astype(ml_dtypes.bfloat16)
        return Sample(index * 5, np.full((10, 7), episode + index / 10), np.full(8, float(episode)),
                      {"text_only_hidden_states": hidden}, {})

    header = TaskHeader(suite="libero_goal", task_id=1, task_name="open_the_drawer", instruction="open the drawer",
                        bddl_file="x.bddl", model_config="pi0_libero", checkpoint="ckpt", latent_spec=preset("default"))
    writer = TaskWriter(path, header)
    print("started", flush=True)
    for episode in range(first, last):
        if episode in writer.completed:
            continue
        with writer.episode(episode, init_state_idx=episode, seed=7) as out:
            for index in range(samples):
                time.sleep(sample_sleep)
                out.add(sample(episode, index))
                mark("sample")
            out.finish(EpisodeResult(episode % 2 == 0, 5 * samples, samples, samples, 0.1, episode))
        print(f"done {episode}", flush=True)
    writer.close(consolidate=consolidate)
    print("closed", flush=True)
    """
)


def start(
    path: Path,
    pause: str = "",
    consolidate: bool = False,
    episodes: tuple[int, int] = (0, EPISODES),
    sample_sleep: float = 0.0,
) -> subprocess.Popen[str]:
    args = [sys.executable, "-c", CHILD, str(path), pause, "1" if consolidate else "0"]
    args += [str(episodes[0]), str(episodes[1]), str(SAMPLES), str(sample_sleep)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_until_pause(
    path: Path, pause: str, consolidate: bool, episodes: tuple[int, int]
) -> tuple[set[int], set[int]]:
    """Run the child to the N-th occurrence `pause`, check it is alive there, SIGKILL it; the
    episodes it reported done and those published on disk at the moment of the kill."""
    child = start(path, pause, consolidate, episodes)
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
    assert child.poll() is None, "the child must be alive, mid-work, when it is killed"
    published = completed_episodes(path)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    return done, published


def run_to_end(
    path: Path, consolidate: bool = False, episodes: tuple[int, int] = (0, EPISODES)
) -> None:
    child = start(path, consolidate=consolidate, episodes=episodes)
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


# (moment "#N", consolidate, episodes done by this run when it is killed, published on disk then).
# Index writes: #1 is the recovery at open, #k+1 follows episode k-1's publish; with consolidation
# the (EPISODES + 2)-th `publish TASK` is the self-contained file.
PAUSES = [
    ("sample #10", False, {0, 1}, {0, 1}),  # mid-episode 2
    ("publish episode_0001.h5 #1", False, {0}, {0}),  # episode 1 closed, not yet renamed
    (f"publish {TASK} #3", False, {0}, {0, 1}),  # episode 1 renamed, new index not yet replaced
    (f"replaced {TASK} #3", False, {0}, {0, 1}),  # index replaced, folder not yet fsynced
    ("replaced episode_0003.h5 #1", False, {0, 1, 2}, {0, 1, 2, 3}),  # renamed, not yet indexed
    (f"publish {TASK} #{EPISODES + 2}", True, set(range(EPISODES)), set(range(EPISODES))),
    (f"replaced {TASK} #{EPISODES + 2}", True, set(range(EPISODES)), set(range(EPISODES))),
    ("removed episode_0001.h5 #1", True, set(range(EPISODES)), set(range(EPISODES))),
]


@pytest.mark.parametrize(("pause", "consolidate", "done", "published"), PAUSES)
def test_kill_at_the_nth_moment_then_resume(
    tmp_path: Path, pause: str, consolidate: bool, done: set[int], published: set[int]
) -> None:
    path = tmp_path / "libero_goal" / TASK
    reported, on_disk = run_until_pause(path, pause, consolidate, (0, EPISODES))
    assert (reported, on_disk) == (done, published)
    check(path, done | published)
    run_to_end(path, consolidate=True)
    assert check(path, set(range(EPISODES))) == set(range(EPISODES))
    assert not path.with_name(path.name + ".d").exists()


@pytest.mark.parametrize(
    "pause",
    [
        "linked base_0000.h5 #1",  # unpack: the consolidated file linked, index not yet rewritten
        f"publish {TASK} #1",  # unpack: the new index written, not yet replaced
        "sample #2",  # the first new episode half written next to the base file
    ],
)
def test_kill_while_extending_a_consolidated_task(tmp_path: Path, pause: str) -> None:
    path = tmp_path / "libero_goal" / TASK
    run_to_end(path, consolidate=True, episodes=(0, 3))
    reported, on_disk = run_until_pause(path, pause, False, (0, EPISODES))
    assert (reported, on_disk) == (set(), {0, 1, 2})  # alive, mid-unpack, nothing new yet
    check(path, {0, 1, 2})
    run_to_end(path, consolidate=True)
    assert check(path, set(range(EPISODES))) == set(range(EPISODES))


def test_kill_at_random_moments_then_resume(tmp_path: Path) -> None:
    """Kills at random times while the child provably works: each lands on a live child (after
    its start, before its end), and together they cut runs with episodes already published."""
    path = tmp_path / "libero_goal" / TASK
    rng = random.Random(0)
    published_at_kills = []
    for _ in range(4):
        child = start(path, sample_sleep=0.15)  # >= 0.6 s an episode: the run outlasts the kill
        assert child.stdout is not None
        while child.stdout.readline().strip() != "started":  # recovery's moments come first
            assert child.poll() is None
        time.sleep(rng.uniform(0.2, 1.4))
        assert child.poll() is None, "the kill must land on a working child"
        os.kill(child.pid, signal.SIGKILL)
        out, _ = child.communicate()
        done = {int(line.split()[1]) for line in out.splitlines() if line.startswith("done ")}
        published_at_kills.append(len(completed_episodes(path)))
        check(path, done)
    assert published_at_kills[-1] >= 1 and published_at_kills[-1] < EPISODES
    run_to_end(path)
    assert check(path, set(range(EPISODES))) == set(range(EPISODES))

"""`--backend ray` on a real Ray cluster on loopback: a head and a second node process, two real
pi0_tiny servers, real LIBERO. One server and the second node are killed mid-run; every episode is
written exactly once and equals the same episode collected by the local backend."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from latentpi.client.collect import CollectOptions, collect
from latentpi.client.collect.events import EpisodeDone, EpisodeRedone, Event
from latentpi.client.server_process import EmbeddedServer
from latentpi.client.storage import TaskFile, completed_episodes

pytestmark = pytest.mark.slow

KEY = "ray-test-key"
TRIALS = 4
# batch 1: a request's answer must not depend on what else the server batched with it
SERVER_ARGS = ["--max-batch", "1", "--warmup-batch-sizes", "1"]
OBJECT_STORE_BYTES = 200 << 20


@pytest.fixture(scope="module")
def servers() -> Iterator[list[EmbeddedServer]]:
    started = [EmbeddedServer("pi0_tiny", api_key=KEY, extra_args=SERVER_ARGS) for _ in range(2)]
    try:
        for server in started:
            server.wait_ready()
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    head = {"num_cpus": 2, "object_store_memory": OBJECT_STORE_BYTES}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE_BYTES)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def episode_arrays(path: Path) -> dict[int, dict[str, np.ndarray]]:
    with TaskFile(path) as task:
        indices = [episode.index for episode in task.episodes]
        assert indices == sorted(set(indices))  # each episode once
        return {
            episode.index: {
                "env_seed": np.asarray(episode.attrs["env_seed"]),
                **{name: episode[name][()] for name in episode.names},
            }
            for episode in task.episodes
        }


def test_ray_backend_survives_a_server_and_a_node_killed_mid_run(
    servers: list[EmbeddedServer], cluster: Cluster, tmp_path: Path
) -> None:
    base = CollectOptions(
        suite="libero_goal", out=tmp_path / "local", tasks="0", trials=TRIALS, max_steps=10,
        stride=5, num_steps_wait=3, server=servers[0].url, api_key=KEY, save_images=True,
    )  # fmt: skip
    on_ray = replace(
        base,
        out=tmp_path / "ray",
        backend="ray",
        ray_address=cluster.address,
        more_servers=(servers[1].url,),
        workers=2,
    )
    (worker_node,) = [node for node in cluster.list_all_nodes() if node is not cluster.head_node]
    events: list[Event] = []
    killer: list[threading.Thread] = []

    def kill_node_soon() -> None:
        time.sleep(3.0)  # both actors are mid-episode (an episode takes longer than this)
        cluster.remove_node(worker_node, allow_graceful=False)

    def on_event(event: Event) -> None:
        events.append(event)
        done = [e for e in events if isinstance(e, EpisodeDone)]
        if isinstance(event, EpisodeDone) and len(done) == 1:
            servers[1].process.kill()  # one actor was using it
            killer.append(threading.Thread(target=kill_node_soon))
            killer[0].start()

    collect(on_ray, on_event=on_event, progress=False)
    killer[0].join()
    assert servers[1].process.poll() is not None and not worker_node.any_processes_alive()
    redone = [e.reason for e in events if isinstance(e, EpisodeRedone)]
    # Which reason shows is a race: the actor using the killed server reports it after
    # SERVER_GIVE_UP_S (10 s) unless it lives on the node killed 3 s in, which makes it "actor
    # lost". Either way the episode is redone, and once, which is what matters here.
    allowed = ("server lost: " + servers[1].url, "actor lost: ")
    assert redone and all(reason.startswith(allowed) for reason in redone), redone
    done = [e.episode_idx for e in events if isinstance(e, EpisodeDone)]
    assert sorted(done) == list(range(TRIALS))  # each written once
    # the actor on the lost node was restarted elsewhere (Ray's own retry reran its episode)
    actors = list_actors(filters=[("class_name", "=", "EpisodeRunner")], detail=True)
    assert len(actors) == 2 and max(actor.num_restarts for actor in actors) >= 1, actors

    collect(base, progress=False)
    (ray_path,) = (tmp_path / "ray" / "libero_goal").glob("task_*.h5")
    (local_path,) = (tmp_path / "local" / "libero_goal").glob("task_*.h5")
    assert completed_episodes(ray_path) == set(range(TRIALS))
    on_ray_arrays, local_arrays = episode_arrays(ray_path), episode_arrays(local_path)
    assert set(on_ray_arrays) == set(local_arrays) == set(range(TRIALS))
    for k, arrays in local_arrays.items():
        assert set(on_ray_arrays[k]) == set(arrays)
        for name, array in arrays.items():
            np.testing.assert_array_equal(on_ray_arrays[k][name], array, err_msg=f"{k} {name}")
    with TaskFile(ray_path) as task:
        assert task.attrs["arguments"]["backend"] == "ray"
        assert task.attrs["arguments"]["servers"] == [servers[0].url, servers[1].url]

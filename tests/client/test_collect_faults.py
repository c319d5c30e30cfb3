"""Collector faults (issue 14), on a real `latentpi collect` against a real pi0_tiny `latentpi serve`
on a fixed loopback port, real LIBERO (libero_object task 0, two trials of 6 env steps and one
query), real HDF5:

- SIGKILL at KILLS moments drawn from a seeded RNG over the whole life of a run (env steps, policy
  queries, episode writes, recovery at open, consolidation), resuming after each: no finished
  episode is lost or changed, none is written twice, and the end result is the clean run's, bit for
  bit;
- the server SIGKILLed and restarted mid-episode: the collector backs off, reconnects, redoes the
  episode and finishes, equal to a clean run; a server back as another model is refused;
- the output volume full (a small tmpfs): a clear error, every earlier episode intact, no partial
  file left, and the resume completes once there is space;
- the Ray driver SIGKILLed: its local Ray goes with it, and the local backend finishes the run.

Each collector run is the CLI's entry point in a process forked from tests/client/
collect_forkserver.py (imports done once), whose hooks name every moment and pause the collector at
a chosen one for its SIGKILL. `LATENTPI_COLLECT_KILLS` sets the number of kills (default 20).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from restartable_server import RestartableServer

from latentpi.client.collect.disk import no_space_message
from latentpi.client.rollout import EpisodeResult, Sample
from latentpi.client.storage import TaskFile, TaskHeader, TaskWriter, completed_episodes
from latentpi.protocol import preset

pytestmark = pytest.mark.slow

KEY = "faults-key"
SUITE = "libero_object"
TRIALS = 2
KILLS = int(os.environ.get("LATENTPI_COLLECT_KILLS", "20"))
SEED = 14
# batch 1: an answer must not depend on what the server batched it with (runs are compared bit for
# bit); the run's latent spec compiled at start-up, so no request waits for a compile
SERVER_ARGS = ["--max-batch", "1", "--warmup-batch-sizes", "1", "--warmup-latents", "default"]
FORKSERVER = Path(__file__).with_name("collect_forkserver.py")
PHASES = ("env step", "policy query", "episode write", "resume", "consolidation")
# the fork server's moment labels by phase (its module doc); an episode starts with its env reset
MOMENT_PHASES = (
    (re.compile(r"ep\d+:(reset|step#\d+)$"), "env step"),
    (re.compile(r"ep\d+:query#\d+$"), "policy query"),
    (re.compile(r"ep\d+:(sample#\d+|(write|publish|replaced|removed) .+)$"), "episode write"),
    (re.compile(r"consolidation:.+$"), "consolidation"),
    (re.compile(r"resume#\d+$"), "resume"),
)


def phase_of(label: str) -> str:
    for pattern, phase in MOMENT_PHASES:
        if pattern.match(label):
            return phase
    raise ValueError(f"no phase for moment {label!r}")


# -- the server and the fork server ------------------------------------------------------------------
@dataclass
class Run:
    """One collector process: its events (moments), its log, its exit."""

    forkserver: ForkServer
    pid: int
    events: Path
    log: Path
    started: float = field(default_factory=time.monotonic)
    _read: int = 0
    labels: list[str] = field(default_factory=list)

    def new_lines(self) -> list[str]:
        if not self.events.exists():
            return []
        with self.events.open("rb") as f:
            f.seek(self._read)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits
        self._read += len(complete)
        return complete.decode().splitlines()

    def until_paused(self, timeout: float = 600) -> str | None:
        """The label the child paused at; None if it exited first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.new_lines():
                kind, _, rest = line.partition(" ")
                if kind == "moment":
                    self.labels.append(rest.split("\t")[0])
                elif kind == "PAUSED":
                    return rest
            if self.forkserver.exited(self.pid):
                self.labels += [
                    line.split(" ", 1)[1].split("\t")[0]
                    for line in self.new_lines()
                    if line.startswith("moment ")
                ]
                return None
            time.sleep(0.01)
        raise TimeoutError(f"collector {self.pid} neither paused nor exited: {self.log_text()}")

    def go_on(self) -> None:
        os.kill(self.pid, signal.SIGUSR1)

    def kill(self) -> str:
        assert alive(self.pid), "the kill must land on a live collector"
        os.kill(self.pid, signal.SIGKILL)
        return self.forkserver.wait(self.pid)

    def finish(self, timeout: float = 600) -> str:
        """Run to the end (no pause expected); its exit ('code C' / 'signal S')."""
        assert self.until_paused(timeout) is None, "paused where no pause was asked for"
        return self.forkserver.wait(self.pid)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class ForkServer:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.process = subprocess.Popen(
            [sys.executable, str(FORKSERVER), SUITE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True).start()
        assert self.lines.get(timeout=600) == "ready"
        self.runs = 0
        self.current = 0  # the run in progress (one at a time: an exit line is its), else 0
        self.exits: dict[int, str] = {}

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.put(line.strip())

    def start(
        self,
        argv: list[str],
        out: Path,
        pause: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> Run:
        if self.current and not self.exited(self.current):  # left paused by a failed test
            os.kill(self.current, signal.SIGKILL)
            self.wait(self.current)
        self.runs += 1
        events = self.folder / f"run_{self.runs:03d}.events"
        log = self.folder / f"run_{self.runs:03d}.log"
        request = {"argv": argv, "events": str(events), "log": str(log), "out": str(out)}
        request["env"] = env or {}
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({**request, "pause": list(pause)}) + "\n")
        self.process.stdin.flush()
        kind, pid = self.lines.get(timeout=60).split()
        assert kind == "pid"
        self.current = int(pid)
        return Run(self, self.current, events, log)

    def exited(self, pid: int) -> bool:
        self._collect()
        return pid in self.exits

    def wait(self, pid: int, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while pid not in self.exits and time.monotonic() < deadline:
            self._collect(0.05)
        if pid == self.current:
            self.current = 0
        return self.exits.pop(pid)

    def _collect(self, timeout: float = 0.0) -> None:
        try:
            line = self.lines.get(timeout=timeout) if timeout else self.lines.get_nowait()
        except queue.Empty:
            return
        assert line.startswith("exit "), line
        self.exits[self.current] = line[len("exit ") :]

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def server() -> Iterator[RestartableServer]:
    shared = RestartableServer(KEY, SERVER_ARGS)
    yield shared
    shared.stop()


@pytest.fixture(scope="module")
def forkserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    started = ForkServer(tmp_path_factory.mktemp("runs"))
    yield started
    started.close()


def collect_args(out: Path, server: RestartableServer, *extra: str) -> list[str]:
    return [
        "--suite", SUITE, "--tasks", "0", "--trials", str(TRIALS), "--max-steps", "5",
        "--num-steps-wait", "1", "--stride", "5", "--out", str(out), "--server", server.url,
        "--api-key", KEY, "--retry-timeout", "600", *extra,
    ]  # fmt: skip


def start(
    forkserver: ForkServer, out: Path, server: RestartableServer, pause: tuple[str, ...] = ()
) -> Run:
    return forkserver.start(collect_args(out, server), out, pause)


def task_path(out: Path) -> Path:
    (path,) = (out / SUITE).glob("task_*.h5")
    return path


def digests(out: Path) -> dict[int, str]:
    """Each readable episode's content: its arrays' bytes and the attributes that must repeat (not
    its wall time); each episode index at most once."""
    paths = list((out / SUITE).glob("task_*.h5")) if (out / SUITE).exists() else []
    if not paths:
        return {}
    (path,) = paths
    found: dict[int, str] = {}
    with TaskFile(path) as task:
        for episode in task.episodes:
            assert episode.index not in found, f"episode {episode.index} twice"
            digest = hashlib.sha256()
            for key in ("env_seed", "init_state_idx", "total_steps", "num_queries", "success"):
                digest.update(f"{key}={episode.attrs[key]};".encode())
            for name in episode.names:
                array = np.ascontiguousarray(episode[name][()])
                digest.update(f"{name}:{array.dtype}:{array.shape};".encode())
                digest.update(array.tobytes())
            found[episode.index] = digest.hexdigest()
    assert set(found) == completed_episodes(path)  # what the reader sees is what is published
    return found


@dataclass(frozen=True)
class Clean:
    labels: list[str]  # the moments of a run from nothing to the end, in order
    digests: dict[int, str]
    seconds: float


@pytest.fixture(scope="module")
def clean(
    server: RestartableServer, forkserver: ForkServer, tmp_path_factory: pytest.TempPathFactory
) -> Clean:
    out = tmp_path_factory.mktemp("clean")
    run = start(forkserver, out, server)
    assert run.finish() == "code 0", run.log_text()
    found = digests(out)
    assert sorted(found) == list(range(TRIALS))
    return Clean(run.labels, found, time.monotonic() - run.started)


# -- SIGKILL at random moments -----------------------------------------------------------------------
def next_start(label: str, labels: list[str]) -> int:
    """Where in the clean run's moments the next run goes on after a kill at `label`: episode k
    is redone from its reset unless its file was already renamed into place (then it is done);
    consolidation is redone unless its file already replaced the index (then nothing is left)."""
    position = labels.index(label)
    if label.startswith("consolidation:"):
        replaced = next(i for i, x in enumerate(labels) if x.startswith("consolidation:replaced"))
        first = next(i for i, x in enumerate(labels) if x.startswith("consolidation:"))
        return len(labels) if position >= replaced else first
    k = int(label[2 : label.index(":")])
    if position >= labels.index(f"ep{k}:replaced episode_{k:04d}.h5"):
        return (
            position
            + 1
            + next(i for i, x in enumerate(labels[position + 1 :]) if not x.startswith(f"ep{k}:"))
        )
    return labels.index(f"ep{k}:reset")


def reachable(sequence: list[str], labels: list[str]) -> bool:
    start_at = 0
    for label in sequence:
        if labels.index(label) < start_at:
            return False
        start_at = next_start(label, labels)
    return True


def plan_kills(labels: list[str], kills: int, rng: random.Random) -> list[str]:
    """`kills` moments in the order runs reach them: every phase at least once (when kills >= 5),
    the rest drawn phase by phase; each moment drawn among the clean run's moments of its phase
    (with repeats), re-drawn while a run could not reach it after the kills before it. Recovery
    moments (`resume#N`, N <= 3: every run's recovery has that many before consolidation is done)
    go at random places before the first consolidation kill."""
    phases = [*PHASES][:kills] + [rng.choice(PHASES) for _ in range(kills - len(PHASES))]
    rng.shuffle(phases)
    candidates = {p: [x for x in labels if phase_of(x) == p] for p in PHASES if p != "resume"}
    sequence: list[str] = []
    for phase in (p for p in phases if p != "resume"):
        for _ in range(1000):
            drawn = sorted([*sequence, rng.choice(candidates[phase])], key=labels.index)
            if reachable(drawn, labels):
                sequence = drawn
                break
        else:
            raise AssertionError(f"no reachable {phase} moment after {sequence}")
    before_consolidation = next(
        (i for i, x in enumerate(sequence) if x.startswith("consolidation:")), len(sequence)
    )
    for _ in range(phases.count("resume")):
        sequence.insert(rng.randint(0, before_consolidation), f"resume#{rng.randint(1, 3)}")
        before_consolidation += 1
    return sequence


def published(labels: list[str]) -> Counter[int]:
    """Episodes whose file a run renamed into place (published)."""
    found = (re.fullmatch(r"ep(\d+):replaced episode_\d+\.h5", label) for label in labels)
    return Counter(int(match.group(1)) for match in found if match)


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(
    server: RestartableServer, forkserver: ForkServer, clean: Clean, tmp_path: Path
) -> None:
    plan = plan_kills(clean.labels, KILLS, random.Random(SEED))
    out = tmp_path / "out"
    seen: dict[int, str] = {}  # every episode ever found complete, and its content
    renames: Counter[int] = Counter()
    kills: Counter[str] = Counter()
    seconds: Counter[str] = Counter()
    began = time.monotonic()
    for label in plan:
        run = start(forkserver, out, server, pause=(label,))
        assert run.until_paused() == label, f"never reached {label}: {run.log_text()[-3000:]}"
        before = digests(out)  # what is published at the moment of the kill
        assert run.kill() == f"signal {signal.SIGKILL}"
        after = digests(out)
        assert after == before, f"killed at {label}"  # the kill neither loses nor adds an episode
        assert all(after.get(k) == digest for k, digest in seen.items()), f"lost at {label}"
        assert all(clean.digests[k] == digest for k, digest in after.items()), label
        seen.update(after)
        renames += published(run.labels)
        kills[phase_of(label)] += 1
        seconds[phase_of(label)] += time.monotonic() - run.started
    final = start(forkserver, out, server)
    assert final.finish() == "code 0", final.log_text()
    renames += published(final.labels)
    assert digests(out) == clean.digests  # the clean run's episodes, bit for bit
    assert renames == Counter(range(TRIALS)), renames  # each episode published exactly once
    assert not task_path(out).with_name(task_path(out).name + ".d").exists()  # consolidated
    assert len(plan) == KILLS and (len(PHASES) > KILLS or set(kills) == set(PHASES))
    record = {
        "kills": len(plan),
        "per_phase": dict(kills),
        "seconds_per_phase": {p: round(s, 1) for p, s in seconds.items()},
        "episodes_lost": 0,
        "duplicates": 0,
        "clean_run_s": round(clean.seconds, 1),
        "total_s": round(time.monotonic() - began, 1),
        "moments": plan,
    }
    print(f"\ncollector kills: {json.dumps(record)}")


# -- the server killed and restarted ------------------------------------------------------------------
def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


# episode 0 is published and episode 1 settled: its first request comes next
BEFORE_A_REQUEST = "ep1:step#1"


def test_server_killed_and_restarted_mid_episode(
    server: RestartableServer, forkserver: ForkServer, clean: Clean, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    before = server.metadata()
    run = start(forkserver, out, server, pause=(BEFORE_A_REQUEST,))
    assert run.until_paused() == BEFORE_A_REQUEST
    server.kill()  # SIGKILL: its connection to the collector drops with it
    run.go_on()
    # the request finds no server: the collector backs off while nothing listens on the port
    assert wait_for(lambda: "retrying ws://" in run.log_text(), 120), run.log_text()
    # the same model on the same port, back with a host setting changed: it says how the server
    # runs, not which model (collect/identity.py), and with batch 1 the numbers are the same
    server.restart("pi0_tiny", "--batch-invariant", "off")
    after = server.metadata()
    assert before["config"]["batch_invariant"] and not after["config"]["batch_invariant"]
    assert run.finish() == "code 0", run.log_text()
    log = run.log_text()
    assert "lost during a request" in log and f"reconnected to {server.url}" in log
    assert "task 0 episode 1: connection to" in log and "redoing the episode" in log
    assert "1 episode(s) redone after a lost connection" in log
    assert run.labels.count("ep1:reset") == 2  # episode 1 was redone from its start ...
    assert digests(out) == clean.digests  # ... and is the clean run's episode 1, bit for bit
    assert published(run.labels) == Counter(range(TRIALS))


# -- the output volume full ---------------------------------------------------------------------------
@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (root: here and in CI)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (the disk-full test runs as root in CI)")
    folder = tmp_path / "volume"
    folder.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)]
    done = subprocess.run(mount, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=False)


def resize(folder: Path, size: int) -> None:
    kib = -(-size // 4096) * 4  # whole pages
    subprocess.run(["mount", "-o", f"remount,size={kib}k", str(folder)], check=True)


def used(folder: Path) -> int:
    stat = os.statvfs(folder)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.rglob("*.tmp"))


def assert_stopped_for_space(run: Run, out: Path) -> None:
    assert run.finish() == "code 1", run.log_text()
    log = run.log_text()
    assert "latentpi collect: stopped (DiskFull): no space left on device writing " in log
    assert f"(output folder {out}: " in log and "run the same command to resume" in log
    assert "Traceback" not in log, log


def test_a_full_disk_leaves_no_partial_file_and_the_message_says_where(volume: Path) -> None:
    """Storage alone (no simulation): episodes written until the volume is full, then the
    consolidated copy. The error is the failed write's ENOSPC (not a later failed close's), no
    temporary file (episode, index, consolidated copy) is left holding the space, every published
    episode reads back, and the message names the file and the output folder."""
    path = volume / "libero_goal" / "task_1_open_the_drawer.h5"
    header = TaskHeader(
        suite="libero_goal", task_id=1, task_name="open_the_drawer", instruction="open it",
        bddl_file="x.bddl", model_config="pi0_libero", checkpoint="ckpt",
        latent_spec=preset("default"),
    )  # fmt: skip
    done: list[int] = []
    with TaskWriter(path, header, compression="none") as writer:
        with pytest.raises(OSError) as full:
            for k in range(100):  # 2 MiB an episode: the 4 MiB volume is full soon
                with writer.episode(k, init_state_idx=k, seed=7) as episode:
                    for i in range(2):
                        hidden = np.random.default_rng(k * 2 + i).normal(size=(2, 64, 1024))
                        episode.add(
                            Sample(5 * i, np.zeros((10, 7)), np.zeros(8), {"h": hidden}, {})
                        )
                    episode.finish(EpisodeResult(False, 10, 2, 2, 0.1, k))
                done.append(k)
        assert full.value.errno == errno.ENOSPC and len(done) >= 1
        message = no_space_message(full.value, volume)
        assert message is not None and f" writing {path.parent}/" in message, message
        assert f"(output folder {volume}: " in message
        assert leftovers(volume) == []
        with pytest.raises((OSError, RuntimeError)) as full:  # HDF5's copy: a RuntimeError
            writer.consolidate()  # a copy of everything: no room for it
        message = no_space_message(full.value, volume)
        assert message is not None and f" writing {path}.tmp " in message, full.value
        assert leftovers(volume) == []
    with TaskFile(path) as task:
        assert [episode.index for episode in task.episodes] == done
        for episode in task.episodes:
            expected = np.random.default_rng(episode.index * 2 + 1).normal(size=(2, 64, 1024))
            np.testing.assert_array_equal(episode["h"][-1], expected)


def test_a_full_output_volume_stops_clearly_and_resumes(
    server: RestartableServer, forkserver: ForkServer, clean: Clean, volume: Path
) -> None:
    out = volume / "out"
    run = start(forkserver, out, server, pause=("ep1:reset",))
    assert run.until_paused() == "ep1:reset"
    path = task_path(out)
    folder = path.with_name(path.name + ".d")
    episode_bytes, index_bytes = (folder / "episode_0000.h5").stat().st_size, path.stat().st_size
    resize(volume, used(volume) + 8192)  # nearly full: episode 1 cannot be written
    run.go_on()
    assert_stopped_for_space(run, out)
    assert digests(out) == {0: clean.digests[0]}  # episode 0 intact and readable
    assert (
        leftovers(out / SUITE) == []
    )  # episode 1's partial file is gone, not left as a half episode

    # room for episode 1 and its index, not for the consolidated copy of both
    resize(volume, used(volume) + episode_bytes + 2 * index_bytes + 16384)
    run = start(forkserver, out, server)
    assert_stopped_for_space(run, out)
    assert "consolidation:publish" not in " ".join(run.labels)  # it failed while copying
    assert digests(out) == clean.digests and folder.is_dir()  # both episodes, from their files
    assert leftovers(out / SUITE) == []

    resize(volume, 4 << 20)
    run = start(forkserver, out, server)
    assert run.finish() == "code 0", run.log_text()
    assert not any(label.startswith("ep") for label in run.labels)  # nothing was redone
    assert digests(out) == clean.digests and not folder.exists()  # consolidated


# -- the Ray driver SIGKILLed, then resumed by the local backend -------------------------------------
def descendants(pid: int) -> dict[int, str]:
    """Every process below `pid` and its command line."""
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                children = {int(child) for child in (task / "children").read_text().split()}
            except OSError:
                continue
            for child in children - set(found):
                try:
                    command = Path(f"/proc/{child}/cmdline").read_bytes()
                except OSError:
                    command = b"?"
                found[child] = command.replace(b"\0", b" ").decode(errors="replace").strip()[:120]
                todo.append(child)
    return found


RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def test_sigkill_of_the_ray_driver_then_resume_with_the_local_backend(
    server: RestartableServer, forkserver: ForkServer, clean: Clean, tmp_path: Path
) -> None:
    """The driver (the only writer under Ray) killed right after publishing its first episode
    (the other actor may be mid-episode): the local Ray it started goes with it (GCS, raylet, the
    actors and their LIBERO envs; Ray's dashboard and runtime-env agents poll for their raylet and
    leave about a minute later by themselves), the published episode stays, and the local backend
    finishes the run, equal to a clean run."""
    pytest.importorskip("ray")
    out = tmp_path / "out"
    indexed = tuple(x for x in clean.labels if re.fullmatch(r"ep\d+:replaced task_.+", x))
    ray_args = [*collect_args(out, server), "--backend", "ray", "--workers", "2"]
    ray_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    try:
        run = forkserver.start(ray_args, out, indexed, env={"RAY_TMPDIR": ray_dir})
        assert run.until_paused() in indexed, run.log_text()
        ray_processes = {
            pid: command
            for pid, command in descendants(run.pid).items()
            if not command.startswith(RAY_AGENTS)
        }
        commands = " ".join(ray_processes.values())
        assert "raylet" in commands and "EpisodeRunner" in commands, ray_processes
        published_then = digests(out)
        assert len(published_then) == 1
        assert run.kill() == f"signal {signal.SIGKILL}"
        left = lambda: {p: c for p, c in ray_processes.items() if alive(p)}  # noqa: E731
        assert wait_for(lambda: not left(), 30), f"Ray outlived its driver: {left()}"
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert digests(out) == published_then
    final = start(forkserver, out, server)
    assert final.finish() == "code 0", final.log_text()
    assert digests(out) == clean.digests
    (done,) = published_then
    assert not any(label.startswith(f"ep{done}:") for label in final.labels)  # kept, not redone


# -- last (the server stays pi05_tiny): the server comes back as another model -----------------------
def test_a_server_back_as_another_model_is_refused(
    server: RestartableServer, forkserver: ForkServer, clean: Clean, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run = start(forkserver, out, server, pause=(BEFORE_A_REQUEST,))
    assert run.until_paused() == BEFORE_A_REQUEST
    server.kill()
    server.restart("pi05_tiny")
    run.go_on()
    assert run.finish() == "code 1", run.log_text()
    log = run.log_text()
    assert (
        f"latentpi collect: stopped (ServerChanged): {server.url} came back as a different "
        "model: pi0 (pi0_tiny) before, pi05 (pi05_tiny) now"
    ) in log
    assert digests(out) == {0: clean.digests[0]} and leftovers(out / SUITE) == []

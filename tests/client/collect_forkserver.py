"""A fork server for tests/client/test_collect_faults.py: a real `latentpi collect` per request,
forked from a process that has imported the collector and LIBERO once (a fresh interpreter spends
~10-20 s on those imports; a fork, milliseconds), with test-only hooks naming every moment of the
run so the test can SIGKILL the collector exactly there.

Run as a script. It prints `ready`, then serves one JSON request per stdin line:
    {"argv": [...], "out": DIR, "events": PATH, "log": PATH, "pause": [LABEL, ...], "env": {...}}
It forks; the child runs `latentpi.cli.main(["collect", *argv])` (the CLI's own entry point, exit
codes included) with stdout/stderr to `log` and one line per moment to `events`; the server prints
`pid N`, waits for the child and prints `exit code C` or `exit signal S`.

Moments (one line each, `moment LABEL<TAB>what`), by the phase they belong to:
- `resume#N`: the N-th storage moment of this run's recovery at open (TaskWriter._recover: a
  leftover removed, the index written, replaced);
- `ep<k>:reset`, `ep<k>:step#i`: episode k's env reset and i-th env step (settle steps included);
- `ep<k>:query#i`: the i-th request of episode k sent, its answer not yet read;
- `ep<k>:sample#i`, `ep<k>:write <dataset>`, `ep<k>:publish|replaced <file>`: episode k's samples
  added, its datasets written (at `finish`), its file and the task index published;
- `consolidation:<what>`: an episode copied into the self-contained file, that file published,
  replaced, an episode file removed.
Episode labels restart with each attempt at the episode, so a label names the same point of the
same episode in whichever run reaches it. At a label listed in `pause` the child prints
`PAUSED LABEL` and waits (the first time only) for SIGUSR1 (then goes on) or its SIGKILL.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

SUITE = sys.argv[1] if len(sys.argv) > 1 else "libero_object"


def warm_up() -> None:
    """Everything a collect run imports, imported here once, and robosuite's numba functions
    compiled by a LIBERO env without a renderer (no GL context: GL state and its threads do not
    survive a fork; each run builds its own rendering env, as a real collector does)."""
    import h5py  # noqa: F401
    import websockets.sync.client  # noqa: F401

    import latentpi.client.cli.collect  # noqa: F401
    from latentpi.client.collect import run, task, workers  # noqa: F401
    from latentpi.client.libero_env import DUMMY_ACTION, import_libero, list_tasks, load_init_states

    import_libero()
    first = list_tasks(SUITE)[0]
    load_init_states(first)
    from libero.libero.envs.env_wrapper import ControlEnv

    env = ControlEnv(
        bddl_file_name=first.bddl_file, has_offscreen_renderer=False, use_camera_obs=False
    )
    env.reset()
    env.step(list(DUMMY_ACTION))
    env.close()


class Moments:
    """Names each moment of the run by its phase and pauses at the requested ones."""

    def __init__(self, stream: TextIO, pause: set[str], out: str) -> None:
        self.stream, self.pause, self.out = stream, pause, out
        self.context: tuple[str, int] | None = None  # ("resume"|"consolidation"|"episode", k)
        self.counts: collections.Counter[str] = collections.Counter()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})

    def mark(self, what: str, numbered: bool = False) -> None:
        if self.context is None:
            return
        phase, k = self.context
        if phase == "resume":
            self.counts["resume"] += 1
            label = f"resume#{self.counts['resume']}"
        else:
            prefix = f"ep{k}:" if phase == "episode" else "consolidation:"
            if numbered:
                self.counts[prefix + what] += 1
                what = f"{what}#{self.counts[prefix + what]}"
            label = prefix + what
        print(f"moment {label}\t{what}\t{time.time():.3f}", file=self.stream, flush=True)
        if label in self.pause:
            self.pause.discard(label)  # once: a redone episode goes through its labels again
            print(f"PAUSED {label}", file=self.stream, flush=True)
            signal.sigwait({signal.SIGUSR1})

    def inside(self, phase: str, k: int, function: Callable[..., Any]) -> Callable[..., Any]:
        """`function` run with this phase as the context (the previous one restored after)."""

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            before, self.context = self.context, (phase, k)
            try:
                return function(*args, **kwargs)
            finally:
                self.context = before

        return wrapped


def install(moments: Moments) -> None:
    """Wrap the collector's storage, env and client at the moments named in the module doc."""
    import h5py
    from websockets.sync.client import ClientConnection

    from latentpi.client.libero_env import import_libero
    from latentpi.client.storage import files
    from latentpi.client.storage import writer as writer_module

    def inside_out(path: Any) -> bool:
        return str(path).startswith(moments.out)

    real_publish, real_remove, real_replace = files.publish, writer_module.remove, os.replace
    real_write_rows, real_copy = writer_module.write_rows, h5py.Group.copy

    def publish(tmp: Path, final: Path) -> None:
        moments.mark(f"publish {final.name}")
        real_publish(tmp, final)

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        real_replace(src, dst, **kwargs)
        if inside_out(dst):
            moments.mark(f"replaced {os.path.basename(dst)}")

    def remove(path: Path) -> None:
        real_remove(path)
        moments.mark(f"removed {path.name}")

    def write_rows(dataset: Any, start: int, rows: Any) -> None:
        real_write_rows(dataset, start, rows)
        moments.mark(f"write {dataset.name.split('/', 2)[-1]}")

    def copy(self: Any, source: Any, dest: Any, name: Any = None, **kwargs: Any) -> None:
        real_copy(self, source, dest, name=name, **kwargs)
        if moments.context is not None and moments.context[0] == "consolidation":
            moments.mark(f"copy {name}")

    writer_module.publish, writer_module.remove, os.replace = publish, remove, replace
    writer_module.write_rows, h5py.Group.copy = write_rows, copy
    task_writer, episode_writer = writer_module.TaskWriter, writer_module.EpisodeWriter
    task_writer._recover = moments.inside("resume", -1, task_writer._recover)
    task_writer.consolidate = moments.inside("consolidation", -1, task_writer.consolidate)
    real_episode = task_writer.episode

    def episode(self: Any, episode_idx: int, **kwargs: Any) -> Any:
        moments.context = ("episode", episode_idx)
        moments.counts = collections.Counter({"resume": moments.counts["resume"]})
        return real_episode(self, episode_idx, **kwargs)

    task_writer.episode = episode
    real_add = episode_writer.add

    def add(self: Any, sample: Any) -> None:
        real_add(self, sample)
        moments.mark("sample", numbered=True)

    episode_writer.add = add
    for name in ("finish", "abort"):  # the episode's moments end with it
        setattr(episode_writer, name, _then_no_context(moments, getattr(episode_writer, name)))
    _, _, env_class = import_libero()
    real_reset, real_step = env_class.reset, env_class.step

    def reset(self: Any) -> Any:
        observation = real_reset(self)
        moments.mark("reset")
        return observation

    def step(self: Any, action: Any) -> Any:
        result = real_step(self, action)
        moments.mark("step", numbered=True)
        return result

    env_class.reset, env_class.step = reset, step
    real_send = ClientConnection.send

    def send(self: Any, message: Any, *args: Any, **kwargs: Any) -> None:
        real_send(self, message, *args, **kwargs)
        if moments.context is not None and moments.context[0] == "episode":
            moments.mark("query", numbered=True)

    ClientConnection.send = send


def _then_no_context(moments: Moments, function: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        finally:
            moments.context = None

    return wrapped


def child(request: dict[str, Any], server_pid: int) -> int:
    from latentpi.cli import main
    from latentpi.client.server_process import die_with_parent

    die_with_parent(server_pid)
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    events = open(request["events"], "a", buffering=1)  # noqa: SIM115 - the process ends with it
    out = str(Path(request["out"]).resolve())
    os.environ.update(request.get("env", {}))
    install(Moments(events, set(request["pause"]), out))
    try:
        main(["collect", *request["argv"]])
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:
        traceback.print_exc()
        return 99
    return 0


def serve() -> None:
    from latentpi.client.server_process import die_with_parent

    die_with_parent(os.getppid())
    # the protocol gets its own copy of stdout; what libraries print goes to stderr
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    warm_up()
    print("ready", file=protocol)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 98
            try:
                protocol.close()  # EOF for the test as soon as this server is gone
                code = child(request, os.getppid())
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(f"pid {pid}", file=protocol)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            print(f"exit signal {os.WTERMSIG(status)}", file=protocol)
        else:
            print(f"exit code {os.WEXITSTATUS(status)}", file=protocol)


if __name__ == "__main__":
    serve()

"""What `latentpi collect` is asked to do, checked before anything starts.

Every check here runs before the server starts and before any simulation: an unknown suite, a task
range out of bounds, a stride of 0, an unwritable folder or an unreadable latent spec fail in
seconds, naming the argument, instead of after a model has loaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentpi.client.collect.seeding import SEEDING_SCHEME
from latentpi.client.libero_env import ENV_HORIZON, ENV_RESOLUTION, MAX_STEPS, SUITES
from latentpi.protocol.errors import ValidationError
from latentpi.protocol.latent_spec import PRESETS, LatentSpec

EMBEDDED = "embedded"
BACKENDS = ("local", "ray")
MAX_SPEC_BYTES = 1 << 20  # a spec file is a few hundred bytes; refuse to read a huge one


@dataclass(frozen=True)
class CollectOptions:
    """One collection: which tasks and trials, how to sample, where to write, which server."""

    suite: str
    out: Path
    tasks: str | None = None  # "A:B", Python-style; None = every task of the suite
    trials: int = 50
    episodes: str | None = None  # "A:B" or "A": only these of the trials (None = all of them)
    max_steps: int | None = None  # None = the suite's (openpi's) horizon
    stride: int = 5
    server: str = EMBEDDED  # "embedded" or ws://HOST:PORT
    config: str = "pi0_tiny"  # the embedded server's configuration
    api_key: str | None = None
    workers: int = 1
    latents: str = "default"  # a preset name or a spec.json path
    seed: int = 7  # env.seed (openpi: 7)
    save_images: bool = False
    video: bool = False  # an mp4 per episode in DIR/<suite>/videos/
    replan_steps: int = 5
    num_steps_wait: int = 10
    episode_retries: int = 3  # an episode cut by a lost connection is redone this many times
    error_retries: int = 1  # an episode whose simulation raised is redone this often, then failed
    retry_timeout_s: float = 300.0  # how long a lost server is waited for (backoff)
    request_timeout_s: float | None = None  # a server silent this long counts as lost (ray: 300)
    compression: str = "lzf"
    backend: str = "local"  # "local" (processes on this host) or "ray" (episodes on a Ray cluster)
    ray_address: str | None = None  # None: a local Ray; "auto" or HOST:PORT: an existing cluster
    more_servers: tuple[str, ...] = ()  # further --server URLs (the ray backend spreads over all)
    # the condition (collect/condition.py): interventions sent with every query, the driving
    # prompt template ({task}: the instruction), counterfactual prompt templates, a label
    intervene: Path | None = None
    prompt_variant: str | None = None
    counterfactual_prompts: tuple[str, ...] = ()
    condition: str | None = None

    @property
    def servers(self) -> tuple[str, ...]:
        return (self.server, *self.more_servers)

    @property
    def horizon(self) -> int:
        return MAX_STEPS[self.suite] if self.max_steps is None else self.max_steps

    @property
    def embedded(self) -> bool:
        return self.server == EMBEDDED

    def arguments(self) -> dict[str, Any]:
        """The arguments as stored in every task file (the API key is not)."""
        return {
            "suite": self.suite,
            "tasks": self.tasks,
            "trials": self.trials,
            "episodes": self.episodes,
            "max_steps": self.horizon,
            "stride": self.stride,
            "out": str(self.out),
            "server": self.server,
            "config": self.config if self.embedded else None,
            "workers": self.workers,
            "latents": self.latents,
            "seed": self.seed,
            "save_images": self.save_images,
            "video": self.video,
            "replan_steps": self.replan_steps,
            "num_steps_wait": self.num_steps_wait,
            "compression": self.compression,
            "backend": self.backend,
            "servers": list(self.servers),
            "intervene": None if self.intervene is None else str(self.intervene),
            "prompt_variant": self.prompt_variant,
            "counterfactual_prompts": list(self.counterfactual_prompts),
            "condition": self.condition,
        }

    def episode_arguments(self) -> dict[str, Any]:
        """What makes episode k what it is: a resumed run must give the same (the file's identity)."""
        return {
            "seed": self.seed,
            "seeding": SEEDING_SCHEME,
            "max_steps": self.horizon,
            "stride": self.stride,
            "replan_steps": self.replan_steps,
            "num_steps_wait": self.num_steps_wait,
            "save_images": self.save_images,
            "env_resolution": ENV_RESOLUTION,
        }


def check_options(options: CollectOptions) -> LatentSpec:
    """Every argument that can be checked without LIBERO or a server; the latent spec."""
    if options.suite not in SUITES:
        raise ValidationError("--suite", f"one of {', '.join(SUITES)}", options.suite)
    _positive("--trials", options.trials)
    _positive("--stride", options.stride)
    _positive("--workers", options.workers)
    _positive("--replan-steps", options.replan_steps)
    if options.max_steps is not None:
        _positive("--max-steps", options.max_steps)
    if not isinstance(options.num_steps_wait, int) or options.num_steps_wait < 0:
        raise ValidationError("--num-steps-wait", "an integer >= 0", options.num_steps_wait)
    if not isinstance(options.error_retries, int) or options.error_retries < 0:
        raise ValidationError("error_retries", "an integer >= 0", options.error_retries)
    _check_horizon(options)
    episode_range(options)
    if options.request_timeout_s is not None and not options.request_timeout_s > 0:
        raise ValidationError("--request-timeout", "seconds > 0", options.request_timeout_s)
    if not options.embedded and not options.server.startswith(("ws://", "wss://")):
        raise ValidationError("--server", f"a ws:// or wss:// URL or '{EMBEDDED}'", options.server)
    _check_backend(options)
    if options.embedded and not embedded_server_installed():
        raise ValidationError(
            "--server",
            "ws://HOST:PORT of a running policy server (this is a client-only install: the "
            "embedded server needs latentpi-server, `scripts/install.sh all`)",
            "nothing (embedded, the default)",
        )
    check_writable(options.out)
    return load_latent_spec(options.latents)


def _check_horizon(options: CollectOptions) -> None:
    """LIBERO's env raises past ENV_HORIZON env steps (settle steps included): refuse it here,
    not in the middle of every episode."""
    if options.horizon + options.num_steps_wait > ENV_HORIZON:
        raise ValidationError(
            "--max-steps",
            f"at most {ENV_HORIZON - options.num_steps_wait} (LIBERO's env horizon {ENV_HORIZON} "
            f"env steps minus {options.num_steps_wait} settle steps)",
            options.horizon,
        )


def episode_range(options: CollectOptions) -> range:
    """The trials this run does: all of them, or `--episodes A:B` of them (same syntax as --tasks)."""
    try:
        return task_range(options.episodes, options.trials)
    except ValidationError:
        raise ValidationError(
            "--episodes",
            f"A:B or A with episode indices in [0, {options.trials}) (--trials {options.trials})",
            options.episodes,
        ) from None


def _check_backend(options: CollectOptions) -> None:
    if options.backend not in BACKENDS:
        raise ValidationError("--backend", f"one of {', '.join(BACKENDS)}", options.backend)
    for url in options.more_servers:
        if not url.startswith(("ws://", "wss://")):
            raise ValidationError("--server", "ws:// or wss:// URLs after the first", url)
    if options.backend == "local":
        if options.more_servers:
            raise ValidationError("--server", "one server with --backend local", options.servers)
        return
    if options.embedded:
        raise ValidationError(
            "--server", "ws://HOST:PORT of running servers with --backend ray", EMBEDDED
        )
    if options.video:
        raise ValidationError("--video", "off with --backend ray (not supported yet)", True)
    if importlib.util.find_spec("ray") is None:
        raise ValidationError(
            "--backend", "ray installed (latentpi-client[ray], scripts/install.sh all)", "ray"
        )


def embedded_server_installed() -> bool:
    """Whether `latentpi serve` can run here (a client-only install has no latentpi.server)."""
    try:
        return importlib.util.find_spec("latentpi.server") is not None
    except (ImportError, ValueError):
        return False


def option_warnings(options: CollectOptions, num_tasks: int) -> list[str]:
    """Arguments that are valid but probably not what was meant."""
    found = []
    if options.stride < options.replan_steps:
        found.append(
            f"--stride {options.stride} < --replan-steps {options.replan_steps}: latents are "
            "collected once per query (every query is sampled), not every stride steps"
        )
    units, unit = num_tasks, "task(s): workers run one task each"
    if options.backend == "ray":
        units, unit = num_tasks * len(episode_range(options)), "episode(s): actors run one each"
    if options.workers > units:
        found.append(f"--workers {options.workers} > {units} {unit}, so only {units} will work")
    return found


def select_tasks(text: str | None, names: Sequence[str]) -> list[int]:
    """Task ids from a comma-separated list of ids, ranges ('A:B', Python-style) and task names."""
    if text is None or not text.strip():
        return list(range(len(names)))
    selected: list[int] = []
    for item in (part.strip() for part in text.split(",")):
        if item in names:
            found = [names.index(item)]
        elif item and (item[0].isdigit() or item[0] in "-:"):
            found = list(task_range(item, len(names)))
        else:
            raise ValidationError(
                "--tasks",
                "task ids (A:B or A) or task names of the suite, comma-separated "
                f"(names: {', '.join(names[:3])}, ...)",
                item,
            )
        selected += [index for index in found if index not in selected]
    return selected


def task_range(text: str | None, num_tasks: int) -> range:
    """'A:B' (Python-style, either end optional, negatives count from the end) or 'A' -> task ids.

    Unlike a Python slice, an end beyond the suite is an error rather than clipped."""
    if text is None or text.strip() in ("", ":"):
        return range(num_tasks)
    expected = f"A:B or A with task ids in [0, {num_tasks}) (the suite has {num_tasks} tasks)"
    parts = text.split(":")
    try:
        bounds = [int(part) if part.strip() else None for part in parts]
    except ValueError:
        raise ValidationError("--tasks", expected, text) from None
    if len(bounds) == 1 and bounds[0] is not None:
        start = bounds[0] + num_tasks if bounds[0] < 0 else bounds[0]
        stop = start + 1
    elif len(bounds) == 2:
        start = _bound(bounds[0], 0, num_tasks)
        stop = _bound(bounds[1], num_tasks, num_tasks)
    else:
        raise ValidationError("--tasks", expected, text)
    if not 0 <= start < stop <= num_tasks:
        raise ValidationError("--tasks", expected, text)
    return range(start, stop)


def _bound(value: int | None, default: int, num_tasks: int) -> int:
    if value is None:
        return default
    return value + num_tasks if value < 0 else value


def load_latent_spec(value: str) -> LatentSpec:
    """A preset name, or a JSON file holding a preset name or a map of LatentSpec fields."""
    if value in PRESETS:
        return PRESETS[value]
    path = Path(value)
    expected = f"a preset ({', '.join(PRESETS)}) or a readable spec.json"
    if not path.is_file():
        raise ValidationError("--latents", expected, value)
    if path.stat().st_size > MAX_SPEC_BYTES:
        raise ValidationError("--latents", f"a spec file under {MAX_SPEC_BYTES} bytes", value)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValidationError("--latents", f"{expected} ({error})", value) from None
    try:
        return LatentSpec.from_wire(data)
    except (ValidationError, TypeError) as error:
        raise ValidationError("--latents", f"a valid latent spec ({error})", value) from None


def check_writable(folder: Path) -> None:
    """Create `folder` if needed and prove a file can be written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".latentpi-write-check-"):
            pass
    except OSError as error:
        raise ValidationError(
            "--out", "a writable folder", f"{folder} ({error.strerror})"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValidationError("--out", "a writable folder", str(folder))


def _positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValidationError(name, "a positive integer", value)


def check_trials(trials: int, num_init_states: Sequence[int]) -> None:
    """Trial k starts from init state k: no task may have fewer init states than trials."""
    fewest = min(num_init_states)
    if trials > fewest:
        raise ValidationError("--trials", f"at most {fewest} (init states per task)", trials)

"""Every random draw of an episode derived from what the episode is, not from when or where it runs.

LIBERO's `env.seed` is `np.random.seed`, and robosuite draws fixture placements from it at every
reset; the policy's flow-matching noise is drawn per query. Seeding once per run (openpi) makes
episode k's scene depend on how many resets came before it: a resumed run, a retry or another
worker sees another scene. Here each episode seeds the env from (seed, suite, task, episode) right
before its own reset, and each query sends a `noise_seed` from (seed, suite, task, episode, query),
so episode k is the same scene and the same actions wherever and whenever it runs.
"""

from __future__ import annotations

import hashlib
import json

SEEDING_SCHEME = "sha256-v1"  # stored with the episodes; change it if the derivation changes
ENV_SEED_BOUND = 2**32  # np.random.seed takes [0, 2**32)
NOISE_SEED_BOUND = 2**63  # the protocol's noise_seed range is [0, 2**63 - 1]


def _derive(*parts: object) -> int:
    text = json.dumps([SEEDING_SCHEME, *parts], separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def episode_seed(seed: int, suite: str, task_id: int, episode_idx: int) -> int:
    """The `env.seed` of one episode, in [0, 2**32)."""
    return _derive("env", int(seed), suite, int(task_id), int(episode_idx)) % ENV_SEED_BOUND


def query_noise_seed(seed: int, suite: str, task_id: int, episode_idx: int, query_idx: int) -> int:
    """The `noise_seed` sent with query `query_idx` (0 = the first query) of one episode."""
    parts = ("noise", int(seed), suite, int(task_id), int(episode_idx), int(query_idx))
    return _derive(*parts) % NOISE_SEED_BOUND

"""Fixtures shared across the parts' tests (kept small: heavy set-up belongs to one module)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

LIBERO_SUITE = "libero_object"  # the quickest suite to build and step (docs/libero.md)


@pytest.fixture(scope="session")
def libero_task() -> Any:
    """A real LIBERO task (TaskInfo) of libero_object."""
    from latentpi.client.libero_env import list_tasks

    return list_tasks(LIBERO_SUITE)[0]


@pytest.fixture(scope="module")
def libero_env(libero_task: Any) -> Iterator[Any]:
    """One real LIBERO environment per test module (~2 GB RSS, seconds to build), closed after."""
    from latentpi.client.libero_env import close_env, make_env

    env = make_env(libero_task)
    yield env
    close_env(env)

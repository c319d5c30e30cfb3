"""Durable file operations: a file is published under its final name only once it is on disk."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """fsync `tmp`, atomically rename it to `final`, fsync the folder (so the rename survives)."""
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(final.parent)


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)

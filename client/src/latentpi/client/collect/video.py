"""`--video`: one mp4 per episode of the agent-view camera, as openpi's LIBERO example writes.

Frames are the env's agent-view images (flipped upright, 256x256) after the settle period and after
every policy step, at 10 fps (openpi's). Written to `<name>.tmp.mp4` and renamed once the episode is
published, so a video exists only for a finished episode. OpenCV (opencv-python-headless, already
a LIBERO dependency) encodes it; no ffmpeg binary is needed.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

import numpy as np

FPS = 10
VIDEO_DIR = "videos"


def video_path(out: Path, suite: str, task_id: int, episode_idx: int) -> Path:
    return Path(out) / suite / VIDEO_DIR / f"task_{task_id}_episode_{episode_idx:04d}.mp4"


class EpisodeVideo:
    """Frames in, an mp4 out on `publish`; dropped when the episode is not finished."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_suffix(".tmp.mp4")  # OpenCV picks the container by the suffix
        self._writer: object | None = None

    def add(self, frame: np.ndarray) -> None:
        import cv2

        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            height, width = frame.shape[:2]
            fourcc = cv2.VideoWriter_fourcc(*"mp4v")
            self._writer = cv2.VideoWriter(str(self.tmp), fourcc, FPS, (width, height), True)
        self._writer.write(np.ascontiguousarray(frame[..., ::-1]))  # type: ignore[attr-defined]  # RGB -> BGR

    def publish(self) -> None:
        self._release()
        if self.tmp.exists():
            os.replace(self.tmp, self.path)

    def drop(self) -> None:
        self._release()
        self.tmp.unlink(missing_ok=True)

    def _release(self) -> None:
        if self._writer is not None:
            self._writer.release()  # type: ignore[attr-defined]
            self._writer = None

    def __enter__(self) -> EpisodeVideo:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.drop()  # after publish: nothing left to drop

"""One self-describing HDF5 file per task: crash-safe writer, resumable, lazy reader.

See docs/data-format.md for every name, shape and attribute and for the crash-safety design.
"""

from latentpi.client.storage.layout import FORMAT_VERSION, TaskHeader, task_path
from latentpi.client.storage.reader import EpisodeView, LazyArray, TaskFile
from latentpi.client.storage.sources import completed_episodes
from latentpi.client.storage.writer import EpisodeWriter, TaskWriter

__all__ = [
    "FORMAT_VERSION",
    "EpisodeView",
    "EpisodeWriter",
    "LazyArray",
    "TaskFile",
    "TaskHeader",
    "TaskWriter",
    "completed_episodes",
    "task_path",
]

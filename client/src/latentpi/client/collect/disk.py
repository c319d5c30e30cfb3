"""A full output volume stops the run with a message that says so, and that resuming works.

HDF5 reports a failed write as `OSError(ENOSPC, "Can't synchronously write data (file write failed:
time = ..., filename = '...', ... errno = 28, ...)")`, or, from an object copy (consolidation), as a
`RuntimeError` with the same text and no errno; the collector turns either into one readable line
(the file, the output folder and its free space, what to do). Every published episode is intact by
design (docs/data-format.md, "Crash safety"): the episode being written is dropped with its
temporary file, and the same command resumes once there is space.
"""

from __future__ import annotations

import errno
import re
import shutil
from pathlib import Path

NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
_HDF5_FILENAME = re.compile(r"filename = '([^']*)'")
_HDF5_ERRNO = re.compile(r"file write failed: .*errno = (\d+), error message = ", re.DOTALL)


def no_space_message(error: BaseException, out: Path) -> str | None:
    """The message for a write that failed for lack of space under `out`; None for other errors."""
    if not _no_space(error):
        return None
    found = _HDF5_FILENAME.search(str(error))
    where = getattr(error, "filename", None) or (found.group(1) if found else None)
    try:
        free = f"{shutil.disk_usage(out).free / 1024:.0f} KiB free"
    except OSError:
        free = "free space unknown"
    writing = f" writing {where}" if where else ""
    return (
        f"no space left on device{writing} (output folder {out}: {free}); every finished "
        "episode is kept: free some space, then run the same command to resume"
    )


def _no_space(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno in NO_SPACE
    if not isinstance(error, OSError | RuntimeError):
        return False
    found = _HDF5_ERRNO.search(str(error))
    return found is not None and int(found.group(1)) in NO_SPACE

"""Local paths for checkpoints and assets that may live in a public bucket.

`maybe_download` returns local paths as they are and copies `gs://bucket/path` (anonymously, through
gcsfs) into the cache at `<cache_dir()>/<bucket>/<path>` — the layout openpi uses, so a cache filled by
openpi is reused as is and vice versa. A download lands under a `.partial` name and is renamed into
place only once complete, while holding a `.lock` file, so an interrupted or concurrent download is
never mistaken for a finished one.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pathlib
import shutil
import urllib.parse
from collections.abc import Iterator
from typing import Any

import fsspec

logger = logging.getLogger(__name__)

CACHE_ENV = "OPENPI_DATA_HOME"
DEFAULT_CACHE = "~/.cache/openpi"
# A sanity bound, far above the largest public checkpoint (pi0.5: about 13 GB).
MAX_DOWNLOAD_BYTES = 64 * 2**30

_REMOTE_SCHEMES = ("gs",)


def cache_dir() -> pathlib.Path:
    """The cache root: `$OPENPI_DATA_HOME`, else `~/.cache/openpi` (created if missing)."""
    root = pathlib.Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def maybe_download(
    url: str | os.PathLike[str],
    *,
    force: bool = False,
    filesystem: fsspec.AbstractFileSystem | None = None,
    max_bytes: int = MAX_DOWNLOAD_BYTES,
) -> pathlib.Path:
    """The local path of a file or directory, downloading it into the cache first if remote.

    Args:
      url: a local path, `file://` URL, or `gs://bucket/path` (file or directory).
      force: download again even when the cache already holds the entry.
      filesystem: the filesystem serving `bucket/path` for remote URLs; default anonymous gcsfs.
        Tests pass a local one here.
      max_bytes: refuse remote entries larger than this.

    Raises:
      FileNotFoundError: the local path or remote entry does not exist (the message names it).
      ValueError: an unsupported URL scheme, or a remote entry over `max_bytes`.
    """
    url = os.fspath(url)
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("", "file"):
        return _local_path(url, parsed)
    if parsed.scheme not in _REMOTE_SCHEMES:
        raise ValueError(
            f"url: expected a local path, file:// or one of {[s + '://' for s in _REMOTE_SCHEMES]}, "
            f"received {url!r}"
        )
    key = parsed.path.strip("/")
    if not parsed.netloc or not key or ".." in pathlib.PurePosixPath(key).parts:
        raise ValueError(f"url: expected gs://<bucket>/<path>, received {url!r}")
    target = (cache_dir() / parsed.netloc / key).resolve()
    if target.exists() and not force:
        return target
    fs = filesystem if filesystem is not None else fsspec.filesystem(parsed.scheme, token="anon")
    with _locked(target.with_name(target.name + ".lock")):
        # Another process may have finished the same download while we waited for the lock.
        if target.exists() and not force:
            return target
        _download(fs, f"{parsed.netloc}/{key}", url, target, max_bytes)
    return target


def _local_path(url: str, parsed: urllib.parse.ParseResult) -> pathlib.Path:
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost") or not parsed.path:
            raise ValueError(f"url: expected file:///<absolute path>, received {url!r}")
        path = pathlib.Path(urllib.parse.unquote(parsed.path))
    else:
        path = pathlib.Path(url).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{url!r}: no such file or directory ({path})")
    return path.resolve()


@contextlib.contextmanager
def _locked(lock_path: pathlib.Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download(
    fs: fsspec.AbstractFileSystem,
    remote: str,
    url: str,
    target: pathlib.Path,
    max_bytes: int,
) -> None:
    files = _remote_files(fs, remote, url)
    total = sum(size for _, size in files.values())
    if total > max_bytes:
        raise ValueError(f"{url}: expected at most {max_bytes} bytes, the entry holds {total}")
    scratch = target.with_name(target.name + ".partial")
    _remove(scratch)  # left over from an interrupted download
    logger.info("downloading %s (%d files, %d bytes) to %s", url, len(files), total, target)
    for relative, (remote_file, _) in files.items():
        local = scratch / relative if relative else scratch
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(remote_file, str(local))
    if not files:  # an empty directory
        scratch.mkdir(parents=True)
    # Swap in the complete copy; the old entry (force=True) goes only once the new one is whole.
    stale = target.with_name(target.name + ".stale")
    _remove(stale)
    if target.exists():
        os.replace(target, stale)
    os.replace(scratch, target)
    _remove(stale)


def _remote_files(
    fs: fsspec.AbstractFileSystem, remote: str, url: str
) -> dict[str, tuple[str, int]]:
    """Relative path → (remote path, size) of every file under `remote` ("" for a single file)."""
    try:
        info = fs.info(remote)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{url!r}: no such remote file or directory") from e
    # Some object stores mark folders as 0-byte objects whose names end in "/".
    if info["type"] != "directory" and not (info.get("size") == 0 and info["name"].endswith("/")):
        return {"": (remote, int(info.get("size") or 0))}
    root = remote.rstrip("/")
    found: dict[str, Any] = fs.find(root, detail=True)
    files: dict[str, tuple[str, int]] = {}
    for name, entry in found.items():
        if entry.get("type") == "directory" or name.endswith("/"):
            continue
        relative = pathlib.PurePosixPath(_strip_root(name, root))
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise ValueError(f"{url}: refusing the listed path {name!r} outside {root!r}")
        files[str(relative)] = (name, int(entry.get("size") or 0))
    return files


def _strip_root(name: str, root: str) -> str:
    name, root = name.lstrip("/"), root.lstrip("/")
    if not name.startswith(root + "/"):
        raise ValueError(f"listed path {name!r} is not under {root!r}")
    return name[len(root) + 1 :]


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()

"""maybe_download: local paths, and gs:// served by a local filesystem through the real cache logic."""

from __future__ import annotations

import pathlib
import threading
import time

import fsspec
import pytest
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

from latentpi.server import download
from latentpi.server.download import cache_dir, maybe_download


class CountingFS(DirFileSystem):
    """A bucket root on local disk, counting copies; optionally failing after `fail_after` files."""

    def __init__(self, root: pathlib.Path, *, fail_after: int | None = None, delay: float = 0.0):
        super().__init__(path=str(root), fs=LocalFileSystem())
        self.copies = 0
        self.fail_after = fail_after
        self.delay = delay

    def get_file(self, rpath, lpath, **kwargs):
        if self.fail_after is not None and self.copies >= self.fail_after:
            raise ConnectionError("network dropped")
        time.sleep(self.delay)
        self.copies += 1
        return super().get_file(rpath, lpath, **kwargs)


@pytest.fixture
def cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("OPENPI_DATA_HOME", str(root))
    return root


@pytest.fixture
def bucket_root(tmp_path: pathlib.Path) -> pathlib.Path:
    """A fake `gs://bucket` holding a checkpoint-like directory and a single file."""
    root = tmp_path / "remote"
    ckpt = root / "bucket" / "checkpoints" / "tiny"
    (ckpt / "params" / "d").mkdir(parents=True)
    (ckpt / "params" / "_METADATA").write_text("{}")
    (ckpt / "params" / "d" / "blob").write_bytes(b"\x00\x01" * 1000)
    (ckpt / "assets" / "physical-intelligence" / "libero").mkdir(parents=True)
    (ckpt / "assets" / "physical-intelligence" / "libero" / "norm_stats.json").write_text("{}")
    (root / "bucket" / "tokenizer.model").write_bytes(b"spm" * 10)
    return root


def tree(root: pathlib.Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_cache_dir_follows_env(cache: pathlib.Path) -> None:
    assert cache_dir() == cache.resolve()
    assert cache.is_dir()


def test_cache_dir_default(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.delenv("OPENPI_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == (tmp_path / ".cache" / "openpi").resolve()


def test_local_paths(tmp_path: pathlib.Path) -> None:
    f = tmp_path / "x.bin"
    f.write_bytes(b"1")
    assert maybe_download(str(f)) == f.resolve()
    assert maybe_download(f) == f.resolve()
    assert maybe_download(f"file://{f}") == f.resolve()
    assert maybe_download(f"file://localhost{f}") == f.resolve()


def test_missing_local_path_is_named(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        maybe_download(str(missing))
    with pytest.raises(FileNotFoundError, match="nope"):
        maybe_download(f"file://{missing}")


@pytest.mark.parametrize(
    "url",
    ["s3://bucket/x", "http://example.com/x", "gs://bucket", "gs://bucket/../etc", "file://host/x"],
)
def test_bad_urls(url: str, cache: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="url: expected"):
        maybe_download(url)


def test_directory_download_uses_openpi_layout(
    cache: pathlib.Path, bucket_root: pathlib.Path
) -> None:
    fs = CountingFS(bucket_root)
    path = maybe_download("gs://bucket/checkpoints/tiny", filesystem=fs)
    assert path == cache.resolve() / "bucket" / "checkpoints" / "tiny"
    assert tree(path) == tree(bucket_root / "bucket" / "checkpoints" / "tiny")
    assert fs.copies == 3
    # No leftovers beside the entry except the lock.
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny", "tiny.lock"]


def test_cached_entry_is_not_fetched_again(cache: pathlib.Path, bucket_root: pathlib.Path) -> None:
    fs = CountingFS(bucket_root)
    first = maybe_download("gs://bucket/checkpoints/tiny/", filesystem=fs)
    second = maybe_download("gs://bucket/checkpoints/tiny", filesystem=fs)
    assert first == second
    assert fs.copies == 3


def test_existing_openpi_cache_is_reused(cache: pathlib.Path) -> None:
    entry = cache / "openpi-assets" / "checkpoints" / "pi0_libero"
    (entry / "params").mkdir(parents=True)
    failing = CountingFS(cache, fail_after=0)
    assert (
        maybe_download("gs://openpi-assets/checkpoints/pi0_libero", filesystem=failing)
        == entry.resolve()
    )
    assert failing.copies == 0


def test_single_file(cache: pathlib.Path, bucket_root: pathlib.Path) -> None:
    path = maybe_download("gs://bucket/tokenizer.model", filesystem=CountingFS(bucket_root))
    assert path == cache.resolve() / "bucket" / "tokenizer.model"
    assert path.read_bytes() == b"spm" * 10


def test_missing_remote(cache: pathlib.Path, bucket_root: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError, match="gs://bucket/nothing"):
        maybe_download("gs://bucket/nothing", filesystem=CountingFS(bucket_root))
    assert not (cache / "bucket" / "nothing").exists()


def test_interrupted_download_is_never_taken_as_complete(
    cache: pathlib.Path, bucket_root: pathlib.Path
) -> None:
    url = "gs://bucket/checkpoints/tiny"
    with pytest.raises(ConnectionError):
        maybe_download(url, filesystem=CountingFS(bucket_root, fail_after=1))
    target = cache / "bucket" / "checkpoints" / "tiny"
    assert not target.exists()
    fs = CountingFS(bucket_root)
    path = maybe_download(url, filesystem=fs)
    assert fs.copies == 3
    assert tree(path) == tree(bucket_root / "bucket" / "checkpoints" / "tiny")
    assert not target.with_name("tiny.partial").exists()


def test_force_replaces_the_cached_copy(cache: pathlib.Path, bucket_root: pathlib.Path) -> None:
    url = "gs://bucket/tokenizer.model"
    maybe_download(url, filesystem=CountingFS(bucket_root))
    (bucket_root / "bucket" / "tokenizer.model").write_bytes(b"v2")
    assert maybe_download(url, filesystem=CountingFS(bucket_root)).read_bytes() == b"spm" * 10
    assert maybe_download(url, force=True, filesystem=CountingFS(bucket_root)).read_bytes() == b"v2"


def test_size_bound(cache: pathlib.Path, bucket_root: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="at most 100 bytes"):
        maybe_download(
            "gs://bucket/checkpoints/tiny", filesystem=CountingFS(bucket_root), max_bytes=100
        )
    assert not (cache / "bucket" / "checkpoints" / "tiny").exists()


def test_concurrent_downloads_fetch_once(cache: pathlib.Path, bucket_root: pathlib.Path) -> None:
    fs = CountingFS(bucket_root, delay=0.05)
    results: list[pathlib.Path] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                maybe_download("gs://bucket/checkpoints/tiny", filesystem=fs)
            )
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 3
    assert fs.copies == 3  # one download of three files, not three


def test_default_filesystem_is_anonymous_gs(cache: pathlib.Path, bucket_root: pathlib.Path) -> None:
    """Without an injected filesystem, gs:// goes through fsspec's `gs` protocol with an anonymous token."""
    seen: dict[str, object] = {}

    class FakeGCS(DirFileSystem):
        protocol = "gs"

        def __init__(self, token=None, **kwargs):
            seen["token"] = token
            super().__init__(path=str(bucket_root), fs=LocalFileSystem())

    original = fsspec.get_filesystem_class("gs")
    fsspec.register_implementation("gs", FakeGCS, clobber=True)
    try:
        path = maybe_download("gs://bucket/tokenizer.model")
    finally:
        fsspec.register_implementation("gs", original, clobber=True)
    assert seen == {"token": "anon"}
    assert path.read_bytes() == b"spm" * 10


def test_real_gs_protocol_is_gcsfs() -> None:
    """The code path above is the one gcsfs serves in production (construction needs no network)."""
    import gcsfs

    assert isinstance(fsspec.filesystem("gs", token="anon"), gcsfs.GCSFileSystem)
    assert download._REMOTE_SCHEMES == ("gs",)

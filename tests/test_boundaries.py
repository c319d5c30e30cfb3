"""The three distributions' import boundaries: the server never imports MuJoCo/LIBERO, the client
never imports JAX, the protocol needs msgpack, numpy and ml_dtypes only. Checked by importing every
module of a side in a fresh interpreter and looking at what got loaded."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = r"""
import importlib, json, pkgutil, sys
package = importlib.import_module(sys.argv[1])
for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    importlib.import_module(info.name)
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""

FORBIDDEN = {
    "latentpi.client": {"jax", "jaxlib", "flax", "orbax"},
    "latentpi.server": {"mujoco", "robosuite", "libero", "h5py"},
    "latentpi.protocol": {
        "jax",
        "flax",
        "mujoco",
        "robosuite",
        "libero",
        "h5py",
        "websockets",
        "torch",
    },
}


def loaded_top_level_modules(package: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, package], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return set(json.loads(done.stdout))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_side_never_imports_the_other_sides_stack(package: str) -> None:
    loaded = loaded_top_level_modules(package)
    assert "latentpi" in loaded
    assert not loaded & FORBIDDEN[package], (
        f"{package} imports {sorted(loaded & FORBIDDEN[package])}"
    )

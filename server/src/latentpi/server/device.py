"""The serving device: the weights live on it once, committed; what it is and how full it is.

A jitted call with numpy weights copies every one of them to the device on every call (6.6 GB of
bfloat16 for pi0, ~130 ms over PCIe on an H200): weights are therefore restored straight to device
arrays and checked to be there before the server reports healthy.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import jax

# What `Device.memory_stats()` reports on GPU/TPU backends (CPU reports nothing).
MEMORY_STATS = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")


class NotOnDeviceError(RuntimeError):
    """A parameter that is not a committed array on the serving device."""


def serving_device() -> jax.Device:
    """The device the model runs on: JAX's default (the first of the default backend)."""
    return jax.devices()[0]


def device_sharding(device: jax.Device) -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(device)


def place(params: Any, device: jax.Device) -> Any:
    """Every leaf committed to `device` (a no-op for leaves already there)."""
    return jax.device_put(params, device_sharding(device))


def check_resident(params: Any, device: jax.Device) -> None:
    """Raises NotOnDeviceError naming the first leaf that is not a committed array on `device`."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        where = jax.tree_util.keystr(path)
        if not isinstance(leaf, jax.Array):
            raise NotOnDeviceError(
                f"params{where}: expected a jax.Array, found {type(leaf).__name__}"
            )
        if not leaf.committed or leaf.devices() != {device}:
            raise NotOnDeviceError(
                f"params{where}: expected committed to {device}, found on {sorted(map(str, leaf.devices()))}"
                f" (committed={leaf.committed})"
            )


def param_bytes(params: Any) -> dict[tuple[str, str], int]:
    """Bytes of parameters per (device, memory kind)."""
    totals: dict[tuple[str, str], int] = defaultdict(int)
    for leaf in jax.tree.leaves(params):
        kind = str(getattr(leaf.sharding, "memory_kind", None) or "device")
        for shard in leaf.addressable_shards:
            totals[(str(shard.device), kind)] += shard.data.nbytes
    return dict(totals)


def memory_stats(device: jax.Device) -> dict[str, int]:
    """The device's memory counters where the backend reports them (empty on CPU)."""
    stats = device.memory_stats() or {}
    return {name: int(stats[name]) for name in MEMORY_STATS if name in stats}


def describe(device: jax.Device) -> dict[str, Any]:
    """What the server metadata says about the device."""
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device": str(device),
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
    }

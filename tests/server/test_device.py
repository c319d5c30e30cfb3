"""Weights live on the serving device once: a checkpoint restores straight to committed device
arrays, a warmed-up call moves no parameter, and /metrics and the metadata say where they are."""

from __future__ import annotations

import dataclasses
import pathlib
import urllib.request
from collections.abc import Iterator

import jax
import numpy as np
import pytest
from loopback import observation, serving
from prometheus_client.parser import text_string_to_metric_families

from latentpi.protocol.messages import PolicyRequest
from latentpi.server import device as _device
from latentpi.server.engine import PolicyEngine, _stack_observation
from latentpi.server.engine_factory import build_engine, load_weights, save_random_checkpoint
from latentpi.server.model.checkpoint import load_params
from latentpi.server.serving import ServingConfig, serving_config
from latentpi.server.settings import ServerSettings


@pytest.fixture(scope="module")
def checkpoint_config(tmp_path_factory: pytest.TempPathFactory) -> ServingConfig:
    """pi0_tiny's random weights written as an openpi checkpoint, served from it."""
    tiny = serving_config("pi0_tiny")
    root = save_random_checkpoint(tiny, tmp_path_factory.mktemp("pi0_tiny_ckpt"))
    return dataclasses.replace(tiny, checkpoint=str(root))


@pytest.fixture(scope="module")
def checkpoint_engine(checkpoint_config: ServingConfig) -> PolicyEngine:
    return build_engine(checkpoint_config, ServerSettings(port=0), warmup=False)


def test_checkpoint_weights_are_committed_device_arrays(checkpoint_config: ServingConfig) -> None:
    device = _device.serving_device()
    params = load_weights(checkpoint_config)
    leaves = jax.tree.leaves(params)
    assert leaves and all(isinstance(leaf, jax.Array) for leaf in leaves)
    assert all(leaf.committed and leaf.devices() == {device} for leaf in leaves)
    assert {leaf.dtype.name for leaf in leaves} == {checkpoint_config.model.dtype}
    # The same values as the checkpoint holds.
    stored = load_params(checkpoint_config.checkpoint)  # numpy, stored dtype
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(stored), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)


def test_random_weights_are_committed_too() -> None:
    params = load_weights(serving_config("pi05_tiny"))
    _device.check_resident(params, _device.serving_device())


def test_a_warmed_up_call_moves_no_parameters(checkpoint_engine: PolicyEngine) -> None:
    """A host→device transfer of a parameter would raise inside the guard: with numpy weights,
    every call copied the whole model to the device."""
    engine = checkpoint_engine
    item = engine.prepare(PolicyRequest.from_wire(observation(0, noise_seed=1)))
    obs, noise = _stack_observation([item]), np.stack([item.noise])
    expected, _ = engine.sampler.sample_actions(engine.params, obs, noise)  # compiles
    compiled = engine.sampler.compiled(engine.params, obs, noise)
    on_device = jax.device_put((obs, noise), _device.device_sharding(engine.device))
    with jax.transfer_guard_host_to_device("disallow"):
        actions, _ = compiled(engine.params, *on_device)
        actions.block_until_ready()
    np.testing.assert_array_equal(np.asarray(actions), expected)


def test_check_resident_names_the_leaf_that_is_not_on_the_device() -> None:
    device = _device.serving_device()
    host = {"PaliGemma": {"img": {"head": {"kernel": np.zeros((2, 2), np.float32)}}}}
    with pytest.raises(_device.NotOnDeviceError, match=r"\['PaliGemma'\]\['img'\]\['head'\]"):
        _device.check_resident(host, device)
    uncommitted = {"w": jax.numpy.zeros(3)}
    with pytest.raises(_device.NotOnDeviceError, match="committed=False"):
        _device.check_resident(uncommitted, device)
    _device.check_resident(_device.place(uncommitted, device), device)


def test_engine_refuses_host_weights(checkpoint_engine: PolicyEngine) -> None:
    host_params = jax.device_get(checkpoint_engine.params)
    with pytest.raises(_device.NotOnDeviceError, match=r"expected a jax\.Array"):
        dataclasses.replace(checkpoint_engine, params=host_params)


@pytest.fixture(scope="module")
def checkpoint_server(checkpoint_engine: PolicyEngine) -> Iterator[str]:
    with serving(checkpoint_engine) as server:
        yield server.http_url


def test_metrics_export_parameter_bytes_per_device(
    checkpoint_engine: PolicyEngine, checkpoint_server: str
) -> None:
    with urllib.request.urlopen(checkpoint_server + "/metrics", timeout=10) as reply:
        text = reply.read().decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    samples = families["latentpi_param_bytes"].samples
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(checkpoint_engine.params))
    assert sum(sample.value for sample in samples) == total > 0
    assert {sample.labels["device"] for sample in samples} == {str(checkpoint_engine.device)}
    assert "latentpi_device_memory_bytes" in families  # empty on CPU: the backend reports none


def test_metadata_names_the_device(checkpoint_engine: PolicyEngine) -> None:
    described = checkpoint_engine.metadata()["config"]["device"]
    device = _device.serving_device()
    assert described["device_kind"] == device.device_kind
    assert described["platform"] == device.platform


def test_save_random_checkpoint_writes_openpi_layout(checkpoint_config: ServingConfig) -> None:
    root = pathlib.Path(checkpoint_config.checkpoint or "")
    assert (root / "params").is_dir()
    assert (root / "assets" / "physical-intelligence" / "libero" / "norm_stats.json").is_file()

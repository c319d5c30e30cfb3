"""Which model a server serves, as far as the data are concerned.

A server's metadata frame also says where it runs (`config.device`, a server setting such as
`config.batch_invariant`): two servers of the same model on different hosts differ there, and must
still be allowed to feed one run. Everything else — unknown keys included — counts as the model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from latentpi.client.storage.layout import to_json

HOST_CONFIG_KEYS = frozenset({"device", "batch_invariant"})


def config_of(metadata: Mapping[str, Any]) -> Mapping[str, Any]:
    config = metadata.get("config")
    return config if isinstance(config, Mapping) else {}


def model_fingerprint(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The metadata without what only says where or how the server runs."""
    config = {k: v for k, v in config_of(metadata).items() if k not in HOST_CONFIG_KEYS}
    return {**metadata, "config": config}


def same_model(first: Mapping[str, Any], second: Mapping[str, Any]) -> bool:
    return to_json(model_fingerprint(first)) == to_json(model_fingerprint(second))


def model_identity(metadata: Mapping[str, Any]) -> tuple[str, str]:
    """(model_config, checkpoint) as named by the server; what it does not name is replaced by a
    digest of its model fingerprint, so two unnamed servers never pass for the same model."""
    config = config_of(metadata)
    digest = hashlib.sha256(to_json(model_fingerprint(metadata)).encode()).hexdigest()[:16]
    unnamed = f"unnamed (server metadata sha256:{digest})"
    name = config.get("name", metadata.get("model"))
    checkpoint = config.get("checkpoint")
    return (
        unnamed if name is None else str(name),
        unnamed if checkpoint is None else str(checkpoint),
    )

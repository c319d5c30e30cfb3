"""latentpi's wire protocol: msgpack + numpy frames compatible with openpi-client, plus latents."""

from latentpi.protocol.codec import DEFAULT_LIMITS, Limits, packb, unpackb
from latentpi.protocol.errors import ProtocolError, ValidationError
from latentpi.protocol.latent_layout import (
    LATENT_NAMES,
    ArrayLayout,
    ModelShape,
    latent_bytes,
    latent_layouts,
)
from latentpi.protocol.latent_spec import DEFAULT_PRESET, PRESETS, LatentSpec, TokenLayout, preset
from latentpi.protocol.messages import (
    PROTOCOL_VERSION,
    PolicyRequest,
    PolicyResponse,
    ServerMetadata,
)

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_PRESET",
    "LATENT_NAMES",
    "PRESETS",
    "PROTOCOL_VERSION",
    "ArrayLayout",
    "LatentSpec",
    "Limits",
    "ModelShape",
    "PolicyRequest",
    "PolicyResponse",
    "ProtocolError",
    "ServerMetadata",
    "TokenLayout",
    "ValidationError",
    "latent_bytes",
    "latent_layouts",
    "packb",
    "preset",
    "unpackb",
]

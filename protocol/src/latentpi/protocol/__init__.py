"""latentpi's wire protocol: msgpack + numpy frames compatible with openpi-client, plus latents."""

from latentpi.protocol.codec import DEFAULT_LIMITS, Limits, packb, unpackb
from latentpi.protocol.errors import ProtocolError, ValidationError
from latentpi.protocol.latent_spec import DEFAULT_PRESET, PRESETS, LatentSpec, TokenLayout, preset

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_PRESET",
    "PRESETS",
    "LatentSpec",
    "Limits",
    "ProtocolError",
    "TokenLayout",
    "ValidationError",
    "packb",
    "preset",
    "unpackb",
]

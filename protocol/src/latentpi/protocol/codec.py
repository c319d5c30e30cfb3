"""The latentpi codec: msgpack + numpy frames, byte-compatible with openpi-client, plus bfloat16.

    packb(obj) -> bytes                     one copy of each contiguous array's bytes
    FramePacker().pack(obj) -> memoryview   into a reused buffer: one copy per array, no allocation
    unpackb(frame, limits=...) -> object    arrays are read-only views into the frame
    Limits                                  bounds checked before anything a frame claims is built

Malformed frames raise ProtocolError. The encoding is specified in docs/protocol.md.
"""

from latentpi.protocol.decoder import unpackb
from latentpi.protocol.encoder import FramePacker, packb
from latentpi.protocol.errors import ProtocolError
from latentpi.protocol.limits import DEFAULT_LIMITS, Limits

__all__ = ["DEFAULT_LIMITS", "FramePacker", "Limits", "ProtocolError", "packb", "unpackb"]

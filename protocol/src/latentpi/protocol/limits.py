"""Bounds a decoder enforces before it trusts anything a frame claims."""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Upper bounds on a frame; every claim is checked against them (and against the bytes actually
    present) before anything is allocated.

    The defaults admit a full-preset pi0 response (about 120 MB) with room to spare and reject
    anything a 1 GiB frame could not honestly contain.
    """

    max_frame_bytes: int = GiB
    max_array_elements: int = GiB  # per array
    max_total_elements: int = 4 * GiB  # over all arrays of a frame
    max_ndim: int = 32  # numpy's own limit
    max_depth: int = 64  # nested maps / lists
    max_str_bytes: int = 16 * MiB
    max_bin_bytes: int = GiB  # array data travels as bin
    max_container_len: int = MiB  # entries of one map or list
    max_objects: int = 4 * MiB  # msgpack values in a whole frame

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Limits.{name}: expected a positive int, received {value!r}")


DEFAULT_LIMITS = Limits()


# A request is two images, a prompt and a few small maps (intervention unit lists are the longest
# lists, up to an expert's MLP width): far fewer values than a response carries. Decoding costs about
# a microsecond and up to 72 bytes of Python objects per value, on the server's event loop for frames
# under 1 MiB, so a request's values are bounded tighter than the defaults' 4 Mi (seconds and
# ~300 MB for one 4 MB frame of empty maps).
REQUEST_MAX_OBJECTS = 1 << 16
REQUEST_MAX_CONTAINER_LEN = 1 << 16


def request_limits(max_frame_bytes: int) -> Limits:
    """What a server accepts in one request frame."""
    return Limits(
        max_frame_bytes=max_frame_bytes,
        max_objects=REQUEST_MAX_OBJECTS,
        max_container_len=REQUEST_MAX_CONTAINER_LEN,
    )

"""A deterministic container for numpy arrays plus JSON metadata.

Same content -> same bytes (no timestamps, sorted keys), so stored state can be compared by hash, and
loading never unpickles anything. Layout: magic, u32 header length, JSON header, raw C-order arrays.
"""

from __future__ import annotations

import json
import struct

import numpy as np

MAGIC = b"INSPK1\n"


def pack(meta: dict, arrays: dict[str, np.ndarray]) -> bytes:
    specs, chunks, offset = {}, [], 0
    for name in sorted(arrays):
        array = np.asarray(arrays[name])  # not ascontiguousarray: it turns 0-d arrays into 1-d
        if array.dtype.kind not in "fiub":
            raise TypeError(f"array {name!r} has unsupported dtype {array.dtype}")
        raw = array.tobytes(order="C")
        specs[name] = {"dtype": array.dtype.str, "shape": list(array.shape), "offset": offset, "nbytes": len(raw)}
        chunks.append(raw)
        offset += len(raw)
    header = json.dumps({"meta": meta, "arrays": specs}, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + b"".join(chunks)


def array_sizes(data: bytes) -> dict[str, int]:
    """Bytes of each named array in a packed state, read from its header alone."""
    return {name: spec["nbytes"] for name, spec in _header(data)[0]["arrays"].items()}


def _header(data: bytes) -> tuple[dict, int]:
    if not data.startswith(MAGIC):
        raise ValueError("not a packed state (bad magic)")
    start = len(MAGIC)
    if len(data) < start + 4:
        raise ValueError("packed state truncated in its header")
    (header_len,) = struct.unpack_from("<I", data, start)
    return json.loads(data[start + 4 : start + 4 + header_len]), start + 4 + header_len


def unpack(data: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    header, body_start = _header(data)
    body = memoryview(data)[body_start:]
    arrays = {}
    for name, spec in header["arrays"].items():
        raw = body[spec["offset"] : spec["offset"] + spec["nbytes"]]
        if len(raw) != spec["nbytes"]:
            raise ValueError(f"packed state truncated in array {name!r}")
        # copy: the caller owns writable memory independent of the Redis reply buffer
        arrays[name] = np.frombuffer(raw, dtype=np.dtype(spec["dtype"])).reshape(spec["shape"]).copy()
    return header["meta"], arrays

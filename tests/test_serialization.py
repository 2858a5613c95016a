"""The deterministic array container: round trips, byte-for-byte determinism, refusal of bad data."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.common.serialization import MAGIC, pack, unpack


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "f32": rng.normal(size=(7, 5)).astype(np.float32),
        "f64": rng.normal(size=(3, 2, 4)),
        "f16": rng.normal(size=(9,)).astype(np.float16),
        "i64": rng.integers(-(2**40), 2**40, size=(4, 1)),
        "i8": rng.integers(-128, 127, size=(2, 3), dtype=np.int8),
        "u16": rng.integers(0, 2**16, size=(5,), dtype=np.uint16),
        "big_endian": rng.normal(size=(3,)).astype(">f4"),
        "flags": rng.random((6, 2)) < 0.5,
        "scalar": np.array(3.5),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "transposed": np.arange(12, dtype=np.int32).reshape(3, 4).T,  # not C-contiguous
    }


def test_round_trip_many_dtypes_and_shapes() -> None:
    arrays = _arrays()
    meta = {"expert": "patchcore", "config": {"k": 3, "ratio": 0.02, "nested": [1, "two", None]}}
    meta_back, back = unpack(pack(meta, arrays))
    assert meta_back == meta
    assert set(back) == set(arrays)
    for name, array in arrays.items():
        assert back[name].dtype == array.dtype, name
        assert back[name].shape == array.shape, name
        np.testing.assert_array_equal(back[name], array, err_msg=name)
        assert back[name].flags.writeable, name  # independent, writable memory


def test_round_trip_without_arrays() -> None:
    assert unpack(pack({"a": 1}, {})) == ({"a": 1}, {})


def test_same_content_same_bytes() -> None:
    arrays = _arrays()
    reordered = dict(reversed(list(arrays.items())))  # insertion order must not matter
    copies = {name: a.copy(order="F") for name, a in arrays.items()}  # memory layout must not matter
    meta_a = {"b": 1, "a": {"y": 2, "x": 3}}
    meta_b = {"a": {"x": 3, "y": 2}, "b": 1}
    data = pack(meta_a, arrays)
    assert data.startswith(MAGIC)
    assert pack(meta_b, reordered) == data
    assert pack(meta_a, copies) == data
    assert pack(meta_a, _arrays(seed=1)) != data
    assert pack({"b": 2, "a": {"y": 2, "x": 3}}, arrays) != data
    # What comes out packs to the same bytes again.
    assert pack(*unpack(data)) == data


def test_unsupported_dtype_rejected() -> None:
    with pytest.raises(TypeError):
        pack({}, {"objects": np.array([object()], dtype=object)})


@pytest.mark.parametrize("data", [b"", b"INSPK2\n" + b"\x00" * 20, b"\x00" * 64, b"INSPK1"])
def test_bad_magic_raises_value_error(data: bytes) -> None:
    with pytest.raises(ValueError, match="magic"):
        unpack(data)


def test_every_truncation_raises_value_error() -> None:
    data = pack({"name": "x"}, {"a": np.arange(10, dtype=np.float32), "b": np.ones((2, 3), dtype=np.int16)})
    for cut in range(len(data)):
        with pytest.raises(ValueError):
            unpack(data[:cut])


def test_truncated_array_named_in_error() -> None:
    data = pack({}, {"bank": np.arange(100, dtype=np.float64)})
    with pytest.raises(ValueError, match="truncated in array 'bank'"):
        unpack(data[:-1])

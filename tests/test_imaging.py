from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline.features.imaging import (
    ImageDecodeError,
    anomaly_map_to_png,
    decode_image,
    encode_jpeg,
    encode_png,
    find_boxes,
    resize_map,
    resize_rgb,
)
from schemas.messages import DeadLetterReason

MAX_PIXELS = 10_000_000


def _rgb(height: int = 120, width: int = 160, seed: int = 0, noise: float = 20.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Smooth content plus noise: realistic enough for JPEG, and the whole file is not one IDAT byte.
    yy, xx = np.mgrid[:height, :width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], axis=2)
    return np.clip(base + rng.normal(0, noise, base.shape), 0, 255).astype(np.uint8)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with a tiny (wrong-sized) IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _reason(data: bytes, max_pixels: int = MAX_PIXELS) -> str:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, max_pixels)
    return info.value.reason


# ------------------------------------------------------------------------------------------ decode
def test_png_roundtrip_is_exact() -> None:
    image = _rgb()
    decoded = decode_image(encode_png(image), MAX_PIXELS)
    assert decoded.dtype == np.uint8 and decoded.shape == (120, 160, 3)
    np.testing.assert_array_equal(decoded, image)


def test_jpeg_roundtrip_is_close() -> None:
    image = _rgb(noise=2.0)
    decoded = decode_image(encode_jpeg(image, quality=95), MAX_PIXELS)
    assert decoded.dtype == np.uint8 and decoded.shape == image.shape
    assert np.abs(decoded.astype(int) - image.astype(int)).mean() < 3


@pytest.mark.parametrize("encode", [encode_png, encode_jpeg])
def test_grayscale_is_replicated_to_three_channels(encode) -> None:
    gray = _rgb()[:, :, 0]
    decoded = decode_image(encode(gray), MAX_PIXELS)
    assert decoded.shape == (120, 160, 3)
    assert (decoded[:, :, 0] == decoded[:, :, 1]).all() and (decoded[:, :, 1] == decoded[:, :, 2]).all()


def test_rgba_palette_and_16_bit_png_decode_to_rgb() -> None:
    rgba = np.dstack([_rgb(), np.full((120, 160), 128, np.uint8)])
    for image in (Image.fromarray(rgba), Image.fromarray(_rgb()).convert("P")):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        assert decode_image(buffer.getvalue(), MAX_PIXELS).shape == (120, 160, 3)
    deep = (np.arange(120 * 160, dtype=np.uint16).reshape(120, 160) * 3).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(deep).save(buffer, format="PNG")
    decoded = decode_image(buffer.getvalue(), MAX_PIXELS)
    assert decoded.shape == (120, 160, 3)
    assert decoded[-1, -1, 0] == round(deep[-1, -1] / 257)


@pytest.mark.parametrize(
    "data",
    [b"", b"hello world", b"GIF89a" + b"\x00" * 100, b"BM" + b"\x00" * 100, b"\xff\xd8", b"\x89PNG"],
    ids=["empty", "text", "gif", "bmp", "short-jpeg-magic", "short-png-magic"],
)
def test_not_an_image(data: bytes) -> None:
    assert _reason(data) == DeadLetterReason.NOT_AN_IMAGE.value


def test_truncated_jpeg_is_corrupt() -> None:
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # the check below relies on PIL's default
    data = encode_jpeg(_rgb())
    assert _reason(data[: len(data) // 2]) == "corrupt_image"
    assert _reason(data[:-2]) == "corrupt_image"  # only the EOI marker missing
    assert _reason(data[:3]) == "corrupt_image"  # magic number and nothing else


def test_flipped_bytes_in_png_are_corrupt() -> None:
    data = bytearray(encode_png(_rgb()))
    middle = len(data) // 2
    data[middle : middle + 4] = bytes(b ^ 0xFF for b in data[middle : middle + 4])
    assert _reason(bytes(data)) == "corrupt_image"


def test_png_crc_error_is_caught_even_when_pixels_would_decode() -> None:
    # Corrupt only the CRC of the IDAT chunk: zlib data is intact, so only a CRC check notices.
    data = bytearray(encode_png(_rgb()))
    idat = data.index(b"IDAT")
    length = struct.unpack(">I", data[idat - 4 : idat])[0]
    crc_at = idat + 4 + length
    data[crc_at] ^= 0xFF
    assert _reason(bytes(data)) == "corrupt_image"


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_png_is_corrupt(cut: float) -> None:
    data = encode_png(_rgb())
    assert _reason(data[: int(len(data) * cut)]) == "corrupt_image"


def test_png_without_iend_is_corrupt() -> None:
    data = encode_png(_rgb())
    assert data.endswith(_png_chunk(b"IEND", b""))
    assert _reason(data[:-12]) == "corrupt_image"


def test_png_magic_with_garbage_is_corrupt() -> None:
    assert _reason(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4) == "corrupt_image"
    assert _reason(b"\xff\xd8\xff" + bytes(range(256)) * 4) == "corrupt_image"


def test_oversize_is_detected_from_the_header_without_decoding() -> None:
    data = _png_header_only(20_000, 20_000)  # 400 MP: decoding would need 1.2 GB
    start = time.perf_counter()
    assert _reason(data, max_pixels=1_000_000) == "oversize"
    assert time.perf_counter() - start < 0.5


def test_oversize_below_pil_bomb_limit_uses_max_pixels() -> None:
    data = _png_header_only(2000, 1000)  # 2 MP, far below PIL's own limit
    assert _reason(data, max_pixels=1_999_999) == "oversize"
    assert _reason(data, max_pixels=2_000_000) == "corrupt_image"  # allowed size, then bad pixels


def test_oversize_jpeg() -> None:
    data = encode_jpeg(_rgb(200, 300))
    assert _reason(data, max_pixels=200 * 300 - 1) == "oversize"
    assert decode_image(data, max_pixels=200 * 300).shape == (200, 300, 3)


def test_pil_decompression_bomb_warning_becomes_oversize() -> None:
    # Between MAX_IMAGE_PIXELS and twice that PIL only warns; a generous max_pixels must still refuse.
    side = int((Image.MAX_IMAGE_PIXELS * 1.5) ** 0.5)
    assert _reason(_png_header_only(side, side), max_pixels=10**12) == "oversize"


def test_decode_error_is_a_value_error_with_reason() -> None:
    with pytest.raises(ValueError) as info:
        decode_image(b"nope", MAX_PIXELS)
    assert isinstance(info.value, ImageDecodeError)
    assert info.value.reason in {reason.value for reason in DeadLetterReason}


def test_random_corruptions_only_raise_image_decode_error() -> None:
    rng = np.random.default_rng(1)
    sources = [encode_png(_rgb(40, 50)), encode_jpeg(_rgb(40, 50))]
    for _ in range(200):
        data = bytearray(sources[int(rng.integers(2))])
        for position in rng.integers(3, len(data), size=int(rng.integers(1, 6))):
            data[position] = int(rng.integers(256))
        cut = int(rng.integers(3, len(data) + 1))
        try:
            image = decode_image(bytes(data[:cut]), MAX_PIXELS)
        except ImageDecodeError as exc:
            assert exc.reason in {"corrupt_image", "oversize"}
        else:
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


# ------------------------------------------------------------------------------------------ encode
def test_encode_rejects_wrong_dtype_or_shape() -> None:
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError):
        encode_jpeg(np.zeros((4, 4, 4), dtype=np.uint8))


# ------------------------------------------------------------------------------------- map and boxes
def _blob_map(hw: tuple[int, int] = (28, 28), center: tuple[int, int] = (10, 18), radius: float = 3.0):
    yy, xx = np.mgrid[: hw[0], : hw[1]]
    distance2 = (yy - center[0]) ** 2 + (xx - center[1]) ** 2
    return (np.exp(-distance2 / (2 * radius**2)) * 5.0).astype(np.float32)


def test_anomaly_map_png_has_frame_size_and_is_8_bit() -> None:
    png = anomaly_map_to_png(_blob_map(), out_hw=(300, 400), max_score=5.0)
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.mode == "L" and image.size == (400, 300)
        values = np.asarray(image)
    # The blob peak (5.0 = max_score) is near white, at the right place in frame coordinates.
    peak_y, peak_x = np.unravel_index(values.argmax(), values.shape)
    assert values.max() >= 240
    assert abs(peak_y - (10 + 0.5) * 300 / 28) < 12 and abs(peak_x - (18 + 0.5) * 400 / 28) < 15


def test_anomaly_map_png_scales_and_clips() -> None:
    score_map = np.array([[0.0, 1.0], [2.0, 4.0]], dtype=np.float32)
    png = anomaly_map_to_png(score_map, out_hw=(2, 2), max_score=2.0)
    values = np.asarray(Image.open(io.BytesIO(png)))
    np.testing.assert_array_equal(values, [[0, 128], [255, 255]])
    with pytest.raises(ValueError):
        anomaly_map_to_png(score_map, out_hw=(2, 2), max_score=0.0)


def test_resize_map_is_identity_at_the_same_size() -> None:
    score_map = _blob_map()
    np.testing.assert_array_equal(resize_map(score_map, (28, 28)), score_map)
    assert resize_map(score_map, (56, 84)).shape == (56, 84)


def test_boxes_found_around_a_blob() -> None:
    out_hw = (280, 420)
    boxes = find_boxes(_blob_map(), threshold=2.5, out_hw=out_hw)
    assert len(boxes) == 1
    box = boxes[0]
    # Blob centre (10, 18) in the 28x28 map -> frame pixels.
    center_y, center_x = (10 + 0.5) * 280 / 28, (18 + 0.5) * 420 / 28
    assert box.y0 < center_y < box.y1 and box.x0 < center_x < box.x1
    assert 0 <= box.x0 < box.x1 <= 420 and 0 <= box.y0 < box.y1 <= 280
    assert box.area <= (box.x1 - box.x0) * (box.y1 - box.y0)
    assert 4.0 < box.peak_score <= 5.0
    assert not find_boxes(_blob_map(), threshold=6.0, out_hw=out_hw)


def test_boxes_are_exclusive_clipped_sorted_and_small_ones_dropped() -> None:
    score_map = np.zeros((100, 100), dtype=np.float32)
    score_map[0:10, 90:100] = 3.0  # touching the frame corner
    score_map[50:60, 20:40] = 5.0
    score_map[80, 80] = 9.0  # one pixel: 1e-4 of the frame, below min_area_fraction
    score_map[70, 10] = 1.0  # below threshold
    boxes = find_boxes(score_map, threshold=2.0, out_hw=(100, 100))
    assert [(b.x0, b.y0, b.x1, b.y1, b.area, b.peak_score) for b in boxes] == [
        (20, 50, 40, 60, 200, 5.0),
        (90, 0, 100, 10, 100, 3.0),
    ]
    kept = find_boxes(score_map, threshold=2.0, out_hw=(100, 100), min_area_fraction=0.0)
    assert kept[0].peak_score == 9.0 and kept[0].area == 1


def test_boxes_use_eight_connectivity_and_cap_at_32() -> None:
    diagonal = np.eye(20, dtype=np.float32)
    assert len(find_boxes(diagonal, threshold=0.5, out_hw=(20, 20), min_area_fraction=0)) == 1
    dots = np.zeros((100, 100), dtype=np.float32)
    dots[::4, ::4] = np.arange(625, dtype=np.float32).reshape(25, 25)
    boxes = find_boxes(dots, threshold=0.5, out_hw=(100, 100), min_area_fraction=0)
    assert len(boxes) == 32
    assert [b.peak_score for b in boxes] == sorted((b.peak_score for b in boxes), reverse=True)
    assert boxes[0].peak_score == 624.0


# ------------------------------------------------------------------------------------- model input
def test_resize_rgb_shape_range_and_dtype() -> None:
    image = _rgb(300, 500)
    tensor = resize_rgb(image, 224)
    assert tensor.shape == (3, 224, 224) and tensor.dtype == np.float32
    assert 0.0 <= tensor.min() and tensor.max() <= 1.0
    # Channel order preserved: the red channel grows left to right in _rgb.
    assert tensor[0, :, -10:].mean() > tensor[0, :, :10].mean() + 0.5


def test_resize_rgb_antialiases_when_shrinking() -> None:
    checker = ((np.indices((512, 512)).sum(axis=0) % 2) * 255).astype(np.uint8)
    tensor = resize_rgb(np.dstack([checker] * 3), 64)
    assert abs(float(tensor.mean()) - 0.5) < 0.02 and float(tensor.std()) < 0.05

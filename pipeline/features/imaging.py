"""Image bytes in and out: safe decoding of untrusted frames, map/box rendering, backbone resizing.

Frames arrive from the network, so decoding refuses anything suspicious with an `ImageDecodeError`
whose `reason` is a dead-letter reason; it never raises anything else for bad bytes.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image
from scipy import ndimage

from schemas.messages import Box, DeadLetterReason

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_BOXES = 32
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


class ImageDecodeError(ValueError):
    """Bytes that cannot become a frame; `reason` is a DeadLetterReason value."""

    def __init__(self, reason: DeadLetterReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason: str = reason.value
        self.detail = detail


# --------------------------------------------------------------------------------------- decoding
def sniff_format(data: bytes) -> str | None:
    """'JPEG' or 'PNG' from the magic number, else None. The content-type header is not trusted."""
    if data.startswith(JPEG_MAGIC):
        return "JPEG"
    if data.startswith(PNG_MAGIC):
        return "PNG"
    return None


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode JPEG/PNG bytes to uint8 HxWx3 RGB; refuse oversize images before decoding pixels."""
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageDecodeError(DeadLetterReason.NOT_AN_IMAGE, "neither a JPEG nor a PNG magic number")
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; make it an error we can map.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _decode(data, fmt, max_pixels)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(DeadLetterReason.OVERSIZE, str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, ...) on bad data
        raise ImageDecodeError(DeadLetterReason.CORRUPT_IMAGE, f"{fmt}: {exc}") from exc


def _decode(data: bytes, fmt: str, max_pixels: int) -> np.ndarray:
    with Image.open(io.BytesIO(data), formats=[fmt]) as image:
        width, height = image.size  # from the header only: no pixel is decoded yet
        if width * height > max_pixels:
            raise ImageDecodeError(
                DeadLetterReason.OVERSIZE, f"{width}x{height} exceeds {max_pixels} pixels"
            )
        if fmt == "PNG":
            # verify() checks every chunk CRC and that IEND is there; load() alone skips IDAT CRCs
            # and accepts a file cut after its last IDAT. verify() consumes the file, hence reopen.
            image.verify()
    with Image.open(io.BytesIO(data), formats=[fmt]) as image:
        image.load()  # raises on a truncated JPEG as long as LOAD_TRUNCATED_IMAGES stays False
        return _to_rgb(image)


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale PNG: PIL's convert("RGB") clips instead of scaling.
        gray = (np.asarray(image, dtype=np.float32) / 257.0).clip(0, 255).round().astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


# --------------------------------------------------------------------------------------- encoding
def _check_uint8_image(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"expected uint8 HxW or HxWx3, got {image.dtype} {image.shape}")


def encode_png(image: np.ndarray, compress_level: int = 1) -> bytes:
    """PNG bytes of a uint8 gray or RGB image. Level 1: maps are encoded per frame, speed first."""
    _check_uint8_image(image)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def encode_jpeg(image: np.ndarray, quality: int = 92) -> bytes:
    _check_uint8_image(image)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------- maps and boxes
def resize_map(score_map: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear float32 resize of a (h, w) score map to out_hw = (H, W); a no-op if already that size.

    Callers that need both the PNG and the boxes can resize once and pass the result to both.
    """
    score_map = np.nan_to_num(np.asarray(score_map, dtype=np.float32), nan=0.0)
    if score_map.ndim != 2:
        raise ValueError(f"score map must be 2-D, got shape {score_map.shape}")
    height, width = out_hw
    if score_map.shape == (height, width):
        return score_map
    resized = Image.fromarray(np.ascontiguousarray(score_map))  # float32 -> PIL mode "F"
    return np.asarray(resized.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def anomaly_map_to_png(score_map: np.ndarray, out_hw: tuple[int, int], max_score: float) -> bytes:
    """8-bit grayscale PNG at out_hw where 255 means a raw score of max_score (linear from 0)."""
    if not np.isfinite(max_score) or max_score <= 0:
        raise ValueError(f"max_score must be a positive finite number, got {max_score}")
    scaled = resize_map(score_map, out_hw) * np.float32(255.0 / max_score)
    return encode_png(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def find_boxes(
    score_map: np.ndarray,
    threshold: float,
    out_hw: tuple[int, int],
    min_area_fraction: float = 0.0005,
    max_boxes: int = MAX_BOXES,
) -> list[Box]:
    """Bounding boxes (frame pixels, x1/y1 exclusive) of 8-connected regions where score >= threshold.

    Computed on the map resized to the frame, so boxes line up with the map PNG. Regions smaller than
    min_area_fraction of the frame are dropped; the rest are sorted by peak raw score, descending.
    """
    frame_map = resize_map(score_map, out_hw)
    labels, count = ndimage.label(frame_map >= threshold, structure=_EIGHT_CONNECTED)
    if count == 0:
        return []
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    min_area = min_area_fraction * frame_map.size
    boxes = []
    for label, (rows, cols) in enumerate(ndimage.find_objects(labels), start=1):
        if areas[label] < min_area:
            continue
        # Peak within the bounding box only: ndimage.maximum over the whole frame is ~50x slower.
        peak = float(frame_map[rows, cols][labels[rows, cols] == label].max())
        area = int(areas[label])
        boxes.append(Box(x0=cols.start, y0=rows.start, x1=cols.stop, y1=rows.stop, area=area, peak_score=peak))
    boxes.sort(key=lambda box: box.peak_score, reverse=True)
    return boxes[:max_boxes]


# ------------------------------------------------------------------------------------ model inputs
def resize_rgb(image: np.ndarray, size: int, width: int | None = None) -> np.ndarray:
    """float32 3 x size x width (default: square) in [0, 1] from uint8 HxWx3 (or HxW), ignoring the aspect
    (a squeeze: routing's input; experts get pipeline.features.geometry's views). Bilinear, antialiased
    when shrinking."""
    _check_uint8_image(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    # PIL widens the bilinear kernel with the scale factor when downsampling, i.e. it antialiases.
    resized = Image.fromarray(image).resize((width or size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)

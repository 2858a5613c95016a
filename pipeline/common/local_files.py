"""Files this project keeps on the local disk: the per-machine cache root and atomic writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

CACHE_ENV = "INSPECTION_CACHE_DIR"  # replaces the cache root (Kafka jars, converted ViT, SAM masks)


def cache_root() -> Path:
    """$INSPECTION_CACHE_DIR, else ~/.cache/continual-inspection."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "continual-inspection").expanduser()


def write_atomically(path: Path, data: bytes) -> None:
    """Readers see the old file or the whole new one, never a partial write. World-readable (0644):
    mkstemp makes files private, and Prometheus or a user may need to read them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, 0o644)
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

"""Shared fixtures: tiny patch folders built in tmp_path, and the real data when present."""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

if TYPE_CHECKING:
    from common.config import SiteConfig

DEFAULT_REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "idc-real"
REAL_DATA = Path(os.environ.get("IDC_REAL_DATA", DEFAULT_REAL))


def write_patch(
    root: Path,
    patient: str,
    x: int,
    y: int,
    label: int,
    *,
    folder: str | None = None,
    size: tuple[int, int] = (50, 50),
    mode: str = "RGB",
    value: int | None = None,
) -> Path:
    """Write one PNG in the Kaggle layout; ``folder`` overrides the class folder."""
    d = root / patient / (folder if folder is not None else str(label))
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{patient}_idx5_x{x}_y{y}_class{label}.png"
    # crc32, not hash(): str hashes are salted per process, and the pixels must not change
    rng = np.random.default_rng(zlib.crc32(f"{patient}/{x}/{y}".encode()))
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    if value is not None:
        arr[:] = value
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path)
    return path


def node_config_of(cfg: SiteConfig, **extra: object) -> dict[str, object]:
    """The node config ``idc-client start`` would give a ClientApp for ``cfg`` (plus ``extra``)."""
    return {
        "site-name": cfg.site_name,
        "data-dir": str(cfg.data_dir),
        "state-dir": str(cfg.state_dir),
        "cache-dir": str(cfg.cache_dir),
        **extra,
    }


@pytest.fixture
def real_data() -> Path:
    """The shared real patches; fails under CI when missing, skips otherwise."""
    if not REAL_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"real IDC data not found at {REAL_DATA} (set IDC_REAL_DATA)")
        pytest.skip(f"real IDC data not found at {REAL_DATA} (set IDC_REAL_DATA to run)")
    return REAL_DATA


@pytest.fixture(autouse=True)
def _restore_logging():
    """A CLI's main() installs a root handler on the stderr of that moment (pytest's capture,
    closed after the test); put the root logger back so later tests never log into it."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)

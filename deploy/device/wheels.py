"""Re-store downloaded wheels for the trip to the device machine (``device.sh pack``).

Each wheel is rewritten uncompressed (ZIP_STORED), so the one xz stream over all of them
compresses their contents together (about 2.5x smaller than the wheels as downloaded). Ray's
wheel also loses what a Flower simulation never imports (Java jars, RLlib, Tune, Serve, Data,
Train, LLM: 52 MB of its 185), with its RECORD kept consistent, which is what pip checks.

Usage: ``python wheels.py SRC_DIR DEST_DIR``.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

RAY_UNUSED = ("ray/jars/", "ray/rllib/", "ray/tune/", "ray/serve/", "ray/data/", "ray/llm/")
RAY_UNUSED += ("ray/train/",)


def _kept(wheel: str, name: str) -> bool:
    return not (wheel.startswith("ray-") and name.startswith(RAY_UNUSED))


def restore(src: Path, dest: Path) -> None:
    """Write every wheel of ``src`` into ``dest``, uncompressed, pruned where that is safe."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            if not _kept(src.name, info.filename):
                continue
            data = zin.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(ln for ln in lines if _kept(src.name, ln)).encode()
            info.compress_type = zipfile.ZIP_STORED
            zout.writestr(info, data)


def main(argv: list[str]) -> int:
    """``SRC_DIR DEST_DIR``: every wheel of the first, re-stored, into the second."""
    src, dest = Path(argv[0]), Path(argv[1])
    dest.mkdir(parents=True, exist_ok=True)
    wheels = sorted(src.glob("*.whl"))
    if not wheels:
        print(f"wheels.py: no wheels in {src}: run `device.sh pack` first", file=sys.stderr)
        return 1
    for wheel in wheels:
        restore(wheel, dest / wheel.name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The test fixtures themselves: test images are the same in every process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WRITE = (
    "import hashlib, pathlib, sys; from tests.conftest import write_patch; "
    "p = write_patch(pathlib.Path(sys.argv[1]), 'p1', 3, 4, 1); "
    "print(hashlib.sha256(p.read_bytes()).hexdigest())"
)


def test_write_patch_draws_the_same_pixels_whatever_the_hash_seed(tmp_path):
    digests = set()
    for seed in ("1", "2"):  # str hashes differ between these two processes
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", WRITE, str(tmp_path / seed)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        digests.add(out.stdout.strip())
    assert len(digests) == 1

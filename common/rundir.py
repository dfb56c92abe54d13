"""A run's folder: per-round metrics, checkpoints, resume state, final model and summary.

The ServerApp writes it; ``idc-server run`` and the simulation read it while the run goes on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.fileio import atomic_write
from common.metrics import json_safe
from common.paths import MODEL_FILE

DAMAGED = "the run folder is damaged; restore it from a backup, or start a new run"


def _parse(path: Path, text: str, line: int = 0) -> Any:
    """One JSON value of ``path`` (a line of it when ``line``), naming the file if it is not."""
    try:
        return json.loads(text)
    except ValueError as exc:
        where = f"{path} line {line}" if line else str(path)
        raise ValueError(f"{where} is not valid JSON ({exc}): {DAMAGED}") from None


@dataclass(frozen=True)
class RunDir:
    """Files of one run; a round counts as completed once ``state.json`` names it."""

    root: Path

    @property
    def rounds(self) -> Path:  # noqa: D102
        return self.root / "rounds.jsonl"

    @property
    def state(self) -> Path:  # noqa: D102
        return self.root / "state.json"

    def checkpoint(self, server_round: int) -> Path:
        """The global model after ``server_round`` (0: the initial model)."""
        return self.root / "checkpoints" / f"round-{server_round:03d}.npz"

    def create(self) -> RunDir:
        """Make the folders."""
        (self.root / "checkpoints").mkdir(parents=True, exist_ok=True)
        return self

    @property
    def final_model(self) -> Path:
        """THE final model: weights with their provenance record (:mod:`common.provenance`)."""
        return self.root / "final" / MODEL_FILE

    def write_checkpoint(self, server_round: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Write the global model after ``server_round`` atomically."""
        path = self.checkpoint(server_round)
        atomic_write(path, lambda handle: np.savez(handle, allow_pickle=False, **arrays))

    def read_checkpoint(self, server_round: int) -> dict[str, np.ndarray]:
        """The global model after ``server_round``, names in their saved order."""
        with np.load(self.checkpoint(server_round)) as data:
            return {k: data[k] for k in data.files}

    def read_state(self) -> dict[str, Any]:
        """The resume state, or a fresh one; ValueError naming the file if it is damaged."""
        if not self.state.is_file():
            return {"completed_round": 0}
        state = _parse(self.state, self.state.read_text())
        if not isinstance(state, dict):
            raise ValueError(f"{self.state} is not a JSON object: {DAMAGED}")
        return state

    def commit_round(
        self,
        server_round: int,
        row: dict[str, Any],
        arrays: Mapping[str, np.ndarray],
        extra: dict[str, Any],
    ) -> None:
        """Checkpoint, metrics line, then state: a crash in between repeats the round whole."""
        self.write_checkpoint(server_round, arrays)
        done = self.completed_rounds()
        if server_round not in done:
            with open(self.rounds, "a") as fh:
                fh.write(json.dumps(json_safe(row)) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        state = {
            **extra,
            "completed_round": server_round,
            "checkpoint": self.checkpoint(server_round).name,
        }
        atomic_write(self.state, json.dumps(state, indent=2).encode())

    def completed_rounds(self) -> list[int]:
        """Round numbers with a metrics line."""
        return [int(r["round"]) for r in self.read_rounds()]

    def read_rounds(self) -> list[dict[str, Any]]:
        """Every metrics line written so far."""
        if not self.rounds.is_file():
            return []
        lines = self.rounds.read_text().splitlines()
        return [_parse(self.rounds, line, n) for n, line in enumerate(lines, 1) if line]

    def write_json(self, name: str, value: Any) -> Path:
        """Write a JSON file in the run folder atomically."""
        path = self.root / name
        atomic_write(path, json.dumps(json_safe(value), indent=2).encode())
        return path

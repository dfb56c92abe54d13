"""The global model a site last evaluated, kept for the next round's training.

In a round the coordinator sends the aggregated model twice: to evaluate it, then (next round)
to train from it. A site's long-lived executor (:mod:`client.executor`) keeps the model of
its last evaluation and says so in the reply (:data:`common.protocol.HOLDS`); the next train
instruction then names that model's digest instead of carrying 10 MB again. One model is
kept (a site runs one run's messages at a time); its arrays are read-only. Anything that
breaks the chain (another run, another model, an executor restarted in between) makes
:meth:`HeldModel.take` fail with one line, which the coordinator gets as the site's error.
Flower's own ClientApp processes start fresh for every message: there the holder stays
disabled and the site never claims to hold a model.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from common.digests import digest_update


class NotHeld(LookupError):
    """The train instruction names a model this site does not hold."""


def _frozen(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.setflags(write=False)
    return view


class HeldModel:
    """At most one (run, digest, arrays): the model of the site's last evaluation."""

    def __init__(self) -> None:
        self.enabled = False  # set by the long-lived executor only
        self._kept: tuple[str, str, dict[str, np.ndarray]] | None = None

    def keep(self, run_id: str, arrays: Mapping[str, np.ndarray]) -> str | None:
        """Keep ``arrays`` for ``run_id``; their digest, or None when disabled."""
        if not self.enabled:
            return None
        digest = digest_update(arrays)
        self._kept = (run_id, digest, {k: _frozen(v) for k, v in arrays.items()})
        return digest

    def take(self, run_id: str, digest: str) -> dict[str, np.ndarray]:
        """The kept arrays if they are ``run_id``'s model ``digest``, else :class:`NotHeld`."""
        if self._kept is None or self._kept[:2] != (run_id, digest):
            held = f"model {self._kept[1][:12]} of run {self._kept[0]}" if self._kept else "none"
            raise NotHeld(
                f"the instruction names model {digest[:12]} of run {run_id}, but this site "
                f"holds {held} (its executor restarted?): it sits this round out and gets the "
                "model again with the next evaluation"
            )
        return dict(self._kept[2])


HELD_MODEL = HeldModel()  # the process's one holder: the executor enables it

"""A run's config hash: the settings it covers, and the forms earlier releases recorded.

The hash is SHA-256 over the sorted JSON of the run-config keys that define a run (not where
it writes, nor whether it resumes). A key added to the run config after runs were first
resumable is left out while it holds the value it was added with, the value that does what a
run from before the key did: adding a key changes no run's hash, so a run started before the
key existed still resumes, and a changed value of any key, old or new, still changes it.

Until this form, the hash covered every key the release knew. :func:`accepted` also
recognises those hashes, each only for a config whose later keys hold their added values, so
a run recorded by any release since the hash exists resumes, and resumes with its own settings
only. The one exception: a run from before ``max-examples-per-site`` (the first hours of the
hash) is refused as changed; start it again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

# Where a run writes its results and whether it continues one: not part of what the run is.
NOT_DIGESTED = ("run-dir", "resume")

# Keys added after the hash existed, oldest first, each with the value a run from before it
# had (what the code did without the key). Append only: a new key goes at the end with the
# value that keeps today's behaviour, and no recorded hash changes.
ADDED: tuple[tuple[str, Any], ...] = (
    ("strategy", "fedavg"),  # Flower's FedAvg was the only aggregation
    ("proximal-mu", 0.01),  # read by fedprox only
    ("server-learning-rate", 0.0),
    ("server-momentum", 0.9),
    ("precision", "fp32"),  # no autocast before: a resumed run keeps fp32 on a GPU too
    ("channels-last", "off"),  # contiguous tensors before
    ("model", "paper"),
    ("augment", "dihedral+color"),  # the dataset flipped, rotated and jittered on the CPU
    ("weight-decay", 0.0),
    ("lr-schedule", "constant"),
    ("ema", 0.0),
    ("compile", "off"),  # eager modules before
    ("dp.augmult", 1),  # one view of each sampled patch
    ("optimizer", "adam"),  # Adam (AdamW with weight decay) was the only optimizer
)
# Releases that hashed every key they knew, by how many of ADDED they knew: until the
# strategy keys, until precision and layout, until the recipe keys, until this module (the
# 11 keys above ``compile``).
WHOLE_FORMS = (0, 4, 6, 11)


def _hash(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(settings), sort_keys=True).encode()).hexdigest()


def _settings(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in NOT_DIGESTED}


def _at_added(config: Mapping[str, Any], key: str, value: Any) -> bool:
    return key in config and config[key] == value


def digest(config: Mapping[str, Any]) -> str:
    """The hash of a full run config (``RunConfig.to_run_config()``).

    A key of :data:`ADDED` is left out while it holds its added value.
    """
    settings = _settings(config)
    for key, value in ADDED:
        if _at_added(settings, key, value):
            del settings[key]
    return _hash(settings)


def accepted(config: Mapping[str, Any]) -> set[str]:
    """Every hash a release may have recorded for exactly these settings, :func:`digest`'s too.

    A whole-key form counts only where the keys its release did not know hold their added
    values: any other value is a setting that release could not have run.
    """
    settings = _settings(config)
    hashes = {digest(config)}
    for known in WHOLE_FORMS:
        later = ADDED[known:]
        if all(_at_added(settings, key, value) for key, value in later):
            hashes.add(_hash({k: v for k, v in settings.items() if k not in dict(later)}))
    return hashes


def with_added_values(recorded: Mapping[str, Any]) -> dict[str, Any]:
    """A recorded run config with each key it predates set to its added value.

    Never today's default for such a key: a default may do something else than the run did.
    """
    return {**{key: value for key, value in ADDED if key not in recorded}, **recorded}

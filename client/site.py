"""One hospital's side of a round: its data, its split, local training, audit and signing.

The ClientApp handlers in :mod:`client.app` turn Messages into calls here and back. Nothing
here reads a Flower Context: the handlers parse it into :class:`RunConfig` and
:class:`SiteConfig` first.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common import keys
from common.audit import UPDATE_SENT, AuditLog, digest_update
from common.config import RunConfig, SiteConfig
from common.data import LoadOptions, PatchSet, load_patches
from common.dataset import PatchDataset, make_loader
from common.model import build_model
from common.partition import Split, split_by_patient
from common.protocol import EvalMetrics, TrainMetrics
from common.training import TrainConfig, TrainResult, evaluate, resolve_device, train

log = logging.getLogger(__name__)
SITE_KEY = "site.key"
SITE_PUB = "site.pub"
AUDIT_LOG = "audit/site-audit.jsonl"
SITE_FRACTIONS = (0.7, 0.1, 0.2)  # a site's own patients: train / validation / test
EVAL_BATCH = 256


def model_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The exchanged weights: the state dict without batch-norm step counters."""
    return {
        k: v.detach().cpu().numpy()
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }


def load_arrays(model: torch.nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load exchanged weights into ``model``; any other difference is an error."""
    state = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"global model does not fit: missing {missing}, unexpected {unexpected}")


@dataclass
class Site:
    """A site's data and split, loaded once per message (from the decoded-patch cache)."""

    config: SiteConfig
    patches: PatchSet
    split: Split

    @classmethod
    def open(cls, config: SiteConfig, seed: int) -> Site:
        """Load the site's patches and split its own patients, stable across rounds."""
        options = LoadOptions(small=config.small_policy)
        patches = load_patches(config.data_dir, cache_dir=config.cache_dir, options=options)
        return cls(config, patches, split_by_patient(patches.patients, SITE_FRACTIONS, seed))

    def loader(self, part: str, batch_size: int, seed: int, train: bool = False) -> object:
        """A loader over one part of the split; training batches are shuffled and augmented."""
        idx = getattr(self.split, part)
        ds = PatchDataset(self.patches.images, self.patches.labels, idx, augment=train, seed=seed)
        return make_loader(ds, batch_size if train else EVAL_BATCH, shuffle=train, seed=seed)


def open_audit(config: SiteConfig) -> AuditLog:
    """The site's own signed audit log (fails closed: AuditError if it cannot be written)."""
    key = keys.load_private_key(config.state_dir / SITE_KEY)
    return AuditLog(config.state_dir / AUDIT_LOG, key, actor=config.site_name)


def local_train(
    site: Site,
    run: RunConfig,
    arrays: Mapping[str, np.ndarray],
    server_round: int,
) -> tuple[dict[str, np.ndarray], TrainMetrics]:
    """Train the global model on this site's training patients; return weights and metrics."""
    model = build_model(run.norm, seed=run.seed)
    load_arrays(model, arrays)
    seed = run.seed + server_round
    cfg = TrainConfig(epochs=run.local_epochs, lr=run.learning_rate, patience=None)
    result = train(model, site.loader("train", run.batch_size, seed, train=True), cfg)  # type: ignore[arg-type]
    return model_arrays(model), train_metrics(site, run, model, result, seed)


def train_metrics(
    site: Site, run: RunConfig, model: torch.nn.Module, result: TrainResult, seed: int
) -> TrainMetrics:
    """The reply's numbers after local training: last epoch's loss and validation metrics."""
    last = result.history[-1]
    val = evaluate(model, site.loader("val", run.batch_size, seed), resolve_device())  # type: ignore[arg-type]
    return TrainMetrics(
        num_examples=float(len(site.split.train)),
        train_loss=float(last["train_loss"]),
        train_accuracy=float(last["train_accuracy"]),
        val_loss=float(val["loss"]),  # type: ignore[arg-type]
        val_accuracy=float(val["accuracy"]),  # type: ignore[arg-type]
        val_balanced_accuracy=float(val["balanced_accuracy"]),  # type: ignore[arg-type]
    )


def local_evaluate(site: Site, run: RunConfig, arrays: Mapping[str, np.ndarray]) -> EvalMetrics:
    """Evaluate the global model on this site's held-out test patients."""
    model = build_model(run.norm, seed=run.seed)
    load_arrays(model, arrays)
    res = evaluate(model, site.loader("test", run.batch_size, run.seed), resolve_device())  # type: ignore[arg-type]
    return EvalMetrics(
        num_examples=float(res["examples"]),  # type: ignore[arg-type]
        loss=float(res["loss"]),  # type: ignore[arg-type]
        accuracy=float(res["accuracy"]),  # type: ignore[arg-type]
        balanced_accuracy=float(res["balanced_accuracy"]),  # type: ignore[arg-type]
        f1=float(res["f1"]),  # type: ignore[arg-type]
        auc=float(res["auc"]),  # type: ignore[arg-type]
    )


def clip_update(
    update: dict[str, np.ndarray], reference: Mapping[str, np.ndarray], norm: float
) -> None:
    """Clip ``update - reference`` to L2 ``norm`` in place (Flower's own clipping function)."""
    from flwr.supercore.differential_privacy import compute_clip_model_update

    names = list(reference)
    arrays = [np.array(update[k], dtype=update[k].dtype) for k in names]
    compute_clip_model_update(arrays, [np.asarray(reference[k]) for k in names], norm)
    update.update(dict(zip(names, arrays, strict=True)))


def sign_and_record(
    audit: AuditLog,
    config: SiteConfig,
    run_id: str,
    server_round: int,
    arrays: Mapping[str, np.ndarray],
) -> tuple[str, str]:
    """Digest the outgoing update, sign (run, round, digest), and log that it left the site."""
    digest = digest_update(arrays)
    key = keys.load_private_key(config.state_dir / SITE_KEY)
    signature = keys.sign_update(key, run_id, server_round, digest)
    audit.append(
        UPDATE_SENT, run_id, "ok", {"run_id": run_id, "round": server_round, "digest": digest}
    )
    return digest, signature


def site_paths(state_dir: Path) -> tuple[Path, Path]:
    """Where ``idc-client init`` puts the site's key pair."""
    return state_dir / SITE_KEY, state_dir / SITE_PUB

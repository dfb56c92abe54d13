"""One hospital's side of a round: local training and evaluation, audit and signing.

The ClientApp handlers in :mod:`client.app` turn Messages into calls here and back. Nothing
here reads a Flower Context: the handlers parse it into :class:`RunConfig` and
:class:`SiteConfig` first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import numpy as np
import torch

from client.answered import read_evaluations, read_refinements, write_answered
from common import keys
from common.accel import Accel
from common.audit import UPDATE_SENT, AuditLog
from common.config import RunConfig, SiteConfig
from common.digests import digest_update
from common.model import build_model
from common.paths import SitePaths
from common.protocol import EvalMetrics, Histograms, TrainMetrics
from common.recipe import Recipe
from common.site_data import Site, model_arrays, set_weights
from common.threshold import Range, histograms
from common.training import (
    ExtraLoss,
    TrainConfig,
    TrainResult,
    evaluate,
    predict,
    resolve_device,
    train,
)

log = logging.getLogger(__name__)


def open_audit(config: SiteConfig) -> AuditLog:
    """The site's own signed audit log (fails closed: AuditError if it cannot be written)."""
    paths = SitePaths(config.state_dir)
    return AuditLog(paths.audit, keys.load_private_key(paths.key), actor=config.site_name)


def proximal_term(model: torch.nn.Module, mu: float) -> ExtraLoss:
    """FedProx's (mu/2)||w - w_global||^2 (Li et al. 2020), ``w_global`` = ``model`` now."""
    reference = [p.detach().clone() for p in model.parameters()]
    on_device: dict[torch.device, list[torch.Tensor]] = {}  # train() may move the model

    def term(current: torch.nn.Module) -> torch.Tensor:
        params = list(current.parameters())
        device = params[0].device
        refs = on_device.setdefault(device, [r.to(device) for r in reference])
        squared = torch.stack([((p - r) ** 2).sum() for p, r in zip(params, refs, strict=True)])
        return 0.5 * mu * squared.sum()

    return term


def run_accel(run: RunConfig) -> Accel:
    """The run's precision and layout on this site's device."""
    return Accel.resolve(resolve_device(), run.precision, run.channels_last, run.compile)


def local_train(
    site: Site,
    run: RunConfig,
    arrays: Mapping[str, np.ndarray],
    server_round: int,
    proximal_mu: float = 0.0,
) -> tuple[dict[str, np.ndarray], TrainMetrics]:
    """Train the global model on this site's training patients; return weights and metrics.

    ``proximal_mu`` > 0 adds FedProx's proximal term to the local loss.
    """
    model = build_model(run.norm, seed=run.seed, kind=run.model)
    set_weights(model, arrays)
    seed = run.seed + server_round
    cfg = local_config(run, seed)
    extra = proximal_term(model, proximal_mu) if proximal_mu > 0 else None
    accel = run_accel(run)
    batches = site.train_batches(run.batch_size, seed, accel, augment_in_loop=True)
    result = train(model, batches, cfg, extra_loss=extra)
    return model_arrays(model), train_metrics(site, run, model, result, seed)


def local_config(run: RunConfig, seed: int) -> TrainConfig:
    """One round's local training: the run's epochs, learning rate and recipe, no stopping."""
    recipe = Recipe.from_run(run)
    return TrainConfig(
        epochs=run.local_epochs,
        lr=run.learning_rate,
        patience=None,
        precision=run.precision,
        channels_last=run.channels_last,
        compile=run.compile,
        recipe=recipe,
        seed=seed,
    )


def train_metrics(
    site: Site, run: RunConfig, model: torch.nn.Module, result: TrainResult, seed: int
) -> TrainMetrics:
    """The reply's numbers after local training: last epoch's loss and validation metrics."""
    last = result.history[-1]
    accel = run_accel(run)
    loader = site.eval_batches("val", seed, accel)
    val = evaluate(model, loader, accel.device, accel)
    return TrainMetrics(
        num_examples=float(len(site.split.train)),
        train_loss=float(last["train_loss"]),
        train_accuracy=float(last["train_accuracy"]),
        val_loss=val.loss,
        val_accuracy=val.accuracy,
        val_balanced_accuracy=val.balanced_accuracy,
    )


def local_evaluate(site: Site, run: RunConfig, arrays: Mapping[str, np.ndarray]) -> EvalMetrics:
    """Evaluate the global model on this site's held-out test patients.

    The reply also carries two histograms of P(IDC) on the site's validation patients
    (counts per bin, no per-patch data): the coordinator chooses the decision threshold
    on their sum (:mod:`common.threshold`), never on test patients.
    """
    model = build_model(run.norm, seed=run.seed, kind=run.model)
    set_weights(model, arrays)
    accel = run_accel(run)
    res = evaluate(model, site.eval_batches("test", run.seed, accel), accel.device, accel)
    positives, negatives = histograms(*_validation_probs(site, run, model))
    return EvalMetrics(
        num_examples=float(res.examples),
        loss=res.loss,
        accuracy=res.accuracy,
        balanced_accuracy=res.balanced_accuracy,
        f1=res.f1,
        auc=res.auc,
        val_positives=tuple(positives),
        val_negatives=tuple(negatives),
    )


def _validation_probs(
    site: Site, run: RunConfig, model: torch.nn.Module
) -> tuple[np.ndarray, np.ndarray]:
    accel = run_accel(run)
    labels, probs, _ = predict(
        model, site.eval_batches("val", run.seed, accel), accel.device, accel
    )
    return labels, probs


def claim_refinement(config: SiteConfig, run_id: str) -> None:
    """Answer one threshold refinement a run: record this one, refuse any later one.

    A refinement bins the site's validation P(IDC) on a range as narrow as
    :data:`common.threshold.MIN_SPAN`; the coordinator asks once, after the last round
    (:mod:`server.refine`). A second query of the same run could only be narrowing in on
    single patches, so it is refused (ValueError: the coordinator gets an error reply). The
    claim is written before anything is computed; a record that cannot be read or written
    refuses the query (fail closed).
    """
    path = SitePaths(config.state_dir).refinements
    answered = read_refinements(path)
    if run_id in answered:
        raise ValueError(
            f"site {config.site_name} answers one threshold refinement a run and answered run "
            f"{run_id}'s at {answered[run_id]}"
        )
    answered[run_id] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_answered(path, answered)


def claim_evaluation(config: SiteConfig, run_id: str) -> None:
    """Count one more evaluation of run ``run_id``; refuse it past the site's cap.

    Each evaluation sends the test metrics and validation histograms of a model the
    coordinator chose, none of it differentially private: a coordinator sending crafted model
    after crafted model could learn about single patches. So a site answers at most
    ``config.max_evaluations`` a run (``idc-client start --max-evaluations``), whatever the
    run asks. Counted before anything is computed; a record that cannot be read or written
    refuses (fail closed).
    """
    path = SitePaths(config.state_dir).evaluations
    answered = read_evaluations(path)
    done = answered.get(run_id, 0)
    if done >= config.max_evaluations:
        raise ValueError(
            f"site {config.site_name} answers at most {config.max_evaluations} evaluations a "
            f"run (its --max-evaluations) and answered {done} of run {run_id}"
        )
    answered[run_id] = done + 1
    write_answered(path, answered)


def refine_histograms(
    site: Site, run: RunConfig, arrays: Mapping[str, np.ndarray], span: Range
) -> Histograms:
    """The global model's validation histograms on ``span`` (a refinement query; no test data)."""
    model = build_model(run.norm, seed=run.seed, kind=run.model)
    set_weights(model, arrays)
    positives, negatives = histograms(*_validation_probs(site, run, model), span)
    return Histograms(tuple(positives), tuple(negatives))


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
    key = keys.load_private_key(SitePaths(config.state_dir).key)
    signature = keys.sign_update(key, run_id, server_round, digest)
    audit.append(
        UPDATE_SENT, run_id, "ok", {"run_id": run_id, "round": server_round, "digest": digest}
    )
    return digest, signature

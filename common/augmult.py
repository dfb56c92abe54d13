"""Augmentation multiplicity for DP-SGD: K augmented views per sampled patch, one clip per patch.

De et al. (2022) train each Poisson-sampled example on K augmented views and average the K
per-sample gradients *before* clipping. The privacy unit stays one patch: a patch's whole
contribution to a step is the clipped average of its own views, bounded by the clipping norm
as before, and the sampling (and so the accountant's sample rate and steps) is untouched. The
views cost K times the compute and lower the variance of each patch's gradient.

The mechanics, for Opacus's per-sample-gradient engines (hooks, functorch):

* :func:`repeat_views` repeats each patch of a sampled batch K times, views of one patch next
  to each other; the training loop's augmentation then draws every row independently, so the K
  copies become K different views. (With augmentation off the copies stay identical and K only
  costs time, so a run config refuses that combination.)
* :class:`AugmultDPOptimizer` folds the per-sample gradients of those N*K rows into N patch
  gradients (the mean over each patch's K rows) before Opacus clips them. With the model's
  ``loss_reduction="mean"`` a row's per-sample gradient is the gradient of that row's own loss,
  so the fold is the gradient of the patch's mean loss over its views.

Ghost clipping computes per-row norms, never per-row gradients, so it cannot fold them: K > 1
uses the per-sample engines only (:func:`common.privacy.make_private`).
"""

from __future__ import annotations

from typing import cast

import torch
from opacus.optimizers import DPOptimizer


def check_views(views: object) -> int:
    """Return ``views`` if it is an integer >= 1, else raise ``ValueError`` naming it."""
    if not isinstance(views, int) or isinstance(views, bool) or views < 1:
        raise ValueError(f"augmentation multiplicity must be an integer >= 1, got {views!r}")
    return views


def repeat_views(x: torch.Tensor, y: torch.Tensor, views: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each patch ``views`` times in a row (rows i*K .. i*K+K-1 are patch i), labels alike."""
    if views == 1:
        return x, y
    return x.repeat_interleave(views, dim=0), y.repeat_interleave(views, dim=0)


class AugmultDPOptimizer(DPOptimizer):
    """Opacus's DPOptimizer clipping the mean of each patch's K views' per-sample gradients.

    Every place Opacus reads per-sample gradients (the norms and the clipped sum) goes through
    ``_get_flat_grad_sample``, so folding there is enough. Expected batch size, noise and the
    accountant's hook are Opacus's own, in patches.
    """

    views: int = 1

    def _get_flat_grad_sample(self, p: torch.Tensor) -> torch.Tensor:
        rows = super()._get_flat_grad_sample(p)
        if self.views == 1:
            return rows
        if len(rows) % self.views:
            raise RuntimeError(
                f"{len(rows)} per-sample gradients are not {self.views} views per patch: the "
                "loop trained on a batch the view-repeating loader did not produce"
            )
        return rows.view(len(rows) // self.views, self.views, *rows.shape[1:]).mean(dim=1)


def fold_views(optimizer: DPOptimizer, views: int) -> AugmultDPOptimizer:
    """Make Opacus's plain DPOptimizer ``optimizer`` fold ``views`` rows per patch, in place.

    PrivacyEngine builds the optimizer (with its accountant hook) itself; the subclass only
    overrides one method and adds one attribute, so switching the instance's class keeps
    everything the engine set up.
    """
    if type(optimizer) is not DPOptimizer:
        raise TypeError(
            f"augmentation multiplicity needs Opacus's DPOptimizer, got {type(optimizer).__name__}"
        )
    optimizer.__class__ = AugmultDPOptimizer
    folded = cast(AugmultDPOptimizer, optimizer)
    folded.views = check_views(views)
    return folded

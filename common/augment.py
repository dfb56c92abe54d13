"""Training-time augmentation of a batch already on its device: the 8 symmetries, stain jitter.

Histology has no orientation, so every patch is as likely as any of its 8 flips/rotations
(the dihedral group of the square). ``"dihedral"`` draws one of the 8 per patch, uniformly:
an optional transpose, then optional flips of rows and of columns (2 x 2 x 2 = 8 distinct
maps). ``"dihedral+color"`` adds a mild stain/colour jitter per patch: brightness, contrast,
saturation and a per-channel gain (the hue-like part of an H&E stain difference), each a few
percent, clamped to [0, 1].

Everything is a batched tensor op on the batch's own device (no per-patch Python, no
torchvision). The random draws come from a seeded CPU generator, so a run is repeatable on
any device; only ``n`` numbers per batch cross to the device. Evaluation never augments:
only :func:`common.training.train` calls this.
"""

from __future__ import annotations

import torch

from common.config import AUGMENTS, Augment

BRIGHTNESS = 0.04  # additive, in [0, 1] intensity units
CONTRAST = 0.10  # multiplicative around the patch's mean
SATURATION = 0.10  # multiplicative around each pixel's grey level
GAIN = 0.05  # per channel: shifts the hue of the stain a little


def check_augment(mode: str) -> Augment:
    """Return ``mode`` if it names an augmentation, else raise ValueError naming it."""
    if mode not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {mode!r}")
    return mode  # type: ignore[return-value]  # checked just above


def _uniform(n: int, shape: tuple[int, ...], width: float, gen: torch.Generator) -> torch.Tensor:
    return (torch.rand((n, *shape), generator=gen) * 2.0 - 1.0) * width


def dihedral(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Map each (C, H, W) patch of square ``x`` by one of the 8 symmetries, drawn uniformly."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"dihedral augmentation needs square patches, got {tuple(x.shape)}")
    flags = (torch.rand((3, x.shape[0]), generator=gen) < 0.5).to(x.device)
    mask = flags[:, :, None, None, None]
    x = torch.where(mask[0], x.transpose(-1, -2), x)
    x = torch.where(mask[1], x.flip(-2), x)
    return torch.where(mask[2], x.flip(-1), x)


def color_jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild per-patch brightness, contrast, saturation and per-channel gain; stays in [0, 1]."""
    n = x.shape[0]
    draws = torch.cat(
        [
            _uniform(n, (1,), BRIGHTNESS, gen),
            1.0 + _uniform(n, (1,), CONTRAST, gen),
            1.0 + _uniform(n, (1,), SATURATION, gen),
            1.0 + _uniform(n, (3,), GAIN, gen),
        ],
        dim=1,
    ).to(device=x.device, dtype=x.dtype)
    shift, contrast, saturation = (draws[:, i, None, None, None] for i in range(3))
    gain = draws[:, 3:, None, None]
    grey = x.mean(dim=1, keepdim=True)
    x = grey + (x - grey) * saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (x - mean) * contrast
    return (x * gain + shift).clamp_(0.0, 1.0)


def augment_batch(x: torch.Tensor, mode: Augment, gen: torch.Generator) -> torch.Tensor:
    """Augment a float (N, C, H, W) batch as ``mode`` says; ``"none"`` returns it unchanged."""
    if mode == "none" or x.shape[0] == 0:
        return x
    x = dihedral(x, gen)
    return color_jitter(x, gen) if mode == "dihedral+color" else x

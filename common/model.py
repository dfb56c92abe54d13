"""The paper's residual CNN for 50x50 RGB IDC patches (Table 2), with a selectable norm layer.

Table 2 of the paper lists, for a Keras model on (50, 50, 3) inputs:

* a stem ``Conv2D`` 3->32 (3x3, 896 parameters) followed by batch norm;
* four residual blocks, each two 3x3 32->32 convolutions with batch norm, an identity add and a
  ReLU after the add;
* max-pool 2, dropout, flatten (25 * 25 * 32 = 20,000 features);
* dense 128 + batch norm, dense 64 + batch norm, dense 64, dropout, dense 2.

Its totals are 2,648,514 trainable and 960 non-trainable parameters (2,649,474 in all). Two
rows of the table are misprinted: ``conv2d_1`` shows 0 parameters and ``dense_1`` shows 8216.
The totals only add up with the values this architecture really has, 9248 (3*3*32*32 + 32)
and 8256 (128*64 + 64), so those are what this module builds. The 960 non-trainable values
are the batch-norm running means and variances (9 * 2 * 32 + 2 * 128 + 2 * 64).

The paper does not print activations inside ``Conv2D``/``Dense`` layers nor the dropout
rates. Following its text ("32 filters of size 3x3 and ReLU activation functions") the stem
convolution and the three hidden dense layers use ReLU; the dropout rates are 0.25 after the
pooling and 0.5 before the output, the usual Keras-example values. Neither choice changes a
parameter count.

``norm="group"`` swaps every batch norm for a GroupNorm with the same affine parameters and no
running statistics, which Opacus can train with per-sample gradients.

``kind="gap"`` is a DP-friendly variant, not the paper's: the same stem and residual blocks,
then global average pooling (32 features) in place of max-pool + flatten + dense 20000->128,
and the paper's head from there on (dense 32->128, 128->64, 64->64, 64->2). The dense
20000->128 layer holds 97% of the paper's parameters, and under DP-SGD every one of them gets
clipped and noised; without it the network has 92,610 trainable parameters (75,456 of them
in the trunk) instead of 2,648,514. Its exchanged weights keep the paper's names, so
:func:`model_kind` tells the two apart by the first dense layer's input width.

``kind="paper-ws"`` and ``"gap-ws"`` use weight-standardized convolutions (:class:`WSConv2d`,
Qiao et al. 2019; with group norm, the DP-SGD recipe of De et al. 2022): every kernel is
standardized per output channel on each forward pass and scaled by a learned per-channel gain.
The gain (``<conv>.gain``, 32 values per convolution) is what :func:`model_kind` recognises
them by; the plain kinds are unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.config import MODEL_KINDS, ModelKind, Norm

NORMS: tuple[str, ...] = ("batch", "group")
FIRST_DENSE = "head.0.weight"  # (128, inputs): 20,000 inputs in the paper, 32 after pooling
CHANNELS = 32
PATCH_SIZE = 50
NUM_CLASSES = 2
# Groups for GroupNorm: 8 divides 32, 128 and 64, so every norm layer gets the same rule.
GROUPS = 8
WS_GAIN = "stem.0.gain"  # present in the weight-standardized kinds only
WS_EPS = 1e-5


class WSConv2d(nn.Conv2d):
    """A Conv2d whose kernel is standardized per output channel, times a learned gain.

    Standardizing in the forward pass (not as a parametrization) keeps the state dict's
    ``weight`` and ``bias`` names, so exchanged weights look like the plain network's plus
    ``gain``. Opacus computes its per-sample gradients with functorch (the standardization is
    part of the layer's function), so clipping sees the gradient the layer really has.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, padding: int) -> None:
        super().__init__(in_channels, out_channels, kernel, padding=padding)
        self.gain = nn.Parameter(torch.ones(out_channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (w - mean) * torch.rsqrt(var + WS_EPS) * self.gain
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def _conv(ws: bool, in_channels: int, out_channels: int) -> nn.Conv2d:
    if ws:
        return WSConv2d(in_channels, out_channels, 3, padding=1)
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


def _norm2d(kind: Norm, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(GROUPS, channels)


def _norm1d(kind: Norm, features: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm1d(features)
    return nn.GroupNorm(GROUPS, features)


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with norm, added to the block's input, then ReLU."""

    def __init__(self, norm: Norm, channels: int = CHANNELS, ws: bool = False) -> None:
        super().__init__()
        self.conv1 = _conv(ws, channels, channels)
        self.norm1 = _norm2d(norm, channels)
        self.conv2 = _conv(ws, channels, channels)
        self.norm2 = _norm2d(norm, channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        f = self.norm2(self.conv2(self.relu(self.norm1(self.conv1(x)))))
        return self.relu(x + f)


def _pool(kind: ModelKind) -> tuple[nn.Module, int]:
    """The layers between the trunk and the head, and how many features they hand on."""
    if kind.startswith("gap"):
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), CHANNELS
    pool = nn.Sequential(nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten())
    return pool, CHANNELS * (PATCH_SIZE // 2) ** 2  # 20,000


class IDCNet(nn.Module):
    """The Table 2 network: stem, four residual blocks, pooling, three dense layers, logits."""

    def __init__(self, norm: Norm = "batch", kind: ModelKind = "paper") -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if kind not in MODEL_KINDS:
            raise ValueError(f"model must be one of {MODEL_KINDS}, got {kind!r}")
        self.norm = norm
        self.kind = kind
        ws = kind.endswith("-ws")
        self.stem = nn.Sequential(_conv(ws, 3, CHANNELS), nn.ReLU(), _norm2d(norm, CHANNELS))
        self.blocks = nn.Sequential(*(ResidualBlock(norm, ws=ws) for _ in range(4)))
        self.pool, flat = _pool(kind)
        self.head = nn.Sequential(
            nn.Linear(flat, 128),
            nn.ReLU(),
            _norm1d(norm, 128),
            nn.Linear(128, 64),
            nn.ReLU(),
            _norm1d(norm, 64),
            nn.Linear(64, 64),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(64, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a batch of (N, 3, 50, 50) floats in [0, 1] to (N, 2) logits."""
        return self.head(self.pool(self.blocks(self.stem(x))))


def build_model(norm: Norm = "batch", seed: int | None = 0, kind: ModelKind = "paper") -> IDCNet:
    """Build the paper's network (or ``kind``); the same seed gives the same initial weights.

    ``seed=None`` leaves the global torch RNG in charge. A seeded build does not disturb the
    caller's RNG state.
    """
    if seed is None:
        return IDCNet(norm, kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return IDCNet(norm, kind)


def model_kind(arrays: Mapping[str, Any]) -> ModelKind:
    """Which variant exchanged weights belong to: the first dense layer's width, and any gain.

    Raises
    ------
    ValueError
        If the weights have no first dense layer of either width.
    """
    weight = arrays.get(FIRST_DENSE)
    width = None if weight is None or len(weight.shape) != 2 else int(weight.shape[1])
    ws = WS_GAIN in arrays
    if width == CHANNELS:
        return "gap-ws" if ws else "gap"
    if width == CHANNELS * (PATCH_SIZE // 2) ** 2:
        return "paper-ws" if ws else "paper"
    raise ValueError(f"weights have no {FIRST_DENSE} of 20000 or {CHANNELS} inputs")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return (trainable parameters, non-trainable values) the way Keras counts them.

    Non-trainable values are the floating-point buffers (batch-norm running statistics);
    the integer ``num_batches_tracked`` counters are bookkeeping, not parameters.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    return trainable, frozen + buffers

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
"""

from __future__ import annotations

import torch
from torch import nn

from common.config import Norm

NORMS: tuple[str, ...] = ("batch", "group")
CHANNELS = 32
PATCH_SIZE = 50
NUM_CLASSES = 2
# Groups for GroupNorm: 8 divides 32, 128 and 64, so every norm layer gets the same rule.
GROUPS = 8


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

    def __init__(self, norm: Norm, channels: int = CHANNELS) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm1 = _norm2d(norm, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = _norm2d(norm, channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        f = self.norm2(self.conv2(self.relu(self.norm1(self.conv1(x)))))
        return self.relu(x + f)


class IDCNet(nn.Module):
    """The Table 2 network: stem, four residual blocks, pooling, three dense layers, logits."""

    def __init__(self, norm: Norm = "batch") -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.norm = norm
        self.stem = nn.Sequential(
            nn.Conv2d(3, CHANNELS, 3, padding=1), nn.ReLU(), _norm2d(norm, CHANNELS)
        )
        self.blocks = nn.Sequential(*(ResidualBlock(norm) for _ in range(4)))
        self.pool = nn.Sequential(nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten())
        flat = CHANNELS * (PATCH_SIZE // 2) ** 2  # 20,000
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


def build_model(norm: Norm = "batch", seed: int | None = 0) -> IDCNet:
    """Build the paper's network; the same seed gives the same initial weights.

    ``seed=None`` leaves the global torch RNG in charge. A seeded build does not disturb the
    caller's RNG state.
    """
    if seed is None:
        return IDCNet(norm)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return IDCNet(norm)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return (trainable parameters, non-trainable values) the way Keras counts them.

    Non-trainable values are the floating-point buffers (batch-norm running statistics);
    the integer ``num_batches_tracked`` counters are bookkeeping, not parameters.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    return trainable, frozen + buffers

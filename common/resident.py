"""Patches kept on the training device: shuffled batches with no loader and no host copy.

A site's decoded patches are small (17k patches are 128 MB as uint8), so on a GPU they are
copied there once, as uint8, and every batch is a gather on the device: the shuffle is a
``torch.randperm`` drawn by a generator on the device, the scaling to floats in [0, 1] happens
there, and no DataLoader worker, collate call or host-to-device copy sits in a step.

:class:`ResidentBatches` yields ``(x, y)`` like :func:`common.dataset.make_loader`'s loader
(x float (N, 3, 50, 50) in [0, 1], y int64), so the training loop, and augmentation applied
to a batch after :func:`common.training.to_device`, work on either unchanged. Each pass is a
fresh permutation (shuffle) or the stored order (no shuffle), every patch exactly once; the
sequence of permutations is fixed by the seed. Opacus's Poisson sampling keeps its own loader.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

# Use at most this share of the device memory free when the patches are placed: the rest is
# for activations, weights and the allocator's slack.
RESIDENT_SHARE = 0.25


def fits(nbytes: int, device: torch.device) -> bool:
    """Whether ``nbytes`` of patches may live on ``device`` (always on a CPU: they already do)."""
    if device.type != "cuda":
        return True
    free, _total = torch.cuda.mem_get_info(device)
    return nbytes <= RESIDENT_SHARE * free


def _as_tensor(images: np.ndarray, indices: np.ndarray | None) -> torch.Tensor:
    # One gather into a private buffer: a read-only memory map cannot back a torch tensor.
    picked = images[indices] if indices is not None else np.array(images)
    return torch.from_numpy(np.ascontiguousarray(picked))


class ResidentBatches:
    """Batches of ``images[indices]`` from a uint8 copy kept on ``device``.

    The copy is stored NHWC as the cache holds it; a batch is permuted to (N, C, H, W), which
    is the channels-last layout in memory, so ``channels_last=False`` makes it contiguous.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        device: torch.device,
        indices: np.ndarray | None = None,
        shuffle: bool = False,
        seed: int = 0,
        channels_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        idx = None if indices is None else np.asarray(indices, dtype=np.int64)
        self.images = _as_tensor(images, idx).to(device)
        y = np.asarray(labels, dtype=np.int64)
        self.labels = torch.from_numpy(y[idx] if idx is not None else y.copy()).to(device)
        self.batch_size = batch_size
        self.device = device
        self.shuffle = shuffle
        self.channels_last = channels_last
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __len__(self) -> int:
        """Batches per pass (the last one may be short, as the loader's)."""
        return -(-len(self.labels) // self.batch_size)

    def order(self) -> torch.Tensor:
        """The order of one pass: a fresh seeded permutation, or the stored order."""
        n = len(self.labels)
        if self.shuffle:
            return torch.randperm(n, generator=self.generator, device=self.device)
        return torch.arange(n, device=self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (x float in [0, 1], y) on the device; nothing is read back to the host."""
        order = self.order()
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            x = self.images.index_select(0, idx).permute(0, 3, 1, 2)
            if not self.channels_last:
                x = x.contiguous()
            yield x.float().div_(255.0), self.labels.index_select(0, idx)

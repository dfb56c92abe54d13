"""Torch access to decoded patches: batched fetches, augmentation, loaders.

The dataset implements ``__getitems__`` so a DataLoader fetches a whole batch with one numpy
gather instead of one Python call per patch, and ``__getitem__`` so Opacus's Poisson-sampling
``DPDataLoader`` (which builds its own batch sampler over the same dataset) works unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

# Mild stain jitter: per-channel gain and a shared brightness shift.
JITTER_GAIN = 0.05
JITTER_SHIFT = 0.03


class PatchDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Patches ``images[indices]`` as (3, 50, 50) tensors with int labels.

    Without augmentation the patches stay uint8 and :func:`common.training.to_device` scales
    them to [0, 1] on the device (a quarter of the bytes to move; on a GPU the conversion is
    free). With augmentation they are floats in [0, 1] already.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        indices: np.ndarray | None = None,
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.indices = np.arange(len(labels)) if indices is None else np.asarray(indices)
        self.augment = augment
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def __getitems__(self, items: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Fetch a batch: one gather from the (possibly memory-mapped) array."""
        idx = self.indices[np.asarray(items, dtype=np.int64)]
        order = np.argsort(idx)  # sorted reads are kinder to a memory map
        batch = np.empty((len(idx), 50, 50, 3), dtype=np.uint8)
        batch[order] = self.images[idx[order]]
        x = torch.from_numpy(batch).permute(0, 3, 1, 2)
        if self.augment:
            x = x.float().div_(255.0)
            if len(idx):
                x = augment_batch(x, self.rng)
        return x.contiguous(), torch.from_numpy(self.labels[idx])


def augment_batch(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random flips, 90-degree rotations and mild colour jitter, drawn per patch."""
    n = x.shape[0]
    flip = torch.from_numpy(rng.random(n) < 0.5)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    turns = rng.integers(0, 4, n)
    for k in (1, 2, 3):
        sel = torch.from_numpy(turns == k)
        if sel.any():
            x[sel] = torch.rot90(x[sel], k, dims=(-2, -1))
    gain = 1.0 + torch.from_numpy(rng.uniform(-JITTER_GAIN, JITTER_GAIN, (n, 3, 1, 1))).float()
    shift = torch.from_numpy(rng.uniform(-JITTER_SHIFT, JITTER_SHIFT, (n, 1, 1, 1))).float()
    return (x * gain + shift).clamp_(0.0, 1.0)


def collate(batch: object) -> object:
    """Pass through a batch that ``__getitems__`` already stacked; else torch's default."""
    if isinstance(batch, tuple) and len(batch) == 2 and all(torch.is_tensor(t) for t in batch):
        return batch
    return default_collate(batch)  # type: ignore[arg-type]


def make_loader(
    dataset: PatchDataset, batch_size: int, shuffle: bool, seed: int = 0
) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
    """Build the loader every caller uses (client, baseline, simulation)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator
    )

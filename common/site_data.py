"""One site's data, its patient split and its loaders; the exchanged weights of a model.

Used by the site's ClientApp (:mod:`client.site`) and by the simulation, whose baselines
train on exactly the split a site trains on. Loaded once per message from the
decoded-patch cache.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from common.accel import Accel
from common.config import SiteConfig
from common.data import LoadOptions, PatchSet, load_patches
from common.dataset import PatchDataset, make_loader
from common.partition import Split, split_by_patient
from common.resident import ResidentBatches, fits

SITE_FRACTIONS = (0.7, 0.1, 0.2)  # a site's own patients: train / validation / test
EVAL_BATCH = 256
Part = Literal["train", "val", "test"]
Loader = DataLoader[tuple[torch.Tensor, torch.Tensor]]


def model_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The exchanged weights: the state dict without batch-norm step counters."""
    return {
        k: v.detach().cpu().numpy()
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }


def set_weights(model: torch.nn.Module, arrays: Mapping[str, np.ndarray]) -> torch.nn.Module:
    """Put exchanged weights into ``model``; any difference in names or shapes is an error.

    Raises
    ------
    ValueError
        Naming the missing, unexpected or wrongly shaped entries.
    """
    state = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(v.shape)} (model {tuple(own[k].shape)})"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"weights do not fit the model: missing {missing}, unexpected {unexpected}, "
            f"wrong shape {wrong}"
        )
    model.load_state_dict(state, strict=False)
    return model


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
        split = split_by_patient(patches.patients, patches.labels, SITE_FRACTIONS, seed)
        return cls(config, patches, split)

    def loader(self, part: Part, batch_size: int, seed: int, train: bool = False) -> Loader:
        """A loader over one part of the split; training batches are shuffled.

        The training loop augments them on the device, as the run's ``augment`` says.
        """
        idx = getattr(self.split, part)
        ds = PatchDataset(self.patches.images, self.patches.labels, idx)
        return make_loader(ds, batch_size if train else EVAL_BATCH, shuffle=train, seed=seed)

    def train_batches(
        self, batch_size: int, seed: int, accel: Accel, augment_in_loop: bool = False
    ) -> Loader | ResidentBatches:
        """Shuffled training batches: on the GPU when they fit and the loop augments them.

        ``augment_in_loop``: the training loop augments each batch on its device, so the
        batches need not be augmented here; otherwise the loader augments them on the CPU.
        """
        idx = self.split.train
        nbytes = len(idx) * self.patches.images[0].nbytes
        if not augment_in_loop or accel.device.type != "cuda" or not fits(nbytes, accel.device):
            return self.loader("train", batch_size, seed, train=True)
        images, labels = self.patches.images, self.patches.labels
        return ResidentBatches(
            images,
            labels,
            batch_size,
            accel.device,
            idx,
            shuffle=True,
            seed=seed,
            channels_last=accel.channels_last,
        )

    def eval_batches(self, part: Part, seed: int, accel: Accel) -> Loader | ResidentBatches:
        """Evaluation batches of one part: from a copy on the GPU when it fits there.

        Training batches keep :meth:`loader` while augmentation runs inside it on the CPU.
        """
        idx = getattr(self.split, part)
        gpu = accel.device.type == "cuda"
        if not gpu or not fits(len(idx) * self.patches.images[0].nbytes, accel.device):
            return self.loader(part, EVAL_BATCH, seed)
        images, labels = self.patches.images, self.patches.labels
        return ResidentBatches(
            images, labels, EVAL_BATCH, accel.device, idx, channels_last=accel.channels_last
        )

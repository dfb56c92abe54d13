"""THE training loop and THE evaluation loop, shared by the client, the baseline and simulation.

The loop takes the model, optimizer and loader it is given. Differential privacy does not copy
it: Opacus's ``make_private`` returns a wrapped model, a DP optimizer and a Poisson-sampling
loader, and those objects are passed in here instead of the plain ones.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from common.metrics import Evaluation, score
from common.recipe import Recipe, RecipeRun, make_optimizer

log = logging.getLogger(__name__)
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one call to :func:`train` (the paper: Adam 1e-4, 40 epochs)."""

    epochs: int = 40
    lr: float = 1e-4
    patience: int | None = 5  # epochs without a better validation loss; None turns it off
    device: str = "auto"
    progress: bool = False
    recipe: Recipe = Recipe()  # augmentation, weight decay, schedule, averaging: off
    seed: int = 0  # of the augmentation draws

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be a positive number, got {self.lr}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {self.patience}")


@dataclass
class TrainResult:
    """Per-epoch history and what the loop did."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    steps: int = 0
    examples: int = 0


def resolve_device(name: str = "auto") -> torch.device:
    """Return ``cuda`` when asked for ``auto`` and a GPU is present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_device(
    x: torch.Tensor, y: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a batch to ``device``; uint8 patches become floats in [0, 1] there."""
    x = x.to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    return x, y.to(device, non_blocking=True)


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Poisson sampling (DP) can draw an empty batch; keep the graph so the DP optimizer still
    # takes its (noise-only) step, as its accountant assumes.
    return F.cross_entropy(logits, y) if len(y) else logits.sum() * 0.0


def train_epoch(
    model: nn.Module,
    loader: Batches,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    desc: str = "",
    progress: bool = False,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    after_step: Callable[[], None] | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns mean loss, accuracy, steps and examples.

    ``transform`` augments each batch on the device; ``after_step`` runs after each
    optimizer step (the recipe's schedule and parameter average).
    """
    model.train()
    # Sums stay on the device: reading them every step would stall a GPU once per batch.
    loss_sum = torch.zeros((), device=device)
    correct_sum = torch.zeros((), device=device, dtype=torch.long)
    seen, steps = 0, 0
    for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
        x, y = to_device(x, y, device)
        if transform is not None:
            x = transform(x)
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        loss = _loss(logits, y)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        steps += 1
        seen += len(y)
        loss_sum += loss.detach() * len(y)
        correct_sum += (logits.detach().argmax(1) == y).sum()
    total_loss, correct = float(loss_sum), int(correct_sum)
    if seen and not math.isfinite(total_loss):
        raise FloatingPointError(f"training loss is {total_loss} ({desc or 'epoch'})")
    return {
        "loss": total_loss / max(seen, 1),
        "accuracy": correct / max(seen, 1),
        "steps": float(steps),
        "examples": float(seen),
    }


@torch.no_grad()
def predict(model: nn.Module, loader: Batches, device: torch.device) -> tuple[np.ndarray, ...]:
    """Return (labels, probability of IDC, summed cross-entropy) over ``loader``."""
    model.eval()
    labels, probs, loss = [], [], 0.0
    for x, y in loader:
        x, y = to_device(x, y, device)
        logits = model(x)
        if len(y):
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
        labels.append(y.cpu().numpy())
        probs.append(torch.softmax(logits.float(), 1)[:, 1].cpu().numpy())
    if not labels:
        return np.zeros(0, np.int64), np.zeros(0), np.array(0.0)
    return np.concatenate(labels), np.concatenate(probs), np.array(loss)


def evaluate(model: nn.Module, loader: Batches, device: torch.device) -> Evaluation:
    """Loss, accuracy, balanced accuracy, precision, recall, F1, ROC AUC, confusion matrix."""
    labels, probs, loss = predict(model, loader, device)
    return score(labels, probs, float(loss) / max(len(labels), 1))


def train(
    model: nn.Module,
    train_loader: Batches,
    config: TrainConfig,
    val_loader: Batches | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train for ``config.epochs``, early-stopping on validation loss with the best restored.

    ``model`` is moved to the configured device. ``optimizer`` defaults to Adam at
    ``config.lr`` (AdamW with the recipe's weight decay); a privacy engine passes its DP
    optimizer (and its wrapped model and loader) instead. With averaging on, validation, the
    best epoch and the returned model all use the averaged weights.
    """
    device = resolve_device(config.device)
    model.to(device)
    if optimizer is None:
        optimizer = make_optimizer(model.parameters(), config.lr, config.recipe)
    steps = config.epochs * len(train_loader) if isinstance(train_loader, Sized) else 0
    recipe = RecipeRun(config.recipe, model, optimizer, steps, config.seed)
    augment = recipe.transform if config.recipe.augment != "none" else None
    hooks = (augment, recipe.after_step)
    result = TrainResult()
    best_loss, best_state, stale = math.inf, None, 0
    for epoch in range(1, config.epochs + 1):
        desc = f"epoch {epoch}/{config.epochs}"
        stats = train_epoch(model, train_loader, optimizer, device, desc, config.progress, *hooks)
        result.steps += int(stats["steps"])
        result.examples += int(stats["examples"])
        row = {
            "epoch": float(epoch),
            "train_loss": stats["loss"],
            "train_accuracy": stats["accuracy"],
        }
        if val_loader is not None:
            with recipe.evaluating():
                val = evaluate(model, val_loader, device)
            row["val_loss"] = val.loss
            row["val_accuracy"] = val.accuracy
            row["val_balanced_accuracy"] = val.balanced_accuracy
        result.history.append(row)
        log.info("%s %s", desc, {k: round(v, 4) for k, v in row.items()})
        if on_epoch is not None:
            on_epoch(row)
        if val_loader is None or config.patience is None:
            result.best_epoch = epoch
            continue
        if row["val_loss"] < best_loss:
            best_loss, stale, result.best_epoch = row["val_loss"], 0, epoch
            best_state = recipe.snapshot()
        else:
            stale += 1
            if stale >= config.patience:
                result.stopped_early = True
                break
    if best_state is None or result.best_epoch == len(result.history):
        best_state = recipe.final_state()
    if best_state is not None:
        model.load_state_dict(best_state)
    return result

"""THE training loop and THE evaluation loop, shared by the client, the baseline and simulation.

The loop takes the model, optimizer and loader it is given. Differential privacy does not copy
it: Opacus's ``make_private`` returns a wrapped model, a DP optimizer and a Poisson-sampling
loader, and those objects are passed in here instead of the plain ones.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sized
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from common.accel import Accel
from common.metrics import Evaluation, score
from common.recipe import Recipe, RecipeRun, make_optimizer

log = logging.getLogger(__name__)
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
# A term added to every step's loss, computed from the model alone (FedProx's proximal term).
ExtraLoss = Callable[[nn.Module], torch.Tensor]
# The loss of a batch; DP-SGD with ghost clipping passes Opacus's two-pass criterion here.
Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one call to :func:`train` (the paper: Adam 1e-4, 40 epochs)."""

    epochs: int = 40
    lr: float = 1e-4
    patience: int | None = 5  # epochs without a better validation loss; None turns it off
    device: str = "auto"
    progress: bool = False
    precision: str = "auto"  # auto | fp32 | bf16 (common.accel)
    channels_last: str = "auto"  # auto | on | off
    compile: str = "auto"  # auto | on | off: torch.compile (common.accel; auto: off)
    recipe: Recipe = Recipe()  # augmentation, weight decay, schedule, averaging: off
    seed: int = 0  # of the augmentation draws

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be a positive number, got {self.lr}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {self.patience}")
        # checks the words
        Accel.resolve(torch.device("cpu"), self.precision, self.channels_last, self.compile)


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
    x: torch.Tensor, y: torch.Tensor, device: torch.device, accel: Accel | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a batch to ``device``; uint8 patches become floats in [0, 1] there.

    A batch already there (:class:`common.resident.ResidentBatches`) is not copied.
    """
    x = x.to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    if accel is not None:
        x = accel.layout(x)
    return x, y.to(device, non_blocking=True)


def _loss(logits: torch.Tensor, y: torch.Tensor, criterion: Criterion | None) -> torch.Tensor:
    # Poisson sampling (DP) can draw an empty batch; keep the graph so the DP optimizer still
    # takes its (noise-only) step, as its accountant assumes.
    if not len(y):
        return logits.sum() * 0.0
    return (criterion or F.cross_entropy)(logits, y)


def train_epoch(
    model: nn.Module,
    loader: Batches,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    desc: str = "",
    progress: bool = False,
    accel: Accel | None = None,
    extra_loss: ExtraLoss | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    after_step: Callable[[], None] | None = None,
    criterion: Criterion | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns mean loss, accuracy, steps and examples.

    ``accel`` (default: float32, contiguous) sets autocast and layout; the model must
    already be in its layout (:meth:`common.accel.Accel.prepare`). ``extra_loss`` is added
    to each step's loss for the gradient only; the reported loss stays the data's.
    ``transform`` augments each batch on the device; ``after_step`` runs after each
    optimizer step (the recipe's schedule and parameter average). ``criterion`` replaces
    the cross-entropy (:attr:`common.privacy.PrivateObjects.criterion`). A batch of one
    example is skipped when the model has batch norm, which cannot train on it.
    """
    accel = accel or Accel(device)
    model.train()
    net = accel.compiled(model)  # the compiled forward shares model's parameters
    # Sums stay on the device: reading them every step would stall a GPU once per batch.
    loss_sum = torch.zeros((), device=device)
    correct_sum = torch.zeros((), device=device, dtype=torch.long)
    seen, steps = 0, 0
    batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
        if batch_norm and len(y) == 1:
            # batch norm cannot train on one example (it raises): a training part of
            # k * batch + 1 patches leaves one out of each epoch, a different one each shuffle
            continue
        x, y = to_device(x, y, device, accel)
        if transform is not None:
            x = transform(x)
        optimizer.zero_grad(set_to_none=True)
        with accel.autocast():
            logits = net(x)
            loss = _loss(logits, y, criterion)
            full = loss + extra_loss(model) if extra_loss is not None else loss
        full.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        steps += 1
        seen += len(y)
        loss_sum += loss.detach().float() * len(y)
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
def predict(
    model: nn.Module, loader: Batches, device: torch.device, accel: Accel | None = None
) -> tuple[np.ndarray, ...]:
    """Return (labels, probability of IDC, summed cross-entropy) over ``loader``.

    Results stay on the device until the end: one read-back, not one per batch.
    """
    accel = accel or Accel(device)
    net = accel.compiled(accel.prepare(model).eval())
    labels, probs = [], []
    loss = torch.zeros((), device=device)
    for x, y in loader:
        x, y = to_device(x, y, device, accel)
        with accel.autocast():
            logits = net(x)
        logits = logits.float()
        if len(y):
            loss += F.cross_entropy(logits, y, reduction="sum")
        labels.append(y)
        probs.append(torch.softmax(logits, 1)[:, 1])
    if not labels:
        return np.zeros(0, np.int64), np.zeros(0), np.array(0.0)
    return torch.cat(labels).cpu().numpy(), torch.cat(probs).cpu().numpy(), np.array(float(loss))


def evaluate(
    model: nn.Module, loader: Batches, device: torch.device, accel: Accel | None = None
) -> Evaluation:
    """Loss, accuracy, balanced accuracy, precision, recall, F1, ROC AUC, confusion matrix."""
    labels, probs, loss = predict(model, loader, device, accel)
    return score(labels, probs, float(loss) / max(len(labels), 1))


def train(
    model: nn.Module,
    train_loader: Batches,
    config: TrainConfig,
    val_loader: Batches | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    extra_loss: ExtraLoss | None = None,
    criterion: Criterion | None = None,
) -> TrainResult:
    """Train for ``config.epochs``, early-stopping on validation loss with the best restored.

    ``model`` is moved to the configured device. ``optimizer`` defaults to Adam at
    ``config.lr`` (AdamW with the recipe's weight decay); a privacy engine passes its DP
    optimizer (and its wrapped model and loader) instead. With averaging on, validation, the
    best epoch and the returned model all use the averaged weights. ``extra_loss`` and
    ``criterion`` are passed to :func:`train_epoch`.

    ``config.seed`` fixes the run: the global torch RNG (dropout's masks) is seeded from it for
    the call and the caller's stream restored after, so the same seed gives the same model in
    any process (each process otherwise starts torch at a random seed). DP-SGD's sampling and
    noise never come from it (:mod:`common.privacy` draws their generators from secrets).
    """
    device = resolve_device(config.device)
    with _seeded(config.seed, device):
        return _train(
            model,
            train_loader,
            config,
            device,
            val_loader,
            optimizer,
            on_epoch,
            extra_loss,
            criterion,
        )


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _train(
    model: nn.Module,
    train_loader: Batches,
    config: TrainConfig,
    device: torch.device,
    val_loader: Batches | None,
    optimizer: torch.optim.Optimizer | None,
    on_epoch: Callable[[dict[str, float]], None] | None,
    extra_loss: ExtraLoss | None,
    criterion: Criterion | None,
) -> TrainResult:
    accel = Accel.resolve(device, config.precision, config.channels_last, config.compile)
    accel.prepare(model)
    if optimizer is None:
        optimizer = make_optimizer(model.parameters(), config.lr, config.recipe)
    steps = config.epochs * len(train_loader) if isinstance(train_loader, Sized) else 0
    recipe = RecipeRun(config.recipe, model, optimizer, steps, config.seed)
    augment = recipe.transform if config.recipe.augment != "none" else None
    result = TrainResult()
    best_loss, best_state, stale = math.inf, None, 0
    for epoch in range(1, config.epochs + 1):
        desc = f"epoch {epoch}/{config.epochs}"
        stats = train_epoch(
            model,
            train_loader,
            optimizer,
            device,
            desc,
            config.progress,
            accel=accel,
            extra_loss=extra_loss,
            transform=augment,
            after_step=recipe.after_step,
            criterion=criterion,
        )
        result.steps += int(stats["steps"])
        result.examples += int(stats["examples"])
        row = {
            "epoch": float(epoch),
            "train_loss": stats["loss"],
            "train_accuracy": stats["accuracy"],
        }
        if val_loader is not None:
            with recipe.evaluating():
                val = evaluate(model, val_loader, device, accel)
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

"""Per-step cost of DP-SGD (Opacus) against plain training for the GroupNorm network, on CPU.

Run: ``.venv/bin/python benchmarks/dp_overhead.py [--steps 10] [--warmup 1] [--batch 64]``.

Every mode trains the same GroupNorm ``IDCNet`` on the same random 3x50x50 batch. The DP modes
are the per-sample-gradient engines Opacus 1.6 offers:

* ``hooks``      module hooks (Opacus's default);
* ``functorch``  ``torch.func`` vmap over every layer (``common.privacy``'s default when the
  expected batch is >= 32: it cannot take the empty batches Poisson sampling may draw);
* ``ew``         torch's expanded weights (may be unsupported for a layer; then it is skipped);
* ``ghost``      ghost clipping: per-sample gradient *norms* only, two backward passes through
  a special criterion that the shared training loop cannot call (so it is measured, not used);
* ``hooks+bmm``  hooks with a 2x larger logical batch split by ``BatchMemoryManager`` into
  physical batches of ``--batch`` (reported per ``--batch`` examples).

Before timing, each DP mode takes one step with noise 0 and a clip of 1.0 on a fixed batch, and
its clipped gradient is compared with the hooks mode's: a faster mode counts only if it
computes the same thing. Output: ms/step and the ratio to plain training (goal <= 2.0x).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader, TensorDataset

from common.model import build_model

MODES = ("hooks", "functorch", "ew", "ghost")
GOAL = 2.0


def _batch(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 50, 50, generator=g), torch.randint(0, 2, (n,), generator=g)


def _plain_step(batch: tuple[torch.Tensor, torch.Tensor]) -> Callable[[], None]:
    model = build_model("group", seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = batch

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _private(mode: str, batch_size: int, noise: float, n: int = 256):
    """Return (model, optimizer, criterion or None, loader) for one grad-sample mode."""
    model = build_model("group", seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    data = TensorDataset(*_batch(n, seed=1))
    loader = DataLoader(data, batch_size=batch_size)
    out = PrivacyEngine(accountant="rdp").make_private(
        module=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=noise,
        max_grad_norm=1.0,
        grad_sample_mode=mode,
    )
    if mode == "ghost":
        gm, dopt, crit, dl = out
        return gm, dopt, crit, dl
    gm, dopt, dl = out
    return gm, dopt, None, dl


def _dp_step(mode: str, batch: tuple[torch.Tensor, torch.Tensor], noise: float):
    model, opt, crit, _ = _private(mode, len(batch[1]), noise)
    x, y = batch

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = crit(logits, y) if crit is not None else F.cross_entropy(logits, y)
        loss.backward()
        opt.step()

    return step, model, opt


def _clipped_grad(mode: str, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The flat averaged clipped gradient of one noise-free DP step on ``batch``."""
    step, model, _ = _dp_step(mode, batch, noise=0.0)
    torch.manual_seed(123)  # same dropout masks in every mode
    step()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _bmm_step(batch_size: int, factor: int) -> tuple[Callable[[], None], int]:
    """A hooks-mode epoch of ``factor`` logical batches of about ``factor * batch_size``."""
    model, opt, _, loader = _private("hooks", factor * batch_size, 1.0, n=factor**2 * batch_size)

    def epoch() -> None:
        with BatchMemoryManager(
            data_loader=loader, max_physical_batch_size=batch_size, optimizer=opt
        ) as physical:
            for x, y in physical:
                opt.zero_grad(set_to_none=True)
                logits = model(x)
                loss = F.cross_entropy(logits, y) if len(y) else logits.sum() * 0.0
                loss.backward()
                opt.step()

    return epoch, factor**2  # expected examples / batch_size per epoch


def _interleaved(
    steps: dict[str, Callable[[], None]], rounds: int, warmup: int, budget_s: float
) -> dict[str, float]:
    """Median ms per call of every stepper, taking turns so load spikes hit all of them."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            if len(times[name]) >= 2 and sum(times[name]) > budget_s:
                continue  # a very slow mode has been measured enough
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1000.0 for name, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per mode, at most")
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # Opacus's module hooks make torch warn once per layer; this script's output is the table.
    warnings.filterwarnings("ignore", message="Full backward hook")
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    torch.manual_seed(0)
    batch = _batch(args.batch)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}")

    reference = _clipped_grad("hooks", batch)
    steps: dict[str, Callable[[], None]] = {"plain": _plain_step(batch)}
    notes: dict[str, str] = {"plain": "-"}
    for mode in args.modes:
        try:
            same = torch.allclose(_clipped_grad(mode, batch), reference, rtol=1e-4, atol=1e-6)
            steps[mode] = _dp_step(mode, batch, noise=1.0)[0]
            notes[mode] = "yes" if same else "NO"
        except Exception as exc:  # noqa: BLE001 - a mode Opacus cannot run is reported
            notes[mode] = f"unsupported: {type(exc).__name__}: {exc}"[:90]
    ms = _interleaved(steps, args.steps, args.warmup, args.budget)
    epoch, per_epoch = _bmm_step(args.batch, factor=2)
    bmm = "hooks+bmm (2x logical)"
    ms[bmm] = _interleaved({bmm: epoch}, max(1, args.steps // per_epoch), 0, args.budget)[bmm]
    ms[bmm] /= per_epoch
    notes[bmm] = "n/a"

    plain = ms["plain"]
    print(f"{'mode':<24}{'ms/step':>10}{'x plain':>9}  grads match hooks")
    for name, note in notes.items():
        value = ms.get(name, float("nan"))
        flag = "" if name == "plain" or value / plain <= GOAL else "  (> goal)"
        print(f"{name:<24}{value:>10.1f}{value / plain:>9.2f}  {note}{flag}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

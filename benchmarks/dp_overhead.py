"""Per-step cost of DP-SGD (Opacus) against plain training, per model and logical batch.

Run: ``.venv/bin/python benchmarks/dp_overhead.py [--models paper gap] [--batches 256 1024]
[--physical 256] [--steps 2] [--modes hooks functorch ghost]``.

For each model (the paper's GroupNorm network, and ``gap``) and each *logical* batch, every
mode takes the same logical step on the same random 3x50x50 batch, split into physical
batches of at most ``--physical`` the way Opacus's ``BatchMemoryManager`` does (the DP
optimizer told to skip the step on all but the last physical batch; plain training
accumulates the summed loss's gradient). Modes are Opacus 1.6's per-sample engines:

* ``hooks``      module hooks (Opacus's default): per-sample gradients of every layer;
* ``functorch``  ``torch.func`` vmap over every layer;
* ``ghost``      ghost clipping: per-sample gradient *norms* (``||a|| * ||g||`` for the dense
  layers, whose per-sample gradients are never built) and a second, reweighted backward pass;
* ``+fast``      the same engine with :mod:`common.grad_samplers`'s convolution kernel (what
  :func:`common.privacy.make_private` installs for hooks and ghost).

Before timing, each DP mode takes one noise-free step (clip 1.0) on a small fixed batch, and its
clipped gradient is compared with the hooks mode's: a faster mode counts only if it computes
the same thing. Steps of all modes of one (model, batch) take turns, so load spikes on a shared
machine hit all of them. Output: s/step and the ratio to plain training in the same process
(goal <= 2.0x).
"""

from __future__ import annotations

import argparse
import logging
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.grad_samplers import use_fast_samplers
from common.model import build_model
from simulation.dp_speed import interleaved_medians

MODES = ("hooks", "functorch", "ghost", "hooks+fast", "ghost+fast")
GOAL = 2.0
Batch = tuple[torch.Tensor, torch.Tensor]
Step = Callable[[], None]


def _batch(n: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 50, 50, generator=g), torch.randint(0, 2, (n,), generator=g)


def _chunks(batch: Batch, physical: int) -> list[Batch]:
    x, y = batch
    return list(zip(x.split(physical), y.split(physical), strict=True))


def _plain_step(kind: str, batch: Batch, physical: int) -> Step:
    model = build_model("group", seed=0, kind=kind)  # type: ignore[arg-type]
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    n = len(batch[1])

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for x, y in _chunks(batch, physical):
            (F.cross_entropy(model(x), y, reduction="sum") / n).backward()
        opt.step()

    return step


def _private(kind: str, mode: str, batch_size: int, noise: float) -> tuple[nn.Module, ...]:
    """(model, optimizer, criterion) of one grad-sample mode; criterion is CE unless ghost."""
    model = build_model("group", seed=0, kind=kind)  # type: ignore[arg-type]
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loader = DataLoader(TensorDataset(*_batch(batch_size, seed=1)), batch_size=batch_size)
    engine, fast = mode.removesuffix("+fast"), mode.endswith("+fast")
    out = PrivacyEngine(accountant="rdp").make_private(
        module=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=noise,
        max_grad_norm=1.0,
        grad_sample_mode=engine,
        poisson_sampling=False,  # exactly the logical batch every step, as plain training
    )
    if fast:
        use_fast_samplers(out[0])
    if engine == "ghost":
        return out[0], out[1], out[2]
    return out[0], out[1], nn.CrossEntropyLoss()


def _dp_step(
    kind: str, mode: str, batch: Batch, physical: int, noise: float
) -> tuple[Step, nn.Module]:
    model, opt, crit = _private(kind, mode, len(batch[1]), noise)
    chunks = _chunks(batch, physical)

    def step() -> None:
        for i, (x, y) in enumerate(chunks):
            opt.zero_grad(set_to_none=True)
            crit(model(x), y).backward()
            opt.signal_skip_step(do_skip=i < len(chunks) - 1)  # what BatchMemoryManager does
            opt.step()

    return step, model


def _clipped_grad(kind: str, mode: str, batch: Batch) -> torch.Tensor:
    """The flat averaged clipped gradient of one noise-free DP step on ``batch``."""
    step, model = _dp_step(kind, mode, batch, len(batch[1]), noise=0.0)
    torch.manual_seed(123)  # same dropout masks in every mode
    step()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _check(kind: str, modes: list[str]) -> dict[str, str]:
    small = _batch(16, seed=2)
    reference = _clipped_grad(kind, "hooks", small)
    notes = {}
    for mode in modes:
        try:
            same = torch.allclose(_clipped_grad(kind, mode, small), reference, rtol=1e-4, atol=1e-6)
            notes[mode] = "yes" if same else "NO"
        except Exception as exc:  # noqa: BLE001 - a mode Opacus cannot run is reported
            notes[mode] = f"unsupported: {type(exc).__name__}: {exc}"[:90]
    return notes


def measure(
    kind: str, logical: int, physical: int, modes: list[str], args: argparse.Namespace
) -> None:
    """Print one table: every mode's seconds per logical step and its ratio to plain."""
    notes = _check(kind, modes)
    batch = _batch(logical)
    steps: dict[str, Step] = {"plain": _plain_step(kind, batch, physical)}
    for mode in modes:
        if not notes[mode].startswith("unsupported"):
            steps[mode] = _dp_step(kind, mode, batch, physical, noise=1.0)[0]
    secs = interleaved_medians(steps, args.steps, args.warmup)
    plain = secs["plain"]
    print(f"\nmodel {kind}, logical batch {logical}, physical <= {physical}")
    print(f"{'mode':<12}{'s/step':>9}{'x plain':>9}  grads match hooks")
    for name in ["plain", *modes]:
        value = secs.get(name, float("nan"))
        flag = "" if name == "plain" or value / plain <= GOAL else "  (> goal)"
        print(f"{name:<12}{value:>9.2f}{value / plain:>9.2f}  {notes.get(name, '-')}{flag}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["paper", "gap"])
    parser.add_argument("--batches", nargs="*", type=int, default=[256, 1024])
    parser.add_argument("--physical", type=int, default=256, help="largest physical batch")
    parser.add_argument("--steps", type=int, default=2, help="timed logical steps per mode")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # Opacus's module hooks make torch warn once per layer; this script's output is the table.
    warnings.filterwarnings("ignore", message="Full backward hook")
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for kind in args.models:
        for logical in args.batches:
            measure(kind, logical, min(logical, args.physical), args.modes, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training-loop throughput against a bare PyTorch loop, PNG decode rate, cache feed rate.

The project loop is :func:`common.training.train_epoch` fed by the site's batch source
(:class:`common.resident.ResidentBatches`, and for information the DataLoader path it
replaces); the bare loop is the least a PyTorch user writes: the same uint8 patches already on
the device, a ``randperm``, a gather, scaling, forward, loss, backward, Adam. Both use the
same precision and layout (:class:`common.accel.Accel`), model, batch size and data, in one
process, interleaved, first pair discarded as warm-up, best of the rest.

Prints the device, absolute img/s, and project / bare (goal >= 0.95) at each batch size; on a
CPU once per thread count (``--threads 1,2``) so the loop's choice is made by measurement.
Run: .venv/bin/python benchmarks/train_throughput.py [--data DIR] [--steps N] [--batches 64,256]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.accel import Accel
from common.data import load_patches
from common.dataset import PatchDataset, make_loader
from common.model import build_model
from common.resident import ResidentBatches
from common.training import resolve_device, train_epoch

DEFAULT_DATA = Path(os.environ.get("IDC_REAL_DATA", "../shared/data/idc-real"))
GOAL = 0.95


def bare_loop(model, images, labels, batch, accel: Accel) -> None:  # noqa: ANN001
    """The reference: uint8 patches on the device, no loader, no bookkeeping."""
    device = accel.device
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x_all = torch.from_numpy(images).to(device)
    y_all = torch.from_numpy(labels).to(device)
    model.train()
    order = torch.randperm(len(y_all), device=device)
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        x = accel.layout(x_all[idx].permute(0, 3, 1, 2)).float().div_(255)
        y = y_all[idx]
        opt.zero_grad(set_to_none=True)
        with accel.autocast():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()


def project_loop(model, images, labels, batch, accel: Accel, resident: bool) -> None:  # noqa: ANN001
    """The project's loop on the site's batch source."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    if resident:
        src = ResidentBatches(
            images, labels, batch, accel.device, shuffle=True, channels_last=accel.channels_last
        )
    else:
        src = make_loader(PatchDataset(images, labels), batch, shuffle=True)  # type: ignore
    stats = train_epoch(model, src, opt, accel.device, accel=accel)
    assert stats["examples"] == len(labels)


def timed(fn: Callable[[], None], device: torch.device, clock: str = "wall") -> float:
    """Seconds ``fn`` took: wall time, or this process's CPU time (``process``).

    CPU time is for a shared, loaded CPU with one thread: it counts only this process's work,
    so other users' load does not land on one loop more than the other.
    """
    now = time.process_time if clock == "process" else time.perf_counter
    t0 = now()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return now() - t0


def compare(images, labels, batch: int, accel: Accel, repeats: int, clock: str) -> dict[str, float]:  # noqa: ANN001
    """Img/s of bare, project (resident) and project (loader), interleaved."""
    runs: dict[str, Callable[[torch.nn.Module], None]] = {
        "bare": lambda m: bare_loop(m, images, labels, batch, accel),
        "resident": lambda m: project_loop(m, images, labels, batch, accel, True),
        "loader": lambda m: project_loop(m, images, labels, batch, accel, False),
    }
    rates: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats + 1):
        for name, fn in runs.items():
            model = accel.prepare(build_model(seed=0))
            dt = timed(lambda fn=fn, m=model: fn(m), accel.device, clock)
            rates[name].append(len(labels) / dt)
    return {k: max(v[1:]) for k, v in rates.items()}


def decode_and_feed(data: Path, batch: int) -> None:
    """PNG scan + decode on 1 and 2 workers; cache -> augmented batches through the loader."""
    cache = Path(tempfile.mkdtemp(prefix="idc-bench-"))
    for workers in (1, 2):
        t0 = time.perf_counter()
        n = len(load_patches(data, workers=workers))
        dt = time.perf_counter() - t0
        print(f"scan+decode, {workers} worker(s): {n / dt:,.0f} patches/s ({n} in {dt:.2f} s)")
    patches = load_patches(data, cache_dir=cache)
    loader = make_loader(PatchDataset(patches.images, patches.labels, augment=True), batch, True)
    t0, seen = time.perf_counter(), 0
    for x, _ in loader:
        seen += len(x)
    print(f"cache -> augmented batches: {seen / (time.perf_counter() - t0):,.0f} patches/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--patches", type=int, default=2048, help="patches per timed epoch")
    ap.add_argument("--batches", default="32,64,256")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs after the warm-up")
    ap.add_argument("--precision", default="auto", help="auto | fp32 | bf16")
    ap.add_argument("--channels-last", default="auto", help="auto | on | off")
    ap.add_argument("--threads", default="1,2", help="CPU only: intra-op thread counts")
    ap.add_argument("--clock", choices=("wall", "process"), default="wall", help="see timed()")
    ap.add_argument("--decode", action="store_true", help="also time PNG decode and the feed")
    args = ap.parse_args()
    device = resolve_device()
    accel = Accel.resolve(device, args.precision, args.channels_last)
    if args.decode:
        decode_and_feed(args.data, 64)
    patches = load_patches(args.data, cache_dir=Path(tempfile.gettempdir()) / "idc-bench-cache")
    images = np.array(patches.images[: args.patches])  # writable, in memory
    labels = patches.labels[: args.patches].astype(np.int64)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {card}: {accel.describe()}, {len(labels)} real patches, torch {torch.__version__}"
    )
    threads = [int(t) for t in args.threads.split(",")] if device.type == "cpu" else [0]
    for n_threads in threads:
        if n_threads:
            torch.set_num_threads(n_threads)
        for batch in (int(b) for b in args.batches.split(",")):
            r = compare(images, labels, batch, accel, args.repeats, args.clock)
            ratio = r["resident"] / r["bare"]
            verdict = "meets" if ratio >= GOAL else "MISSES"
            tag = (f"threads {n_threads}, " if n_threads else "") + f"{args.clock} clock, "
            print(
                f"{tag}batch {batch:4d}: bare {r['bare']:9,.0f} img/s, project (resident) "
                f"{r['resident']:9,.0f}, project (loader) {r['loader']:9,.0f}; "
                f"resident/bare {ratio:.3f} ({verdict} >= {GOAL}), "
                f"loader/bare {r['loader'] / r['bare']:.3f}"
            )


if __name__ == "__main__":
    main()

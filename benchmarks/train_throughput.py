"""Training-loop throughput against a bare PyTorch loop, PNG decode rate, cache feed rate.

Prints ratios measured in one process on the same model, batch size and in-memory data.
Run: .venv/bin/python benchmarks/train_throughput.py [--data DIR] [--steps N] [--batch 64]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.data import load_patches
from common.dataset import PatchDataset, make_loader
from common.model import build_model
from common.training import resolve_device, train_epoch

DEFAULT_DATA = Path(os.environ.get("IDC_REAL_DATA", "../shared/data/idc-real"))


def bare_loop(model, images, labels, batch, steps, device):  # noqa: ANN001
    """The reference: tensors already in memory, no loader, no bookkeeping."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x_all = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).contiguous()
    y_all = torch.from_numpy(labels)
    model.train()
    for i in range(steps):
        start = (i * batch) % (len(labels) - batch + 1)
        sl = slice(start, start + batch)
        x = x_all[sl].to(device).float().div_(255)
        y = y_all[sl].to(device)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    device = resolve_device()
    cache = Path(tempfile.mkdtemp(prefix="idc-bench-"))
    # 1. PNG scan + decode, both cores, no cache
    for workers in (1, 2):
        dt = timed(lambda w=workers: load_patches(args.data, workers=w))
        n = len(load_patches(args.data, cache_dir=cache, workers=2))
        rate = n / dt
        print(f"scan+decode, {workers} worker(s): {rate:,.0f} patches/s ({n} in {dt:.2f} s)")
    patches = load_patches(args.data, cache_dir=cache)
    # 2. cache feed rate: batches out of the memory-mapped cache through the real loader
    feed = PatchDataset(patches.images, patches.labels, augment=True)
    loader = make_loader(feed, args.batch, True)
    t0, seen = time.perf_counter(), 0
    for x, _ in loader:
        seen += len(x)
    print(f"cache -> augmented batches: {seen / (time.perf_counter() - t0):,.0f} patches/s")
    # 3. training loop vs bare loop, same data in memory
    n = args.steps * args.batch
    images = np.ascontiguousarray(patches.images[:n])
    labels = patches.labels[:n].copy()
    results = {}
    for name in ("bare", "project") * 3:  # interleaved, first pair is warm-up: fair to both
        model = build_model(seed=0).to(device)
        if name == "bare":
            dt = timed(lambda m=model: bare_loop(m, images, labels, args.batch, args.steps, device))
        else:
            ds = PatchDataset(images, labels, augment=False)
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            ld = make_loader(ds, args.batch, shuffle=True)
            dt = timed(lambda m=model, o=opt, d=ld: train_epoch(m, d, o, device))
        results.setdefault(name, []).append(n / dt)
    bare, proj = max(results["bare"][1:]), max(results["project"][1:])
    print(
        f"device {device}, batch {args.batch}, fp32: bare {bare:,.0f} img/s, "
        f"project loop {proj:,.0f} img/s, ratio {proj / bare:.3f} (goal >= 0.90)"
    )


if __name__ == "__main__":
    main()

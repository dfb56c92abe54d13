"""Patches/s of ``idc-client predict``'s inference against a bare PyTorch loop, same data.

Run: ``.venv/bin/python benchmarks/inference_throughput.py [--patches 8192] [--batch N]
[--data DIR] [--device auto] [--sweep 256,1024,4096]``.

All paths score the same model (the paper's net, batch norm, eval mode) on the same uint8
(N, 50, 50, 3) array already in memory, so PNG decoding is excluded (``--data`` loads a real
folder through the decoded-patch cache first; otherwise the patches are random):

* ``predict``  :func:`client.predict.infer`, the function behind the command;
* ``bare``     the loop one writes by hand: ``torch.no_grad``, slice, to the device,
  ``/255``, softmax, one ``.cpu()`` per batch;
* ``loader``   for information, the training code's path: ``PatchDataset`` + ``make_loader``
  + :func:`common.training.predict` (floats made on the CPU).

Each path runs once to warm up, then ``--repeats`` times; the median is reported. Output:
patches/s per path and the ratio predict / bare (goal >= 0.9).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from client.predict import default_batch_size, infer
from common.dataset import PatchDataset, make_loader
from common.model import build_model
from common.training import predict, resolve_device

GOAL = 0.9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(model: torch.nn.Module, images: np.ndarray, device: torch.device, batch: int):
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i : i + batch]).to(device)
            x = x.permute(0, 3, 1, 2).float() / 255.0
            out.append(torch.softmax(model(x), 1)[:, 1].cpu())
    return torch.cat(out).numpy()


def loader_path(model: torch.nn.Module, images: np.ndarray, device: torch.device, batch: int):
    loader = make_loader(PatchDataset(images, np.zeros(len(images))), batch, shuffle=False)
    return predict(model, loader, device)[1]


def _time(fn: Callable[[], np.ndarray], device: torch.device, repeats: int) -> float:
    fn()  # warm-up: cuDNN algorithm choice, allocator, page cache
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _images(args: argparse.Namespace) -> np.ndarray:
    if args.data is None:
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (args.patches, 50, 50, 3), dtype=np.uint8)
    from common.data import load_patches

    patches = load_patches(args.data, cache_dir=args.cache_dir, workers=2)
    return np.array(patches.images[: args.patches])  # into memory: decode and disk excluded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=None, help="default: predict's default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data", type=Path, default=None, help="a real folder (Kaggle layout)")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/idc-bench-cache"))
    parser.add_argument("--sweep", default="", help="also time predict at these batch sizes")
    args = parser.parse_args()
    device = resolve_device(args.device)
    batch = args.batch or default_batch_size(device)
    images = _images(args)
    model = build_model("batch", seed=0).eval().to(device)
    n = len(images)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({card}), {n} patches, batch {batch}, torch {torch.__version__}")
    ours = infer(model, images, device, batch)
    ref = bare_loop(model, images, device, batch)
    print(f"max |predict - bare| probability: {np.abs(ours - ref).max():.2e}")
    rates = {}
    for name, fn in (("predict", infer), ("bare", bare_loop), ("loader", loader_path)):
        secs = _time(lambda fn=fn: fn(model, images, device, batch), device, args.repeats)
        rates[name] = n / secs
        print(f"{name:8s} {rates[name]:12.0f} patches/s")
    ratio = rates["predict"] / rates["bare"]
    verdict = "meets" if ratio >= GOAL else "MISSES"
    print(f"predict / bare = {ratio:.3f} ({verdict} the goal >= {GOAL})")
    print(f"loader / bare  = {rates['loader'] / rates['bare']:.3f} (training-code path, info)")
    for size in [int(s) for s in args.sweep.split(",") if s]:
        secs = _time(lambda s=size: infer(model, images, device, s), device, args.repeats)
        print(f"predict at batch {size:5d}: {n / secs:12.0f} patches/s")


if __name__ == "__main__":
    main()

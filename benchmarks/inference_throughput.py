"""Patches/s of ``idc-client predict``'s inference against a bare PyTorch loop, same data.

Run: ``.venv/bin/python benchmarks/inference_throughput.py [--patches 8192] [--batch N]
[--data DIR] [--device auto] [--precision auto] [--channels-last auto] [--sweep 256,1024]``.

All paths score the same model (the paper's net, batch norm, eval mode) on the same uint8
(N, 50, 50, 3) array already in memory, so PNG decoding is excluded (``--data`` loads a real
folder through the decoded-patch cache first; otherwise the patches are random):

* ``predict``  :func:`client.predict.infer`, the function behind the command, with the
  command's default batch, precision and layout (auto: bf16 and channels-last on a GPU) and
  the patches resident on the device;
* ``before``   ``infer`` as it was before issue 15: fp32, contiguous, batch 1024 on a GPU,
  one host-to-device copy per batch (the ratio predict / before is the issue's lever);
* ``bare``     the loop one writes by hand, fp32 at predict's batch: ``torch.no_grad``,
  slice, to the device, ``/255``, softmax, one ``.cpu()`` per batch;
* ``loader``   for information, the training code's path: ``PatchDataset`` + ``make_loader``
  + :func:`common.training.predict` (floats made on the CPU).

``--compile on`` runs ``predict`` under ``torch.compile`` (its warm-up falls in the untimed
first run). Each path runs once to warm up, then ``--repeats`` times; the median is reported.
Output:
patches/s per path, the ratios predict / before and predict / bare (goal >= 0.9), and the
largest probability difference between predict and the fp32 reference.
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
from common.accel import Accel
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


def before(model: torch.nn.Module, images: np.ndarray, device: torch.device, batch: int):
    """``infer`` before issue 15: fp32, contiguous, one copy to the device per batch."""
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            chunk = torch.from_numpy(np.array(images[start : start + batch]))
            x = chunk.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
            out.append(torch.softmax(model(x).float(), dim=1)[:, 1])
    return torch.cat(out).cpu().numpy()


def loader_path(model: torch.nn.Module, images: np.ndarray, device: torch.device, batch: int):
    loader = make_loader(PatchDataset(images, np.zeros(len(images))), batch, shuffle=False)
    return predict(model, loader, device)[1]


CLOCK = {"wall": time.perf_counter, "process": time.process_time}
_clock = CLOCK["wall"]


def _time(fn: Callable[[], np.ndarray], device: torch.device, repeats: int) -> float:
    fn()  # warm-up: cuDNN algorithm choice, allocator, page cache
    times = []
    for _ in range(repeats):
        _sync(device)
        start = _clock()
        fn()
        _sync(device)
        times.append(_clock() - start)
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
    parser.add_argument("--precision", default="auto", help="auto | fp32 | bf16")
    parser.add_argument("--channels-last", default="auto", help="auto | on | off")
    parser.add_argument("--compile", default="off", help="predict under torch.compile: on | off")
    parser.add_argument("--data", type=Path, default=None, help="a real folder (Kaggle layout)")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/idc-bench-cache"))
    parser.add_argument("--sweep", default="", help="also time predict at these batch sizes")
    parser.add_argument(
        "--clock",
        choices=CLOCK,
        default="wall",
        help="process: this process's CPU time, for a shared CPU with --threads 1",
    )
    parser.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0: all)")
    args = parser.parse_args()
    global _clock
    _clock = CLOCK[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    accel = Accel.resolve(device, args.precision, args.channels_last, args.compile)
    batch = args.batch or default_batch_size(device)
    old_batch = 1024 if device.type == "cuda" else 256  # predict's defaults before issue 15
    images = _images(args)
    n = len(images)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {card}: {accel.describe()}, {n} patches, batch {batch}, "
        f"{args.clock} clock, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    paths: dict[str, Callable[[], np.ndarray]] = {
        "predict": lambda: infer(_model(), images, device, batch, accel),
        "before": lambda: before(_model(device), images, device, old_batch),
        "bare": lambda: bare_loop(_model(device), images, device, batch),
        "loader": lambda: loader_path(_model(device), images, device, batch),
    }
    ref = paths["bare"]()
    print(f"max |predict - fp32 bare| probability: {np.abs(paths['predict']() - ref).max():.2e}")
    rates = {name: n / _time(fn, device, args.repeats) for name, fn in paths.items()}
    for name, rate in rates.items():
        print(f"{name:8s} {rate:12.0f} patches/s")
    ratio = rates["predict"] / rates["bare"]
    verdict = "meets" if ratio >= GOAL else "MISSES"
    print(f"predict / before = {rates['predict'] / rates['before']:.3f}")
    print(f"predict / bare   = {ratio:.3f} ({verdict} the goal >= {GOAL})")
    print(f"loader / bare    = {rates['loader'] / rates['bare']:.3f} (training-code path, info)")
    for size in [int(s) for s in args.sweep.split(",") if s]:
        secs = _time(lambda s=size: infer(_model(), images, device, s, accel), device, args.repeats)
        print(f"predict at batch {size:5d}: {n / secs:12.0f} patches/s")


_MODEL: dict[str, torch.nn.Module] = {}


def _model(device: torch.device | None = None) -> torch.nn.Module:
    """One model in eval mode; ``device`` puts it there in the default layout (fp32 paths)."""
    model = _MODEL.setdefault("m", build_model("batch", seed=0).eval())
    return model.to(device, memory_format=torch.contiguous_format) if device else model


if __name__ == "__main__":
    main()

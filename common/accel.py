"""How the loops use a device: numeric precision, memory layout and compilation.

One resolved :class:`Accel` is made per run from the run-config keys ``precision``
(``auto`` | ``fp32`` | ``bf16``), ``channels-last`` (``auto`` | ``on`` | ``off``) and
``compile`` (``auto`` | ``on`` | ``off``) and the device, and handed to the training,
evaluation and prediction loops, which apply it the same way everywhere:

- ``bf16``: the forward pass and the loss run under ``torch.autocast`` in bfloat16; weights,
  gradients and optimizer state stay float32 (the master weights), so no loss scaling is
  needed. ``auto`` picks it on a CUDA device that supports bfloat16, float32 elsewhere (on a
  CPU it runs too, so tests exercise the path).
- channels-last: the model and every batch use NHWC memory, the layout cuDNN's fastest
  convolution kernels want. ``auto`` is on for every device: on this project's 2-core CPU
  (one thread, CPU time, real patches) channels-last predicted 151 patches/s against 107
  contiguous, and trained at batch 64 at 107-114 img/s against 98-103.
- compile: the loops call ``torch.compile(model)`` (inductor), which shares the model's
  parameters, so optimizers, state dicts and averaging see the eager model unchanged. The
  first steps pay the compilation (the warm-up); later models of the same shape in the same
  process reuse the compiled code. ``auto`` is off everywhere: on this project's 2-core CPU
  (real patches, batch 64, one thread, CPU time) compiled training ran at 96-97 img/s against
  103-114 eager, after a first epoch of 147 s wall clock against 43 s (the warm-up; see
  ``benchmarks/train_throughput.py --compile``); no GPU has measured it yet. Opacus's
  per-sample-gradient hooks do not run under compilation: :meth:`Accel.compiled` refuses a
  DP model and :meth:`common.config.RunConfig.check` refuses ``compile = "on"`` with DP.

Threads are not set here: on the same shared CPU (load average 14-34 on 2 cores, batch 64,
real patches, wall clock) the loop trained at 8.5 img/s with one torch thread and 6.4 with
two, so two threads bought nothing there; ``idc-sim --threads`` defaults to 1 by it.

Differential privacy always trains in float32 (Opacus's per-sample gradients are not
validated under autocast); :meth:`common.config.RunConfig.check` refuses ``bf16`` with DP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch

from common.config import CHANNELS_LAST, COMPILE_MODES, PRECISIONS


def _bf16_on_cuda(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def can_compile(device: torch.device) -> bool:
    """Whether ``torch.compile`` can build kernels here: a CPU needs a C++ compiler."""
    if device.type != "cpu":
        return True
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception:  # torch says "no compiler" in several ways: any failure means no
        return False
    return True


@dataclass(frozen=True)
class Accel:
    """Resolved settings for one device: autocast dtype (``None``: float32) and layout."""

    device: torch.device
    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def resolve(
        cls,
        device: torch.device,
        precision: str = "auto",
        channels_last: str = "auto",
        compile: str = "auto",
    ) -> Accel:
        """Turn the run-config words into settings for ``device``.

        Raises
        ------
        ValueError
            Naming the bad word and the allowed ones.
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if channels_last not in CHANNELS_LAST:
            raise ValueError(f"channels-last must be one of {CHANNELS_LAST}, got {channels_last!r}")
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
        bf16 = precision == "bf16" or (precision == "auto" and _bf16_on_cuda(device))
        layout = channels_last != "off"  # auto: on everywhere, by measurement (see above)
        compiled = compile == "on"  # auto: off everywhere, by measurement (see above)
        return cls(device, torch.bfloat16 if bf16 else None, layout, compiled)

    @property
    def memory_format(self) -> torch.memory_format:
        """The layout of the model's weights and of every batch."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move ``model`` to the device in this layout (weights stay float32)."""
        # torch's stubs lack Module.to's memory_format keyword, which it has had since 1.5.
        move = cast(Any, model.to)
        return cast(torch.nn.Module, move(self.device, memory_format=self.memory_format))

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (N, C, H, W) in this layout; a no-op when it already is."""
        return x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x

    def compiled(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the loops call: ``torch.compile(model)``, or ``model`` when off.

        The compiled module shares ``model``'s parameters and buffers; ``train()`` and
        ``eval()`` on either switch both.

        Raises
        ------
        ValueError
            If ``model`` is Opacus's per-sample-gradient wrapper (DP trains eagerly).
        """
        if not self.compile:
            return model
        from opacus.grad_sample.gsm_base import AbstractGradSampleModule

        if isinstance(model, AbstractGradSampleModule):
            raise ValueError(
                "compile is on but the model computes per-sample gradients for DP: Opacus's "
                'hooks do not run under torch.compile; set compile = "off" (or "auto")'
            )
        return cast(torch.nn.Module, torch.compile(model))

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Autocast the enclosed forward pass and loss; nothing in float32."""
        dtype = self.autocast_dtype
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            yield

    def describe(self) -> str:
        """One line for logs and benchmarks: device, precision, layout."""
        precision = "bf16 autocast" if self.autocast_dtype is not None else "fp32"
        layout = "channels-last" if self.channels_last else "contiguous"
        return f"{self.device} {precision} {layout}" + (" compiled" if self.compile else "")

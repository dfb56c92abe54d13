"""Per-sample gradient kernels for DP-SGD that are faster than Opacus's defaults on a CPU.

Opacus 1.6 computes a Conv2d's per-sample weight gradients by unfolding the layer's input
(9x its size for a 3x3 kernel) and one small matrix product per sample; on a CPU that costs
about four times the layer's ordinary weight gradient (measured: 64 patches, 32->32 channels,
50x50, 1.35 s against 0.35 s). :func:`conv2d_grad_sample` asks torch for the same numbers as
ONE grouped weight-gradient convolution, the batch folded into the groups, which runs at the
ordinary weight gradient's speed.

:func:`use_fast_samplers` installs the kernels on ONE wrapped model (an instance attribute
shadowing Opacus's class-wide table), so nothing else in the process changes. The hooks and
ghost engines read the table; functorch computes every layer itself and ignores it.
"""

from __future__ import annotations

from typing import Any

import torch
from opacus.grad_sample import AbstractGradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch import nn
from torch.nn.grad import conv2d_weight


def conv2d_grad_sample(
    layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.Tensor, torch.Tensor]:
    """Per-sample weight and bias gradients of a Conv2d, as Opacus's sampler returns them.

    Layers this kernel does not cover (groups, string padding, an empty batch) go to
    Opacus's own sampler.
    """
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    if n == 0 or layer.groups != 1 or isinstance(layer.padding, str):
        return compute_conv_grad_sample(layer, activations, backprops)
    ret: dict[torch.Tensor, torch.Tensor] = {}
    if layer.weight.requires_grad:
        out_c, in_c, kh, kw = layer.weight.shape
        # Sample i's channels form group i: the grouped weight gradient is every sample's own.
        weight = conv2d_weight(
            x.reshape(1, n * in_c, *x.shape[2:]),
            (n * out_c, in_c, kh, kw),
            backprops.reshape(1, n * out_c, *backprops.shape[2:]),
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=n,
        )
        ret[layer.weight] = weight.view(n, out_c, in_c, kh, kw)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.sum(dim=(2, 3))
    return ret


FAST_SAMPLERS: dict[type[nn.Module], Any] = {nn.Conv2d: conv2d_grad_sample}


def use_fast_samplers(model: AbstractGradSampleModule) -> None:
    """Make ``model`` (Opacus-wrapped, hooks or ghost) use :data:`FAST_SAMPLERS`."""
    table = dict(getattr(type(model), "GRAD_SAMPLERS", {}))
    table.update(FAST_SAMPLERS)
    model.GRAD_SAMPLERS = table

"""GroupNorm and LayerNorm that keep their input's dtype under autocast.

Autocast runs ``group_norm`` and ``layer_norm`` in fp32: a bf16 activation is copied to fp32, normalised, and the
fp32 result is copied back to bf16 by the next convolution or linear layer, two full passes over every activation
around every norm of a UNet or transformer. PyTorch's norm kernels already accumulate their statistics in fp32 for
bf16/fp16 inputs, so running them on the bf16 activation (weights cast to it) gives the result rounded once to
bf16 instead of computed in fp32 and rounded later, by the consumer's cast: a difference at bf16 rounding level.
Outside autocast, and for fp32 inputs, the layers below are exactly ``nn.GroupNorm`` / ``nn.LayerNorm``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _low_precision_autocast(x: Tensor) -> bool:
    return x.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(x.device.type)


def _cast(weight: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if weight is None else weight.to(dtype)


class InputDtypeGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that, under autocast, normalises a bf16/fp16 input in its own dtype (see the module doc)."""

    def forward(self, x: Tensor) -> Tensor:
        if not _low_precision_autocast(x):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x, self.num_groups, _cast(self.weight, x.dtype), _cast(self.bias, x.dtype), self.eps)


class InputDtypeLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` that, under autocast, normalises a bf16/fp16 input in its own dtype (see the module doc)."""

    def forward(self, x: Tensor) -> Tensor:
        if not _low_precision_autocast(x):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, self.normalized_shape, _cast(self.weight, x.dtype), _cast(self.bias, x.dtype),
                                self.eps)


_INPUT_DTYPE = {nn.GroupNorm: InputDtypeGroupNorm, nn.LayerNorm: InputDtypeLayerNorm}
_AUTOCAST = {v: k for k, v in _INPUT_DTYPE.items()}


def set_norm_precision(net: nn.Module, precision: str) -> int:
    """In place, make every plain GroupNorm / LayerNorm of ``net`` take its input's dtype under autocast
    (``precision="input"``: the classes above) or follow autocast's fp32 rule (``"float32"``: ``nn.GroupNorm`` /
    ``nn.LayerNorm``). Only the class changes (parameters, buffers and state-dict keys stay); subclasses with a
    forward of their own are left alone. Returns how many layers changed."""
    swaps = {"input": _INPUT_DTYPE, "float32": _AUTOCAST}.get(precision)
    if swaps is None:
        raise ValueError(f"norm precision {precision!r}: choose 'input' or 'float32'")
    changed = 0
    for module in net.modules():
        swap = swaps.get(type(module))
        if swap is not None:
            module.__class__ = swap
            changed += 1
    return changed

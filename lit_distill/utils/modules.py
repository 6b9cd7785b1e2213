"""Helpers on ``nn.Module`` state."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module.eval()`` inside the block; on exit every submodule gets back its own mode (so frozen parts that
    stay in eval mode while the rest trains, such as a shared text encoder, are not switched to train mode)."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes.items():
            m.training = mode

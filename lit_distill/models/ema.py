"""Exponential moving average of a model's parameters."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn


class EMA(nn.Module):
    """Shadow copy of `model`'s parameters, averaged by `update`, and of its buffers, copied by `update`.

    After update number `n` (0-based) the shadow is `shadow + (1 - d) * (param - shadow)` with
    `d = min(decay, (1 + n) / (10 + n))` when `warmup`, else `d = decay`. Only parameters that require grad
    at construction are tracked unless `trainable_only=False` (LoRA: the adapters only). The shadow is
    stored as buffers (it moves with `.to()` and is saved in Lightning checkpoints through `state_dict`).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True, trainable_only: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay, self.warmup = float(decay), bool(warmup)
        self.num_updates = 0
        self.param_names = [n for n, p in model.named_parameters() if p.requires_grad or not trainable_only]
        self.buffer_names = [n for n, _ in model.named_buffers()]
        for kind, names in (("p", self.param_names), ("b", self.buffer_names)):
            tensors = dict(model.named_parameters()) if kind == "p" else dict(model.named_buffers())
            for n in names:
                self.register_buffer(self._key(kind, n), tensors[n].detach().clone())

    @staticmethod
    def _key(kind: str, name: str) -> str:
        return f"{kind}__{name.replace('.', '__')}"

    def _shadow(self, kind: str, names: list[str]) -> list[Tensor]:
        return [getattr(self, self._key(kind, n)) for n in names]

    def _targets(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        missing = [n for n in self.param_names if n not in params] + [n for n in self.buffer_names if n not in buffers]
        if missing:
            raise ValueError(f"model does not match the EMA: missing {missing[:3]}... (built from another model?)")
        return [params[n] for n in self.param_names], [buffers[n] for n in self.buffer_names]

    def current_decay(self) -> float:
        """The decay the next `update` uses."""
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards `model`'s current weights (`torch._foreach_lerp_`, a python-float weight: no host
        sync while the shadow lives on the model's device)."""
        params, buffers = self._targets(model)
        shadow = self._shadow("p", self.param_names)
        if shadow:
            src = [p.detach().to(device=s.device, dtype=s.dtype) for p, s in zip(params, shadow)]
            torch._foreach_lerp_(shadow, src, 1.0 - self.current_decay())
        for s, b in zip(self._shadow("b", self.buffer_names), buffers):
            s.copy_(b)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the shadow weights (and buffers) into `model`."""
        params, buffers = self._targets(model)
        shadow = self._shadow("p", self.param_names) + self._shadow("b", self.buffer_names)
        for dst, src in zip(params + buffers, shadow):
            dst.copy_(src)

    @contextmanager
    def swap(self, model: nn.Module) -> Iterator[nn.Module]:
        """Use the EMA weights in `model` inside the block (e.g. for evaluation); restore them on exit."""
        params, buffers = self._targets(model)
        backup = [t.detach().clone() for t in params + buffers]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for dst, src in zip(params + buffers, backup):
                    dst.copy_(src)

    def get_extra_state(self) -> dict:
        return {"num_updates": self.num_updates, "decay": self.decay, "warmup": self.warmup}

    def set_extra_state(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])
        self.decay, self.warmup = float(state["decay"]), bool(state["warmup"])

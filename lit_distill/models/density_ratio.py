"""``DensityRatioClassifier``: the classifier network of NoDistillOneStep (arXiv 2502.08005).

Its logit ``d(x_t, t, cond)`` estimates ``log p_data,t(x_t) / p_g,t(x_t)`` once trained with
``lit_distill.losses.density_ratio.classifier_loss``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .diffusion_model import DiffusionModel


class _Features(Exception):
    """Raised by the forward hook to stop the backbone once the feature layer has run."""

    def __init__(self, output):
        super().__init__()
        self.output = output


class DensityRatioClassifier(nn.Module):
    """``d(x_t, timestep, cond) -> logit [B]``: a diffusion backbone truncated at ``feature_layer`` plus a head.

    The backbone (a :class:`DiffusionModel` copy, teacher- or randomly initialised) runs up to the named
    submodule of its net (``"mid_block"``: the UNet's encoder path and bottleneck; for a transformer e.g.
    ``"transformer_blocks.11"``); a forward hook captures that output and stops the pass, so the decoder is
    never run. Parameters the truncated pass never touches are frozen (found by one probe pass at build).
    Head for ``[B, C, h, w]`` features: SiLU, 3x3 conv, SiLU, global average pool, linear; for ``[B, N, D]``
    tokens: LayerNorm, mean over tokens, linear, SiLU, linear. Its last layer starts at zero, so ``d = 0``
    (ratio 1: no generator gradient) until the classifier has learned something.
    """

    def __init__(self, backbone: DiffusionModel, feature_layer: str = "mid_block", hidden: int = 128):
        super().__init__()
        self.backbone, self.feature_layer = backbone, feature_layer
        names = dict(backbone.net.named_modules())
        if feature_layer not in names:
            top = [n for n, _ in backbone.net.named_children()]
            raise ValueError(f"feature_layer={feature_layer!r} is not a submodule of {type(backbone.net).__name__}; "
                             f"its children are {top} (use a dotted name for deeper layers)")
        names[feature_layer].register_forward_hook(self._stop)
        features = self._probe()
        if features.ndim == 4:
            c = features.shape[1]
            self.head = nn.Sequential(nn.SiLU(), nn.Conv2d(c, hidden, 3, padding=1), nn.SiLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, 1))
        elif features.ndim == 3:
            d = features.shape[-1]
            self.head = nn.Sequential(nn.LayerNorm(d), _MeanTokens(), nn.Linear(d, hidden), nn.SiLU(),
                                      nn.Linear(hidden, 1))
        else:
            raise ValueError(f"feature_layer={feature_layer!r} gives features of shape {tuple(features.shape)}; "
                             "expected [B, C, h, w] or [B, N, D]")
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    @staticmethod
    def _stop(module, inputs, output):
        raise _Features(output[0] if isinstance(output, (tuple, list)) else output)

    def features(self, x_t: Tensor, timestep: Tensor, cond: Optional[dict]) -> Tensor:
        """The backbone's ``feature_layer`` output for ``x_t`` ``[B, C, H, W]`` at model timesteps ``[B]``."""
        try:
            self.backbone(x_t, timestep, cond)
        except _Features as stop:
            return stop.output.float()
        raise RuntimeError(f"feature_layer={self.feature_layer!r} did not run in the backbone's forward")

    def forward(self, x_t: Tensor, timestep: Tensor, cond: Optional[dict] = None) -> Tensor:
        return self.head(self.features(x_t, timestep, cond)).squeeze(-1)

    def _probe(self) -> Tensor:
        """One pass on a dummy input: the feature shape, and which backbone parameters the pass uses."""
        net = self.backbone.net
        params = [p for p in net.parameters() if p.requires_grad]
        x = torch.zeros(1, *self.backbone.sample_shape, device=self.backbone.device)
        t = self.backbone.schedule.training_timesteps(1, device=x.device)
        with torch.enable_grad():
            features = self.features(x, t, self.backbone.null_cond(1))
            used = torch.autograd.grad(features.sum(), params, allow_unused=True)
        for p, g in zip(params, used):
            if g is None:
                p.requires_grad_(False)
        return features.detach()


class _MeanTokens(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(1)

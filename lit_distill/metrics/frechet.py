"""Fréchet distance between Gaussians fitted to features, and a mergeable feature-statistics accumulator.

``FD = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})``. The trace of the matrix square root is
computed from eigenvalues in float64: with ``A = S1^{1/2}`` (symmetric, from ``eigh``), ``S1 S2`` is similar
to the symmetric PSD matrix ``A S2 A``, so ``tr((S1 S2)^{1/2}) = sum sqrt(eig(A S2 A))``. This needs no
``scipy.linalg.sqrtm`` (whose complex round-off the usual implementations discard) and is exact for
singular covariances.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor


def _psd_sqrt(matrix: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues clamped to 0)."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``; means ``[F]``, covariances ``[F, F]``.

    Computed in float64 on the inputs' device; returns a Python float (>= 0 up to round-off)."""
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(v).double() for v in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"shapes do not match: mu1 {tuple(mu1.shape)}, mu2 {tuple(mu2.shape)}, "
                         f"sigma1 {tuple(sigma1.shape)}, sigma2 {tuple(sigma2.shape)}")
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    root = _psd_sqrt(sigma1)
    cross = torch.linalg.eigvalsh(root @ sigma2 @ root).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + sigma1.trace() + sigma2.trace() - 2 * cross)


class FeatureStats:
    """Running ``count``, ``sum`` ``[F]`` and ``sum of outer products`` ``[F, F]`` of features, in float64.

    Exactly mergeable: :meth:`merge` adds another accumulator, :meth:`all_reduce` sums over DDP ranks (the
    tensors live on the device of the first features, so NCCL can reduce them on the GPU).
    """

    def __init__(self, num_features: int | None = None, device: torch.device | str | None = None):
        self.count = 0
        self.sum: Tensor | None = None
        self.outer: Tensor | None = None
        if num_features is not None:
            self._allocate(num_features, device)

    def _allocate(self, num_features: int, device) -> None:
        self.sum = torch.zeros(num_features, dtype=torch.float64, device=device)
        self.outer = torch.zeros(num_features, num_features, dtype=torch.float64, device=device)

    @property
    def num_features(self) -> int | None:
        return None if self.sum is None else self.sum.numel()

    def update(self, features: Tensor) -> "FeatureStats":
        """Add features ``[N, F]``."""
        if features.ndim != 2:
            raise ValueError(f"features: expected [N, F], got shape {tuple(features.shape)}")
        f = features.detach().double()
        if self.sum is None:
            self._allocate(f.shape[1], f.device)
        elif f.shape[1] != self.num_features:
            raise ValueError(f"features have {f.shape[1]} dimensions, the accumulator {self.num_features}")
        self.sum += f.sum(0).to(self.sum.device)
        self.outer += (f.T @ f).to(self.outer.device)
        self.count += f.shape[0]
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Add the statistics of ``other`` (in place); returns self."""
        if other.sum is None:
            return self
        if self.sum is None:
            self._allocate(other.num_features, other.sum.device)
        self.sum += other.sum.to(self.sum.device)
        self.outer += other.outer.to(self.outer.device)
        self.count += other.count
        return self

    def all_reduce(self) -> "FeatureStats":
        """Sum over the ranks of the default process group (no-op without torch.distributed); returns self."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        if self.sum is None:
            raise ValueError("all_reduce: every rank must have added features (the dimension is unknown here)")
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.sum.device)
        for t in (self.sum, self.outer, count):
            dist.all_reduce(t)
        self.count = int(count.item())
        return self

    def mean(self) -> Tensor:
        """``[F]`` float64."""
        if self.count < 1:
            raise ValueError("FeatureStats is empty: add features with update() first")
        return self.sum / self.count

    def covariance(self) -> Tensor:
        """Unbiased covariance ``[F, F]`` float64 (needs at least 2 samples)."""
        if self.count < 2:
            raise ValueError(f"covariance needs at least 2 samples, have {self.count}")
        mu = self.mean()
        return (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)

    def distance(self, other: "FeatureStats") -> float:
        """Fréchet distance between the Gaussians fitted to ``self`` and ``other``."""
        return frechet_distance(self.mean(), self.covariance(), other.mean().to(self.sum.device),
                                other.covariance().to(self.sum.device))

    # -- disk -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"count": self.count, "sum": None if self.sum is None else self.sum.cpu(),
                "outer": None if self.outer is None else self.outer.cpu()}

    @classmethod
    def from_state_dict(cls, state: dict, device=None) -> "FeatureStats":
        stats = cls()
        stats.count = int(state["count"])
        if state["sum"] is not None:
            stats.sum, stats.outer = state["sum"].to(device), state["outer"].to(device)
        return stats

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (a temporary file in the same folder, then renamed)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(self.state_dict(), f)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike, device=None) -> "FeatureStats":
        return cls.from_state_dict(torch.load(path, map_location="cpu", weights_only=True), device)

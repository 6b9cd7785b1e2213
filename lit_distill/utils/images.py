"""Image conversions. The library-wide convention: float tensors ``[B, C, H, W]`` in ``[-1, 1]``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Map images from ``[-1, 1]`` to ``[0, 1]`` (clamped). Any shape."""
    return ((images + 1.0) * 0.5).clamp(0.0, 1.0)


def from_unit(images: torch.Tensor) -> torch.Tensor:
    """Map images from ``[0, 1]`` to ``[-1, 1]``. Any shape; not clamped."""
    return images * 2.0 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images ``[B, C, H, W]`` (or one image ``[C, H, W]``) in ``[-1, 1]`` -> uint8 numpy ``[B, H, W, C]``.

    Values are clamped to ``[-1, 1]`` and rounded to 0..255.
    """
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4:
        raise ValueError(f"images: expected shape [B, C, H, W], got {tuple(images.shape)}")
    x = (to_unit(images.detach().float().cpu()) * 255.0).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def ink_moments(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ink-weighted central second moments of grey images ``[B, 1, H, W]`` in [-1, 1] (ink ``(x + 1) / 2``;
    RGB is averaged over channels): ``(mass, mu20, mu11, mu02)``, each float ``[B]``, in pixels^2 (``mu20``:
    horizontal, ``mu02``: vertical variance; ``mass``: total ink). Differentiable."""
    if images.dim() != 4:
        raise ValueError(f"images: expected shape [B, C, H, W], got {tuple(images.shape)}")
    ink = ((images.float().mean(dim=1) + 1) / 2).clamp(min=0)
    _, h, w = ink.shape
    mass = ink.sum((1, 2)).clamp(min=1e-6)
    ys = torch.arange(h, dtype=ink.dtype, device=ink.device)[None, :, None]
    xs = torch.arange(w, dtype=ink.dtype, device=ink.device)[None, None, :]
    dy = ys - ((ink * ys).sum((1, 2)) / mass)[:, None, None]
    dx = xs - ((ink * xs).sum((1, 2)) / mass)[:, None, None]
    moment = lambda a, b: (ink * a * b).sum((1, 2)) / mass  # noqa: E731
    return mass, moment(dx, dx), moment(dx, dy), moment(dy, dy)


def slant(images: torch.Tensor) -> torch.Tensor:
    """Slant ``[B]`` of grey images in [-1, 1]: the horizontal shift of the ink per row, ``-mu11 / mu02``
    (> 0: the top leans right; dimensionless). ``mu02`` has a floor of half a pixel squared, so a (nearly)
    blank image gets a finite slant. Differentiable."""
    _, _, mu11, mu02 = ink_moments(images)
    return -mu11 / mu02.clamp(min=0.5)


def make_grid_png(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8, padding: int = 2,
                  row_labels: Sequence[str] | None = None, scale: int = 1) -> Path:
    """Write images ``[B, C, H, W]`` in ``[-1, 1]`` (C = 1 or 3) as one PNG grid of ``nrow`` columns.

    Cells are separated by ``padding`` black pixels and enlarged ``scale`` times (nearest neighbour, for tiny
    images). ``row_labels`` (one string per grid row) are written left of their rows. Parent directories are
    created. Returns the path.
    """
    from PIL import Image

    check_images(images, name="images")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images: make_grid_png needs 1 or 3 channels, got {images.shape[1]}")
    if nrow < 1 or scale < 1:
        raise ValueError(f"nrow and scale: must be >= 1, got {nrow} and {scale}")
    arr = to_uint8(images)  # [B, H, W, C]
    if scale > 1:
        arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    b, h, w, c = arr.shape
    ncol = min(nrow, b)
    nrows = (b + ncol - 1) // ncol
    if row_labels is not None and len(row_labels) != nrows:
        raise ValueError(f"row_labels: expected one label per grid row ({nrows}), got {len(row_labels)}")
    grid = np.zeros((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), dtype=np.uint8)
    for i in range(b):
        r, q = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[y : y + h, x : x + w] = arr[i]
    image = Image.fromarray(grid[..., 0] if c == 1 else grid, mode="L" if c == 1 else "RGB")
    if row_labels is not None:
        image = _with_row_labels(image, list(row_labels), h, padding)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _with_row_labels(grid, labels: list[str], cell: int, padding: int):
    """``grid`` (a PIL image) with a black margin on the left holding ``labels[r]`` beside row ``r``."""
    from PIL import Image, ImageDraw, ImageFont

    size = max(8, min(14, cell - 2))
    font = ImageFont.load_default(size=size)
    margin = int(max(font.getlength(label) for label in labels)) + 2 * padding + 4
    out = Image.new(grid.mode, (grid.width + margin, grid.height))
    out.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(out)
    white = 255 if grid.mode == "L" else (255, 255, 255)
    for r, label in enumerate(labels):
        y = padding + r * (cell + padding) + (cell - size) // 2
        draw.text((padding + 2, y), label, fill=white, font=font)
    return out


def check_images(
    images: torch.Tensor,
    channels: int | None = None,
    size: int | Sequence[int] | None = None,
    name: str = "images",
    atol: float = 1e-3,
) -> torch.Tensor:
    """Check that ``images`` follow the convention and return them unchanged.

    Requires a floating tensor of shape ``[B, C, H, W]`` with values in ``[-1 - atol, 1 + atol]``;
    ``channels`` (C) and ``size`` (``H == W == size``, or ``(H, W)``) are checked when given.
    Raises ``ValueError`` naming ``name`` and saying how to fix the input.
    """
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor [B, C, H, W], got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(
            f"{name}: expected shape [B, C, H, W], got {tuple(images.shape)}; add a batch dim with .unsqueeze(0)"
        )
    if not images.is_floating_point():
        raise ValueError(
            f"{name}: expected a float tensor in [-1, 1], got dtype {images.dtype}; "
            "convert uint8 images with lit_distill.utils.images.from_unit(x.float() / 255)"
        )
    if channels is not None and images.shape[1] != channels:
        raise ValueError(f"{name}: expected {channels} channels, got shape {tuple(images.shape)}")
    if size is not None:
        hw = (size, size) if isinstance(size, int) else tuple(size)
        if tuple(images.shape[-2:]) != tuple(hw):
            got = tuple(images.shape[-2:])
            raise ValueError(f"{name}: expected spatial size {tuple(hw)}, got {got}; resize the images")
    if images.numel():
        lo, hi = float(images.min()), float(images.max())
        if lo < -1 - atol or hi > 1 + atol or lo != lo or hi != hi:
            raise ValueError(
                f"{name}: values must lie in [-1, 1], got min {lo:.3g} max {hi:.3g}; "
                "map [0, 1] images with from_unit(x), or clamp(-1, 1)"
            )
    return images

"""Built-in rewards that need no downloaded weights.

All take ``images: [B, C, H, W]`` float in ``[-1, 1]`` (C = 1 or 3) and return ``Tensor[B]`` float32
on ``images.device``. "Ink" is the pixel intensity mapped to ``[0, 1]``: ``(x + 1) / 2``; for the
embedded digits (bright strokes on a dark background) it is the amount of stroke.
"""
from __future__ import annotations

import io
import re
from functools import lru_cache
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_distill.rewards.base import Reward, register_reward
from lit_distill.utils.images import slant, to_uint8, to_unit

__all__ = [
    "JpegCompressibility",
    "JpegIncompressibility",
    "Brightness",
    "DigitCorrectness",
    "Slant",
    "Symmetry",
    "jpeg_sizes_kb",
    "parse_digit",
]

JPEG_QUALITY = 95
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_DIGIT_RE = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r"|[0-9])\b", re.IGNORECASE)


def jpeg_sizes_kb(images: Tensor, quality: int = JPEG_QUALITY) -> list[float]:
    """JPEG size in kilobytes (bytes / 1000) of each image, as DDPO: uint8 via ``round(255 * x01)``,
    PIL ``save(format="JPEG", quality=95)``. 1-channel images are saved as greyscale ("L")."""
    from PIL import Image

    sizes = []
    for arr in to_uint8(images):  # [H, W, C] uint8
        buf = io.BytesIO()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return sizes


@lru_cache(maxsize=64)
def _constant_image_kb(channels: int, height: int, width: int) -> float:
    """JPEG size of a mid-grey image (level 128: every DCT coefficient is 0 after JPEG's level shift),
    the smallest of all constant images."""
    return jpeg_sizes_kb(torch.full((1, channels, height, width), 128 / 255 * 2 - 1))[0]


@register_reward("jpeg_incompressibility")
class JpegIncompressibility(Reward):
    """DDPO's JPEG incompressibility: ``+size_kb`` of the image saved as JPEG quality 95.

    Range ``(0, inf)``; ``max_value = None`` (no useful bound). Not differentiable (PIL on CPU).
    """

    max_value = None
    sign = 1.0

    def forward(self, images: Tensor, prompts: Sequence[str], tasks: Sequence[str], **metadata: Any) -> Tensor:
        sizes = torch.tensor(jpeg_sizes_kb(images), dtype=torch.float32, device=images.device)
        return self.sign * sizes


@register_reward("jpeg_compressibility")
class JpegCompressibility(JpegIncompressibility):
    """DDPO's JPEG compressibility: ``-size_kb`` of the image saved as JPEG quality 95.

    ``max_value`` is the best achievable in practice: minus the size of a constant mid-grey image of
    the same shape (the JPEG headers and tables are a fixed cost). Give ``resolution`` (and ``channels``) to know it
    at construction; otherwise it is set from the first batch scored.
    """

    sign = -1.0

    def __init__(self, resolution: int | None = None, channels: int = 1):
        super().__init__()
        self.max_value = -_constant_image_kb(channels, resolution, resolution) if resolution else None

    def forward(self, images: Tensor, prompts: Sequence[str], tasks: Sequence[str], **metadata: Any) -> Tensor:
        if self.max_value is None:
            self.max_value = -_constant_image_kb(*images.shape[1:])
        return super().forward(images, prompts, tasks, **metadata)


@register_reward("brightness")
class Brightness(Reward):
    """Ink target: ``-|mean ink - target|`` with ink = ``(x + 1) / 2`` averaged over C, H, W.

    ``target`` in ``[0, 1]`` (default 0.5: bolder strokes than the embedded digits, whose mean ink
    is about 0.3). Range ``[-max(target, 1 - target), 0]``; ``max_value = 0``. Differentiable.
    """

    max_value = 0.0
    differentiable = True

    def __init__(self, target: float = 0.5):
        super().__init__()
        if not 0.0 <= float(target) <= 1.0:
            raise ValueError(f"target: must lie in [0, 1] (fraction of full intensity), got {target}")
        self.target = float(target)

    def forward(self, images: Tensor, prompts: Sequence[str], tasks: Sequence[str], **metadata: Any) -> Tensor:
        ink = to_unit(images.float()).mean(dim=(1, 2, 3))
        return -(ink - self.target).abs()


@register_reward("slant")
class Slant(Reward):
    """Slant target: ``-|slant - target|``, where slant is the horizontal shift of the ink per row
    (``lit_distill.utils.images.slant``: ``-mu11 / mu02`` of the ink's second moments; > 0 leans right).

    ``target`` is dimensionless (default 0.7, about 35 degrees: more italic than the embedded digits captioned
    "slanted", whose mean is about 0.5; upright digits are near 0). Range ``(-inf, 0]``; ``max_value = 0``.
    Differentiable.
    """

    max_value = 0.0
    differentiable = True

    def __init__(self, target: float = 0.7):
        super().__init__()
        if not -3.0 <= float(target) <= 3.0:
            raise ValueError(f"target: a slant between -3 and 3 (horizontal pixels per row), got {target}")
        self.target = float(target)

    def forward(self, images: Tensor, prompts: Sequence[str], tasks: Sequence[str], **metadata: Any) -> Tensor:
        return -(slant(images) - self.target).abs()


@register_reward("symmetry")
class Symmetry(Reward):
    """Left-right mirror symmetry: ``-mean |ink - fliplr(ink)|`` over C, H, W (ink = ``(x + 1) / 2``).

    Range ``[-1, 0]``; ``max_value = 0`` (a mirror-symmetric image, e.g. a well-drawn 0, 1 or 8).
    Differentiable. Pair it with ``digit_correctness`` (a blank image is symmetric too).
    """

    max_value = 0.0
    differentiable = True

    def forward(self, images: Tensor, prompts: Sequence[str], tasks: Sequence[str], **metadata: Any) -> Tensor:
        ink = to_unit(images.float())
        return -(ink - ink.flip(-1)).abs().mean(dim=(1, 2, 3))


def parse_digit(prompt: str) -> int:
    """The digit a prompt names: a word ("a handwritten seven" -> 7) or a numeral ("the digit 7").

    Raises ``ValueError`` if the prompt names no digit or several different ones.
    """
    found = {m.lower() for m in _DIGIT_RE.findall(prompt)}
    digits = {int(m) if m.isdigit() else DIGIT_WORDS.index(m) for m in found}
    if len(digits) != 1:
        what = "no digit" if not digits else f"several digits {sorted(digits)}"
        raise ValueError(
            f"digit_correctness: prompt {prompt!r} names {what}; pass metadata digit=LongTensor[B] "
            "or name exactly one digit word (zero..nine) in each prompt"
        )
    return digits.pop()


def _resize(images: Tensor, size: int) -> Tensor:
    if tuple(images.shape[-2:]) == (size, size):
        return images
    down = size < max(images.shape[-2:])
    out = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=down)
    return out.clamp(-1.0, 1.0)


def to_grey(images: Tensor) -> Tensor:
    """``[B, 3, H, W]`` -> ``[B, 1, H, W]``: the channel mean, as the project's digit classifier does."""
    if images.shape[1] == 1:
        return images
    if images.shape[1] != 3:
        raise ValueError(f"images: expected 1 or 3 channels, got shape {tuple(images.shape)}")
    return images.mean(dim=1, keepdim=True)


@register_reward("digit_correctness")
class DigitCorrectness(Reward):
    """Probability that the digit classifier gives the prompted digit: ``softmax(clf(x))[digit]``.

    The digit comes from metadata ``digit: LongTensor[B]`` or, if absent, from the prompt's digit
    word. Images are converted to grey (channel mean) and resized (bilinear) to the classifier's resolution.
    Range ``[0, 1]``, ``max_value = 1``. Differentiable.

    Args:
        classifier: an ``nn.Module`` mapping ``[B, 1, R, R]`` in ``[-1, 1]`` to logits ``[B, 10]``;
            default: ``lit_distill.models.classifier.get_digit_classifier(resolution, cache_dir)``.
        resolution: the classifier's input size R; default ``classifier.resolution`` if it has one,
            else 16 for the project's classifier (a given classifier without it gets no resize).
        cache_dir: where the project's classifier is cached (trained on first use).
    """

    max_value = 1.0
    differentiable = True

    def __init__(self, classifier: nn.Module | None = None, resolution: int | None = None, cache_dir: str | None = None):
        super().__init__()
        if classifier is None:
            from lit_distill.models.classifier import get_digit_classifier

            classifier = get_digit_classifier(resolution=resolution or 16, cache_dir=cache_dir)
        self.classifier = classifier
        self.resolution = resolution or getattr(classifier, "resolution", None)
        self.freeze()

    def digits(self, prompts: Sequence[str], digit: Tensor | Sequence[int] | None, device: torch.device) -> Tensor:
        """The prompted digits ``LongTensor[B]``: from ``digit`` if given, else parsed from the prompts."""
        if digit is None:
            return torch.tensor([parse_digit(p) for p in prompts], dtype=torch.long, device=device)
        if not isinstance(digit, Tensor) and not all(isinstance(v, int) and not isinstance(v, bool) for v in digit):
            bad = next(v for v in digit if not isinstance(v, int) or isinstance(v, bool))
            raise ValueError(f"digit: metadata digits must be integers 0..9, got {bad!r} ({type(bad).__name__}); in a "
                             'prompt file write "digit": 7, not "7", and give it in every row of the task')
        d = torch.as_tensor(digit, device=device).long().view(-1)
        if d.numel() and (int(d.min()) < 0 or int(d.max()) > 9):
            raise ValueError(f"digit: metadata digits must lie in 0..9, got {d.tolist()}")
        return d

    def forward(self, images: Tensor, prompts: Sequence[str], tasks: Sequence[str], **metadata: Any) -> Tensor:
        d = self.digits(prompts, metadata.get("digit"), images.device)
        if d.shape[0] != images.shape[0]:
            raise ValueError(f"digit: expected {images.shape[0]} digits (one per image), got {d.shape[0]}")
        x = to_grey(images.float())
        if self.resolution:
            x = _resize(x, int(self.resolution))
        probs = self.classifier(x).float().softmax(dim=-1)
        return probs.gather(1, d[:, None]).squeeze(1)

"""What a handwritten digit looks like, measured from its pixels, and the caption words that say it.

The embedded base model learns these words from its captions, so that task prompts ("a bold
handwritten three", "a thin seven") move its output as clearly as the digit word does.

Measures (:func:`measure_strokes`, on native-resolution images ``[N, 1, H, W]`` in [-1, 1], ink
``(x + 1) / 2``; moments are ink-weighted):

- ``thickness``: stroke width, ``2 * area / perimeter`` of the inked region (ink > 0.5), in pixels;
- ``width``: horizontal spread once the slant is sheared away, ``sqrt(mu20 - mu11^2 / mu02)``, in pixels;
- ``slant``: horizontal shift per row, ``-mu11 / mu02`` (> 0: the top leans right), dimensionless.

Words (:func:`style_words`): within each digit class, the thickest ``fraction`` of images are "bold" and
the thinnest "thin", the widest "wide" and the narrowest "narrow" (class-relative, since a one is
always narrower than a zero); a slant above ``SLANTED`` is "slanted", below ``UPRIGHT`` in magnitude
"upright". Captions (:func:`describe`) name a random subset of an image's words, with synonyms.
"""
from __future__ import annotations

import random
import re
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_distill.utils.images import ink_moments

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
#: attribute -> (word for the high end, word for the low end), in caption order
ATTRIBUTES = {"thickness": ("bold", "thin"), "width": ("wide", "narrow"), "slant": ("slanted", "upright")}
#: words captions may use in place of an attribute word
SYNONYMS = {"bold": ("bold", "thick"), "thin": ("thin", "light"), "wide": ("wide",), "narrow": ("narrow",),
            "slanted": ("slanted", "italic"), "upright": ("upright",)}
#: ``{adjectives}`` is empty or a run of words ending in a space; ``{word}`` is the digit word
CAPTION_TEMPLATES = ("a {adjectives}handwritten {word}", "a {adjectives}digit {word}",
                     "the {adjectives}number {word} written by hand")
SLANTED, UPRIGHT = 0.35, 0.08


def measure_strokes(images: Tensor) -> dict[str, Tensor]:
    """``{"thickness", "width", "slant"}``, each float ``[N]``, of grey images ``[N, 1, H, W]`` in [-1, 1]."""
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"images: expected [N, 1, H, W], got shape {tuple(images.shape)}")
    _, mu20, mu11, mu02 = ink_moments(images)
    inked = (images[:, 0].float() > 0).float()  # ink > 0.5
    padded = F.pad(inked, (1, 1, 1, 1))
    interior = inked * padded[:, :-2, 1:-1] * padded[:, 2:, 1:-1] * padded[:, 1:-1, :-2] * padded[:, 1:-1, 2:]
    area = inked.sum((1, 2))
    perimeter = (area - interior.sum((1, 2))).clamp(min=1)
    mu02 = mu02.clamp(min=0.5)  # as in slant(): a (nearly) blank image gets finite measures
    return {"thickness": 2 * area / perimeter,
            "width": (mu20 - mu11**2 / mu02).clamp(min=0).sqrt(),
            "slant": -mu11 / mu02}


def style_words(measures: dict[str, Tensor], labels: Tensor, fraction: float = 0.3) -> list[tuple[str, ...]]:
    """The attribute words of each image (``tuple`` in ``ATTRIBUTES`` order, possibly empty), from
    :func:`measure_strokes`' measures and the digit ``labels [N]``."""
    if not 0 < fraction < 0.5:
        raise ValueError(f"fraction={fraction}: need 0 < fraction < 0.5 (the share of each class called high, and low)")
    n = labels.shape[0]
    high = {name: torch.zeros(n, dtype=torch.bool) for name in ATTRIBUTES}
    low = {name: torch.zeros(n, dtype=torch.bool) for name in ATTRIBUTES}
    for name in ("thickness", "width"):
        for digit in labels.unique():
            members = labels == digit
            values = measures[name][members]
            lo, hi = torch.quantile(values, torch.tensor([fraction, 1 - fraction], dtype=values.dtype))
            high[name][members], low[name][members] = values > hi, values < lo
    high["slant"], low["slant"] = measures["slant"] > SLANTED, measures["slant"].abs() < UPRIGHT
    words = []
    for i in range(n):
        words.append(tuple(pair[0] if high[name][i] else pair[1] for name, pair in ATTRIBUTES.items()
                           if high[name][i] or low[name][i]))
    return words


def describe(label: int, words: Sequence[str], rng: random.Random, keep: float = 0.75) -> str:
    """A caption of a digit ``label`` with style ``words``: each word kept with probability ``keep``, shown
    as one of its ``SYNONYMS``, in one of ``CAPTION_TEMPLATES`` (all drawn from ``rng``)."""
    kept = [rng.choice(SYNONYMS[w]) for w in words if rng.random() < keep]
    template = rng.choice(CAPTION_TEMPLATES)
    return with_articles(template.format(adjectives="".join(w + " " for w in kept), word=DIGIT_WORDS[int(label)]))


def with_articles(text: str) -> str:
    """"a" before a vowel sound becomes "an" ("a upright one" -> "an upright one"; "a one" stays)."""
    return re.sub(r"\b([Aa]) (?=[aeiou])(?!one\b)", r"\1n ", text)


def caption_images(native_images: Tensor, labels: Tensor, seed: int = 0) -> list[str]:
    """One caption per image (``describe`` with a generator seeded by ``seed``), from the native-resolution
    images ``[N, 1, H, W]`` in [-1, 1] and their digit ``labels [N]``."""
    words = style_words(measure_strokes(native_images), labels)
    rng = random.Random(seed)
    return [describe(int(y), w, rng) for y, w in zip(labels.tolist(), words)]


def vocabulary() -> set[str]:
    """Every word a caption can contain."""
    found = {w for words in SYNONYMS.values() for w in words} | set(DIGIT_WORDS)
    for template in CAPTION_TEMPLATES:
        found.update(template.replace("{adjectives}", "").replace("{word}", "").split())
    return found

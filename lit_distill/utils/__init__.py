"""Small helpers shared by every part of lit_distill: image conversions (loaded on first use), the cache
directory, eval mode, the smoke-test size."""
from __future__ import annotations

import os
from pathlib import Path

from lit_distill._lazy import lazy_exports

_EXPORTS = {**dict.fromkeys(["check_images", "from_unit", "ink_moments", "make_grid_png", "slant", "to_uint8",
                             "to_unit"], ".images"),
            "eval_mode": ".modules"}
__all__ = sorted(["TINY_ENV", "default_cache_dir", "tiny_run", *_EXPORTS])
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

#: ``LIT_DISTILL_TINY=1`` runs every command at smoke-test size: the tiny embedded base recipe, a few steps per
#: stage, small evaluations (``lit_distill.cli``, ``lit_distill.pipeline``). It checks that commands run; its
#: numbers mean nothing.
TINY_ENV = "LIT_DISTILL_TINY"


def default_cache_dir() -> Path:
    """The directory where lit_distill caches trained helpers (classifiers, base models).

    ``$LIT_DISTILL_CACHE`` if set, else ``~/.cache/lit_distill``. The directory is not created here.
    """
    env = os.environ.get("LIT_DISTILL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lit_distill"


def tiny_run() -> bool:
    """True when ``$LIT_DISTILL_TINY`` asks for smoke-test sizes (any value but empty, 0, false, no)."""
    return os.environ.get(TINY_ENV, "").strip().lower() not in ("", "0", "false", "no")

"""Lazy package exports (PEP 562): a package lists its public names and the submodule of each; a name's
submodule is imported the first time the name is used, so ``import lit_distill`` (and ``lit-distill --help``)
stays fast while ``from lit_distill import TeacherRL`` works."""
from __future__ import annotations

import importlib
import sys
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, whose public ``name`` is defined in the submodule
    ``exports[name]`` (relative, e.g. ``".methods"``). A resolved name is stored in the package, so each
    import happens once."""

    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__

"""Where a model comes from: one string names it in every config and every method.

``load_model`` only *resolves* a source; it never trains anything. The embedded base model is made by the
pipeline (``lit-distill embedded-base``, or any ``lit-distill fit`` / ``quickstart`` run that names it) and
then found here in the cache. Lightning checkpoints of the methods are read by ``lit_distill.methods``
(``load_source``), which knows the methods.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .base_recipe import EMBEDDED_BASE, default_base_recipe
from .builders import build_embedded_model
from .diffusion_model import DiffusionModel

SOURCES_HELP = ("'embedded' (a fresh tiny text-conditional model built from config), 'embedded:base' "
                "(the pretrained embedded base model, from the cache) or the path of a diffusers-style model "
                "directory (unet/ or transformer/, scheduler/, optional vae/, text_encoder/ and tokenizer/)")


class EmbeddedBaseMissing(FileNotFoundError):
    """``"embedded:base"`` names a base model that is not in the cache yet; the message says how to make it."""


def embedded_base_dir(resolution: Optional[int] = None, family: Optional[str] = None,
                      cache_dir: Optional[str] = None, **changes) -> Path:
    """The cache directory of the embedded base model: that of the default base recipe
    (:class:`~lit_distill.models.base_recipe.BaseRecipe`), with the given fields changed (``resolution``,
    ``family``, ``max_steps``, ...; a field that does not exist raises a ``TypeError`` naming it)."""
    changes = {**{k: v for k, v in dict(resolution=resolution, family=family).items() if v is not None}, **changes}
    recipe = default_base_recipe()
    return (recipe.replace(**changes) if changes else recipe).directory(cache_dir)


def load_model(source: "str | DiffusionModel" = "embedded", **kwargs) -> DiffusionModel:
    """Build or load a :class:`DiffusionModel`.

    ``source`` is a ``DiffusionModel`` (returned as is: for notebooks and programmatic use) or one of
    {help}. ``kwargs`` go to ``build_embedded_model`` for ``"embedded"``, to :func:`embedded_base_dir`
    (``resolution``, ``family``, ``cache_dir``) for ``"embedded:base"`` and to ``DiffusionModel.from_pretrained``
    for a directory. Raises :class:`EmbeddedBaseMissing` for an ``"embedded:base"`` not cached yet, naming the
    command that makes it, and ``FileNotFoundError`` for anything else that is not there.
    """
    if isinstance(source, DiffusionModel):
        return source
    if source == "embedded":
        return build_embedded_model(**kwargs)
    if source == EMBEDDED_BASE:
        path = embedded_base_dir(**kwargs)
        if not (path / "model_index.json").is_file():
            options = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in kwargs.items() if v is not None)
            raise EmbeddedBaseMissing(
                f"model='embedded:base': the embedded base model is not in the cache yet ({path}). Make it once "
                f"with `lit-distill embedded-base{' ' + options if options else ''}` (a few minutes on a CPU); "
                "`lit-distill quickstart` and `lit-distill fit` with a config naming embedded:base make it "
                "first too, and from Python: lit_distill.pipeline.ensure_embedded_base().")
        return DiffusionModel.from_pretrained(path)
    path = Path(source).expanduser()
    if not path.is_dir():
        hint = " (Lightning checkpoints are read by lit_distill.methods.load_source)" if path.suffix == ".ckpt" else ""
        raise FileNotFoundError(f"model={source!r}: no such directory{hint}. Give {SOURCES_HELP}.")
    return DiffusionModel.from_pretrained(path, **kwargs)


load_model.__doc__ = load_model.__doc__.format(help=SOURCES_HELP)

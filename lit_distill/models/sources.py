"""Where a model comes from: one string names it in every config and every method."""
from __future__ import annotations

from pathlib import Path

from .builders import build_embedded_model
from .diffusion_model import DiffusionModel

SOURCES_HELP = ("'embedded' (a fresh tiny text-conditional model built from config), 'embedded:base' "
                "(the pretrained embedded base model, trained and cached on first use) or the path of a "
                "diffusers-style model directory (unet/ or transformer/, scheduler/, optional vae/, "
                "text_encoder/ and tokenizer/)")


def load_model(source: "str | DiffusionModel" = "embedded", **kwargs) -> DiffusionModel:
    """Build or load a :class:`DiffusionModel`.

    ``source`` is a ``DiffusionModel`` (returned as is: for notebooks and programmatic use) or one of
    {help}. ``kwargs`` go to ``build_embedded_model`` for ``"embedded"``, to
    ``ensure_embedded_base`` for ``"embedded:base"`` and to ``DiffusionModel.from_pretrained`` for a
    directory.
    """
    if isinstance(source, DiffusionModel):
        return source
    if source == "embedded":
        return build_embedded_model(**kwargs)
    if source == "embedded:base":
        from ..pipeline import ensure_embedded_base

        return DiffusionModel.from_pretrained(ensure_embedded_base(**kwargs))
    path = Path(source).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model={source!r}: no such directory. Give {SOURCES_HELP}.")
    return DiffusionModel.from_pretrained(path, **kwargs)


load_model.__doc__ = load_model.__doc__.format(help=SOURCES_HELP)

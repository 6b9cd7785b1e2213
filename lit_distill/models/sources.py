"""Where a model comes from: one string names it in every config and every method."""
from __future__ import annotations

from pathlib import Path

from .builders import build_embedded_model
from .diffusion_model import DiffusionModel

SOURCES_HELP = ("'embedded' (a fresh tiny text-conditional model built from config), 'embedded:base' "
                "(the pretrained embedded base model, trained and cached on first use), the path of a "
                "diffusers-style model directory (unet/ or transformer/, scheduler/, optional vae/, "
                "text_encoder/ and tokenizer/) or a Lightning checkpoint (.ckpt) of a lit_distill method")


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
    if path.suffix == ".ckpt" and path.is_file():
        return model_from_checkpoint(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model={source!r}: no such directory. Give {SOURCES_HELP}.")
    return DiffusionModel.from_pretrained(path, **kwargs)


load_model.__doc__ = load_model.__doc__.format(help=SOURCES_HELP)


def model_from_checkpoint(path: Path) -> DiffusionModel:
    """The trained model of a lit_distill Lightning checkpoint (TeacherRL, OPDStudent, DiffusionPretrain: the
    EMA weights where there are some; the one-step methods: the generator's network). The checkpoint's
    hyper-parameters name the source it started from, which must still be loadable."""
    from .. import methods
    from ..utils.checkpoint_files import read_checkpoint

    checkpoint = read_checkpoint(path, "model")
    method = checkpoint.get("lit_distill_method")
    classes = {cls.method: cls for cls in (methods.DiffusionPretrain, methods.TeacherRL, methods.OPDStudent,
                                           methods.DisBackStudent, methods.NoDistillOneStep)}
    if method not in classes:
        raise ValueError(f"model={str(path)!r} is not a lit_distill checkpoint (method {method!r}); give one "
                         f"written by {sorted(classes)} or a model directory")
    module = classes[method].load_from_checkpoint(path, map_location="cpu", weights_only=False)
    if getattr(module, "ema", None) is not None and method == "pretrain":
        module.ema.copy_to(module.model)
    return module.model

"""Model sources that need the methods: a Lightning checkpoint (``.ckpt``) of any lit_distill method.

``load_source`` is what every method calls on its ``model`` / ``teacher`` / ``teachers`` arguments: a ``.ckpt``
file gives the model that the method's ``export`` writes (EMA weights where the method keeps an EMA, LoRA
merged), so a checkpoint and its export are interchangeable; every other source goes to
:func:`lit_distill.models.load_model`.
"""
from __future__ import annotations

import copy
from pathlib import Path

from ..models.diffusion_model import DiffusionModel
from ..models.sources import SOURCES_HELP, load_model
from ..utils.checkpoint_files import read_checkpoint


def load_source(source: "str | DiffusionModel", **kwargs) -> DiffusionModel:
    """``load_model(source, **kwargs)``, or :func:`model_from_checkpoint` when ``source`` is a ``.ckpt`` file."""
    if isinstance(source, (str, Path)) and Path(source).suffix == ".ckpt":
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model={str(source)!r}: no such directory or checkpoint file. Give a Lightning "
                                    f"checkpoint (.ckpt) of a lit_distill method, or {SOURCES_HELP}.")
        return model_from_checkpoint(path)
    return load_model(source, **kwargs)


def method_classes() -> dict[str, type]:
    """``{checkpoint method name: class}`` of the library's methods."""
    from . import DiffusionPretrain, DisBackStudent, NoDistillOneStep, OPDStudent, TeacherRL

    return {cls.method: cls for cls in (DiffusionPretrain, TeacherRL, OPDStudent, DisBackStudent, NoDistillOneStep)}


def model_from_checkpoint(path: str | Path) -> DiffusionModel:
    """The exported model of a lit_distill Lightning checkpoint: what ``module.export(dir)`` would write (the EMA
    weights of DiffusionPretrain and of the one-step generators, the LoRA-merged model of TeacherRL and
    OPDStudent). The checkpoint's hyper-parameters name the sources it started from, which must still load."""
    checkpoint = read_checkpoint(path, "model")
    method, classes = checkpoint.get("lit_distill_method"), method_classes()
    if method not in classes:
        raise ValueError(f"model={str(path)!r} is not a lit_distill checkpoint (method {method!r}); give one "
                         f"written by {sorted(classes)} or a model directory")
    module = classes[method].load_from_checkpoint(path, map_location="cpu", weights_only=False)
    with module.exported_model() as model:
        return copy.deepcopy(model)

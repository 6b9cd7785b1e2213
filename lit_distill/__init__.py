"""lit_distill: reward fine-tuning, multi-teacher on-policy distillation and one-step generators for
diffusion models, on PyTorch Lightning.

The methods, data modules and callbacks import from here (``from lit_distill import TeacherRL``); each is
loaded on first use, so ``import lit_distill`` itself imports nothing heavy.
"""
from ._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    **dict.fromkeys(["DiffusionPretrain", "TeacherRL", "OPDStudent", "DisBackStudent", "NoDistillOneStep",
                     "DistillModule", "OneStepModule", "NonFiniteLossError"], ".methods"),
    **dict.fromkeys(["ImageDataModule", "PromptDataModule"], ".data"),
    **dict.fromkeys(["RewardCallback", "FIDCallback", "ExportCallback", "DurableCheckpoint"], ".callbacks"),
    **dict.fromkeys(["DiffusionModel", "BaseRecipe"], ".models"),
    "load_model": ".models.sources",
    **dict.fromkeys(["Reward", "build_reward", "register_reward"], ".rewards"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

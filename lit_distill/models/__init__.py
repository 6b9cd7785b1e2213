"""Models: `DiffusionModel` (denoiser + schedule + prompt encoder + VAE), builders, LoRA, EMA, the embedded base
recipe. Names load on first use (see ``lit_distill._lazy``)."""
from .._lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["SD3_MEDIUM_TRANSFORMER_CONFIG", "SD15_UNET_CONFIG", "build_denoiser", "build_embedded_model",
                     "build_sd3_like_transformer", "build_sd15_like_unet", "embedded_scheduler_config",
                     "load_denoiser"], ".builders"),
    "DiffusionModel": ".diffusion_model",
    "DensityRatioClassifier": ".density_ratio",
    **dict.fromkeys(["EmbeddedBaseMissing", "embedded_base_dir", "load_model"], ".sources"),
    "EMA": ".ema",
    **dict.fromkeys(["add_lora", "lora_disabled", "lora_state_dict", "merge_lora", "save_lora"], ".lora"),
    **dict.fromkeys(["build_text_encoder", "build_word_tokenizer"], ".text"),
    **dict.fromkeys(["BaseRecipe", "TINY_BASE_RECIPE", "default_base_recipe"], ".base_recipe"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

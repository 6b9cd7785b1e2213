"""Models: `DiffusionModel` (denoiser + schedule + prompt encoder + VAE), builders, LoRA, EMA."""

from .builders import (
    SD3_MEDIUM_TRANSFORMER_CONFIG,
    SD15_UNET_CONFIG,
    build_denoiser,
    build_embedded_model,
    build_sd3_like_transformer,
    build_sd15_like_unet,
    embedded_scheduler_config,
    load_denoiser,
)
from .density_ratio import DensityRatioClassifier
from .diffusion_model import DiffusionModel
from .ema import EMA
from .lora import add_lora, lora_disabled, lora_state_dict, merge_lora, save_lora
from .sources import EmbeddedBaseMissing, embedded_base_dir, load_model
from .text import build_text_encoder, build_word_tokenizer

__all__ = [
    "DiffusionModel", "DensityRatioClassifier", "EMA",
    "build_embedded_model", "build_denoiser", "load_denoiser", "build_sd15_like_unet", "build_sd3_like_transformer",
    "embedded_scheduler_config", "SD15_UNET_CONFIG", "SD3_MEDIUM_TRANSFORMER_CONFIG",
    "build_word_tokenizer", "build_text_encoder",
    "add_lora", "lora_state_dict", "save_lora", "lora_disabled", "merge_lora",
    "load_model", "embedded_base_dir", "EmbeddedBaseMissing",
]

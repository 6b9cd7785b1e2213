"""Builders: the embedded tiny base model, diffusers denoisers from a config or a directory, and the
real-size SD-1.5 / SD3-medium denoiser configs (random weights) used by the GPU benchmarks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from .diffusion_model import DiffusionModel
from .text import build_text_encoder, build_word_tokenizer

SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD3_MEDIUM_TRANSFORMER_CONFIG = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192,
)


def build_denoiser(class_name: str, config: dict) -> nn.Module:
    """Any diffusers model class by name (e.g. `"UNet2DModel"`), randomly initialised from `config`."""
    import diffusers

    model_cls = getattr(diffusers, class_name, None)
    if model_cls is None or not hasattr(model_cls, "from_config"):
        raise ValueError(f"class_name={class_name!r} is not a diffusers model class (e.g. 'UNet2DConditionModel')")
    return model_cls.from_config(dict(config))


def load_denoiser(path: str, torch_dtype: torch.dtype | None = None) -> nn.Module:
    """A diffusers denoiser from a local model directory (`config.json` + weights) or from a pipeline
    directory's `unet/` or `transformer/` subfolder. The class comes from `config.json`'s `_class_name`."""
    import diffusers

    root = Path(path)
    for folder in (root, root / "unet", root / "transformer"):
        if (folder / "config.json").is_file():
            name = json.loads((folder / "config.json").read_text()).get("_class_name")
            if name and hasattr(diffusers, name):
                kw = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
                return getattr(diffusers, name).from_pretrained(str(folder), **kw)
    raise FileNotFoundError(f"path={str(root)!r}: no diffusers model config.json found there or in unet/ or "
                            "transformer/ (save one with model.save_pretrained(path))")


def build_sd15_like_unet(**overrides) -> nn.Module:
    """A randomly initialised SD-1.5 `UNet2DConditionModel` (860M params); `overrides` replace config keys
    (e.g. `block_out_channels=(32, 64, 64, 64), cross_attention_dim=32` for a test-sized one)."""
    return build_denoiser("UNet2DConditionModel", {**SD15_UNET_CONFIG, **overrides})


def build_sd3_like_transformer(**overrides) -> nn.Module:
    """A randomly initialised SD3-medium `SD3Transformer2DModel` (2B params); `overrides` replace config keys
    (e.g. `num_layers=2, num_attention_heads=2, attention_head_dim=8, ...` for a test-sized one)."""
    return build_denoiser("SD3Transformer2DModel", {**SD3_MEDIUM_TRANSFORMER_CONFIG, **overrides})


def embedded_scheduler_config(family: str = "flow", prediction_type: str | None = None) -> dict:
    """Scheduler config of the embedded model (a dict with `_class_name`).

    flow: `FlowMatchEulerDiscreteScheduler(shift=1)` (velocity prediction). vp: `DDIMScheduler` with the cosine
    (`squaredcos_cap_v2`) betas, trailing spacing, `prediction_type` `"v_prediction"` (default) or `"epsilon"`."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if family == "flow":
        if prediction_type not in (None, "velocity", "flow", "flow_prediction"):
            raise ValueError(f"prediction_type={prediction_type!r}: the flow family predicts velocity; pass None")
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    elif family == "vp":
        if prediction_type not in (None, "v_prediction", "epsilon"):
            raise ValueError(f"prediction_type={prediction_type!r}: choose 'v_prediction' or 'epsilon' for vp")
        sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                              prediction_type=prediction_type or "v_prediction", clip_sample=False,
                              set_alpha_to_one=True, timestep_spacing="trailing")
    else:
        raise ValueError(f"family={family!r}: choose 'flow' or 'vp'")
    config = {k: v for k, v in dict(sched.config).items() if k != "_use_default_values"}
    return {**config, "_class_name": type(sched).__name__}


def build_embedded_model(
    resolution: int = 16,
    family: str = "flow",
    prediction_type: str | None = None,
    channels: int = 1,
    text_hidden: int = 64,
    block_channels: tuple[int, ...] = (16, 32, 64),
    attention_levels: tuple[bool, ...] | None = None,
    max_length: int = 16,
    vocabulary: list[str] | None = None,
    seed: int = 0,
) -> DiffusionModel:
    """The tiny text-conditional base model of the embedded default (randomly initialised).

    A `UNet2DConditionModel` on `[channels, resolution, resolution]` pixels (no VAE), cross-attending to a
    2-layer `CLIPTextModel` (width `text_hidden`) over a word tokenizer of `vocabulary` (default:
    `lit_distill.data.embedded.embedded_vocabulary()`). `attention_levels[i]` puts cross-attention in level i
    (default: all but the first, full-resolution level). Heads have 16 channels.

    The default (16, 32, 64) has 1.06M denoiser parameters (+0.1M text encoder); docs/models_and_data.md says
    how well it learns the digits and what a wider one costs.
    """
    if resolution % 2 ** (len(block_channels) - 1):
        raise ValueError(f"resolution={resolution} must be divisible by 2**{len(block_channels) - 1} "
                         f"for block_channels={block_channels}")
    attention_levels = attention_levels or (False,) + (True,) * (len(block_channels) - 1)
    if len(attention_levels) != len(block_channels):
        raise ValueError(f"attention_levels has {len(attention_levels)} entries, block_channels {len(block_channels)}")
    if vocabulary is None:
        from lit_distill.data.embedded import embedded_vocabulary
        vocabulary = embedded_vocabulary()
    scheduler_config = embedded_scheduler_config(family, prediction_type)
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels))
    groups = math.gcd(8, *block_channels)  # GroupNorm groups must divide every width
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_word_tokenizer(vocabulary, max_length=max_length)
        text_encoder = build_text_encoder(len(tokenizer), hidden_size=text_hidden, max_length=max_length,
                                          heads=max(1, text_hidden // 16))
        net = build_denoiser("UNet2DConditionModel", dict(
            sample_size=resolution, in_channels=channels, out_channels=channels,
            down_block_types=down, up_block_types=up, block_out_channels=tuple(block_channels),
            layers_per_block=1, cross_attention_dim=text_hidden, norm_num_groups=groups,
            attention_head_dim=tuple(max(1, c // 16) for c in block_channels),
        ))
    return DiffusionModel(net, scheduler_config, (channels, resolution, resolution),
                          text_encoder=text_encoder, tokenizer=tokenizer)

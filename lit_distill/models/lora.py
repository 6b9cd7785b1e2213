"""LoRA on diffusers denoisers through their PEFT integration (`net.add_adapter(LoraConfig)`).

Saved adapters use the diffusers pipeline format: `pytorch_lora_weights.safetensors` with keys prefixed by
`unet.` or `transformer.` and the `LoraConfig` in the safetensors metadata, so
`pipe.load_lora_weights(dir)` (or `net.load_lora_adapter(dir, prefix="unet")`) restores the same adapter.
Every function also accepts a `DiffusionModel` (its `.net` is used).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
JOINT_ATTENTION = ATTENTION + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
DEFAULT_TARGET_MODULES = {
    "UNet2DModel": ATTENTION,
    "UNet2DConditionModel": ATTENTION,
    "SD3Transformer2DModel": JOINT_ATTENTION,
    "FluxTransformer2DModel": JOINT_ATTENTION,
}


def _net(net: nn.Module) -> nn.Module:
    from .diffusion_model import DiffusionModel

    return net.net if isinstance(net, DiffusionModel) else net


def lora_prefix(net: nn.Module) -> str:
    """`"unet"` or `"transformer"`: the key prefix of the net in a pipeline's LoRA file."""
    return "unet" if type(_net(net)).__name__.startswith("UNet") else "transformer"


def add_lora(net: nn.Module, rank: int = 4, alpha: float | None = None, target_modules: list[str] | None = None,
             dropout: float = 0.0, adapter_name: str = "default") -> nn.Module:
    """Add a LoRA adapter (`B = 0` at init, so the output is unchanged) and make *only* LoRA weights trainable.

    `alpha` defaults to `rank` (scale 1). `target_modules` defaults per class (`DEFAULT_TARGET_MODULES`):
    the attention projections, plus the context-stream projections for joint-attention transformers.
    Given a `DiffusionModel`, its text encoders and VAE are frozen too. Returns the (modified in place) net."""
    from peft import LoraConfig

    owner, net = net, _net(net)
    if target_modules is None:
        target_modules = DEFAULT_TARGET_MODULES.get(type(net).__name__, ATTENTION)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                        target_modules=list(target_modules), init_lora_weights="gaussian")
    net.add_adapter(config, adapter_name=adapter_name)
    for name, p in owner.named_parameters():
        p.requires_grad_("lora_" in name)
    return net


def lora_state_dict(net: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights in PEFT naming (`...to_q.lora_A.weight`), without prefix."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(_net(net), adapter_name=adapter_name)


def save_lora(net: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> str:
    """Write `path/pytorch_lora_weights.safetensors` (prefixed keys + LoraConfig metadata); returns the file."""
    from diffusers.loaders.lora_base import LoraBaseMixin

    net = _net(net)
    prefix = lora_prefix(net)
    metadata = {f"{prefix}.{k}": v for k, v in net.peft_config[adapter_name].to_dict().items()}
    state = LoraBaseMixin.pack_weights({k: v.detach().contiguous() for k, v in
                                        lora_state_dict(net, adapter_name).items()}, prefix)
    LoraBaseMixin.write_lora_layers(state, str(path), is_main_process=True, weight_name=None, save_function=None,
                                    safe_serialization=True, lora_adapter_metadata=metadata)
    return os.path.join(str(path), "pytorch_lora_weights.safetensors")


@contextmanager
def lora_disabled(net: nn.Module) -> Iterator[nn.Module]:
    """Run the net without its adapters (the frozen base model, e.g. the KL reference) inside the block.

    Restores the adapters and every parameter's `requires_grad` on exit."""
    net = _net(net)
    flags = [(p, p.requires_grad) for p in net.parameters()]
    net.disable_adapters()
    try:
        yield net
    finally:
        net.enable_adapters()
        for p, flag in flags:
            p.requires_grad_(flag)


def merge_lora(net: nn.Module) -> nn.Module:
    """Fold the active adapters into the base weights and remove the LoRA layers (for export); in place."""
    net = _net(net)
    net.fuse_lora()
    net.unload_lora()
    return net

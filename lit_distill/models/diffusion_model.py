"""`DiffusionModel`: one diffusion model = denoiser net + schedule + (optional) prompt encoder + (optional) VAE.

It is the `Denoiser` callable of docs/architecture.md (`model(x_t, timestep, cond) -> prediction`) and knows
how to turn prompts into `cond`, latents into images, and how to load/save itself as a diffusers pipeline
directory::

    path/
      model_index.json            optional on load; written on save
      unet/ or transformer/       the denoiser (class from config.json `_class_name`)
      scheduler/scheduler_config.json
      vae/                        optional (latent models)
      text_encoder/ tokenizer/    optional; text_encoder_2/3 and tokenizer_2/3 for SD3
      lit_distill.json            optional: {"sample_shape": [C, H, W], "max_sequence_length": int}

Prompt encodings (the `cond` dict):
- one CLIP-like text encoder (SD 1.x/2.x, the embedded model): `{"encoder_hidden_states": [B, L, D]}`.
- SD3 (two `CLIPTextModelWithProjection` + optional T5), exactly as `StableDiffusion3Pipeline.encode_prompt`:
  `{"encoder_hidden_states": [B, L_clip + L_t5, D_t5], "pooled_projections": [B, P1 + P2]}`.
Other text stacks (SDXL, FLUX) need their own `encode_prompts` (and FLUX a latent-packing `forward`):
subclass and override those two methods.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import shutil
import tempfile
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lit_distill.diffusion.schedules import schedule_from_scheduler_config
from lit_distill.models.compilation import drop_compiled

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
EXTRA_CONFIG = "lit_distill.json"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"


def _scheduler_config_dict(config: Any) -> dict:
    """A plain dict with `_class_name` from a scheduler, its `.config`, or a dict."""
    if hasattr(config, "config") and hasattr(config, "set_timesteps"):  # a scheduler object
        config = {**dict(config.config), "_class_name": type(config).__name__}
    config = {k: v for k, v in dict(config).items() if k != "_use_default_values"}
    if "_class_name" not in config:
        raise ValueError(
            "scheduler_config has no '_class_name': pass `{**scheduler.config, '_class_name': "
            "type(scheduler).__name__}` or the dict of scheduler/scheduler_config.json"
        )
    return config


def _module_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def warn_truncated_prompts(tokenizer, prompts: list[str], max_length: int) -> None:
    """Warn (once per prompt) about each prompt longer than ``max_length`` tokens: its tail is cut off, so the model
    never sees it, while rewards and metadata still describe the whole prompt."""
    fast = getattr(tokenizer, "is_fast", False)
    encoded = tokenizer(prompts, verbose=False, return_offsets_mapping=fast)
    for i, (prompt, ids) in enumerate(zip(prompts, encoded["input_ids"])):
        if len(ids) <= max_length:
            continue
        # the first token dropped is at max_length - 1 (the last kept place holds the end-of-text token)
        lost = prompt[encoded["offset_mapping"][i][max_length - 1][0]:] if fast else \
            tokenizer.decode(ids[max_length - 1:], skip_special_tokens=True)
        warnings.warn(f"prompt {prompt[:60]!r}{'...' if len(prompt) > 60 else ''} is {len(ids)} tokens long, but the "
                      f"text encoder reads {max_length}: the rest ({lost[:80]!r}) is cut off and never seen by the "
                      "model, while rewards still score the whole prompt and its metadata. Shorten the prompt or "
                      "put what matters (e.g. the digit) first.", stacklevel=3)


def _module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class DiffusionModel(nn.Module):
    """A denoiser with everything needed to sample and train it.

    Args:
        net: a diffusers denoiser (`UNet2DModel`, `UNet2DConditionModel`, `SD3Transformer2DModel`, ...)
            called as `net(x_t, timestep=t, **cond, return_dict=False)[0]`.
        scheduler_config: a diffusers scheduler config (dict with `_class_name`) or a scheduler;
            `self.schedule = schedule_from_scheduler_config(scheduler_config)`.
        sample_shape: `(C, H, W)` of what `net` denoises (latents when a VAE is present).
        vae: optional `AutoencoderKL`-like model; latents are `(vae_latent - shift_factor) * scaling_factor`.
        text_encoder, tokenizer (+ `_2`, `_3`): optional prompt encoder(s), see the module docstring.
        max_sequence_length: T5 token length for SD3 (default `min(256, tokenizer_3.model_max_length)`,
            256 being `StableDiffusion3Pipeline`'s default).
    """

    def __init__(
        self,
        net: nn.Module,
        scheduler_config: dict | Any,
        sample_shape: tuple[int, int, int],
        *,
        vae: nn.Module | None = None,
        text_encoder: nn.Module | None = None,
        tokenizer: Any = None,
        text_encoder_2: nn.Module | None = None,
        tokenizer_2: Any = None,
        text_encoder_3: nn.Module | None = None,
        tokenizer_3: Any = None,
        max_sequence_length: int | None = None,
    ):
        super().__init__()
        if len(tuple(sample_shape)) != 3:
            raise ValueError(f"sample_shape must be (C, H, W), got {sample_shape!r}")
        self.net = net
        self.scheduler_config = _scheduler_config_dict(scheduler_config)
        self.schedule = schedule_from_scheduler_config(self.scheduler_config)
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.vae = vae
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = text_encoder, text_encoder_2, text_encoder_3
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizer, tokenizer_2, tokenizer_3
        for enc, tok in zip(TEXT_ENCODERS, TOKENIZERS):
            if (getattr(self, enc) is None) != (getattr(self, tok) is None):
                raise ValueError(f"{enc} and {tok} must be given together (got only one of them)")
        if max_sequence_length is None and tokenizer_3 is not None:
            max_sequence_length = min(256, int(tokenizer_3.model_max_length))
        self.max_sequence_length = max_sequence_length
        self._null_cache: dict[tuple, dict[str, Tensor]] = {}

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return _module_device(self.net)

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the denoiser's parameters (inputs are cast to it in `forward`)."""
        return _module_dtype(self.net)

    @property
    def denoiser_folder(self) -> str:
        """`"unet"` for UNet classes, else `"transformer"` (the diffusers pipeline folder name)."""
        return "unet" if type(self.net).__name__.startswith("UNet") else "transformer"

    @property
    def has_text(self) -> bool:
        return self.text_encoder is not None

    # ------------------------------------------------------------------ denoiser
    def forward(self, x_t: Tensor, timestep: Tensor, cond: dict[str, Tensor] | None = None) -> Tensor:
        """Prediction `[B, C, H, W]` (of `schedule.prediction_type`, in `x_t`'s dtype) for `x_t [B, C, H, W]`
        at model timesteps `timestep [B]` (a scalar is broadcast) with `cond` the net's keyword arguments."""
        dtype = self.dtype
        if timestep.ndim == 0:
            timestep = timestep.expand(x_t.shape[0])
        cond = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in (cond or {}).items()}
        out = self.net(x_t.to(dtype), timestep=timestep, **cond, return_dict=False)[0]
        return out.to(x_t.dtype)

    # ------------------------------------------------------------------ prompts
    def _tokens(self, tokenizer, prompts: list[str], max_length: int, device) -> Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        warn_truncated_prompts(tokenizer, prompts, max_length)
        return ids.input_ids.to(device)

    def _text_trainable(self) -> bool:
        return any(p.requires_grad for n in TEXT_ENCODERS if getattr(self, n) is not None
                   for p in getattr(self, n).parameters())

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor] | None:
        """`cond` for `prompts` (see the module docstring for the keys); None when there is no text encoder.
        Tensors are on the text encoder's device and in its dtype, batched as `prompts`."""
        if self.text_encoder is None:
            return None
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings, got a single str; wrap it in a list")
        with nullcontext() if self._text_trainable() else torch.no_grad():
            if self.text_encoder_2 is None:
                return self._encode_clip(list(prompts))
            return self._encode_sd3(list(prompts))

    def _encode_clip(self, prompts: list[str]) -> dict[str, Tensor]:
        enc, tok = self.text_encoder, self.tokenizer
        ids = self._tokens(tok, prompts, tok.model_max_length, _module_device(enc))
        return {"encoder_hidden_states": enc(ids, return_dict=True).last_hidden_state}

    def _encode_sd3(self, prompts: list[str]) -> dict[str, Tensor]:
        """As `StableDiffusion3Pipeline.encode_prompt` (clip_skip=None, one image per prompt)."""
        hidden, pooled = [], []
        max_len = self.tokenizer.model_max_length  # the pipeline uses tokenizer 1's length for both CLIPs
        for enc, tok in ((self.text_encoder, self.tokenizer), (self.text_encoder_2, self.tokenizer_2)):
            out = enc(self._tokens(tok, prompts, max_len, _module_device(enc)), output_hidden_states=True)
            hidden.append(out.hidden_states[-2].to(_module_dtype(self.text_encoder)))  # penultimate layer
            pooled.append(out[0])  # text_embeds (the projection) of CLIPTextModelWithProjection
        clip = torch.cat(hidden, dim=-1)
        if self.text_encoder_3 is not None:
            enc = self.text_encoder_3
            ids = self._tokens(self.tokenizer_3, prompts, self.max_sequence_length, _module_device(enc))
            t5 = enc(ids)[0]
        else:
            length = self.max_sequence_length or 256
            t5 = clip.new_zeros(len(prompts), length, self.net.config.joint_attention_dim)
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5.to(clip.device)], dim=-2),
                "pooled_projections": torch.cat(pooled, dim=-1)}

    def null_cond(self, batch_size: int) -> dict[str, Tensor] | None:
        """The encoding of the empty prompt, repeated to `batch_size` (for classifier-free guidance).

        Cached per (device, dtype) of the text encoder while it is frozen (no parameter requires grad);
        recomputed on every call (with grad) while it is being trained."""
        if self.text_encoder is None:
            return None
        if self._text_trainable():
            enc = self.encode_prompts([""])
        else:
            key = (_module_device(self.text_encoder), _module_dtype(self.text_encoder))
            if key not in self._null_cache:
                self._null_cache[key] = self.encode_prompts([""])
            enc = self._null_cache[key]
        return {k: v.repeat(batch_size, *([1] * (v.ndim - 1))) for k, v in enc.items()}

    def _load_from_state_dict(self, *args, **kwargs):
        self._null_cache.clear()  # new weights (checkpoint restore): the cached empty-prompt encoding is stale
        super()._load_from_state_dict(*args, **kwargs)

    # ------------------------------------------------------------------ latents <-> images
    def _vae_factors(self) -> tuple[float, float]:
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None)
        return float(cfg.scaling_factor), float(shift or 0.0)

    def decode(self, x: Tensor, clamp: bool = True) -> Tensor:
        """Images `[B, 3 or C, H', W']` in `[-1, 1]` (clamped when `clamp`) from samples `x [B, *sample_shape]`.
        Identity (then clamp) without a VAE; else `vae.decode(x / scaling_factor + shift_factor)`."""
        if self.vae is not None:
            scale, shift = self._vae_factors()
            z = (x / scale + shift).to(_module_dtype(self.vae))
            x = self.vae.decode(z, return_dict=False)[0].to(x.dtype)
        return x.clamp(-1, 1) if clamp else x

    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Samples `[B, *sample_shape]` from images `[B, C, H, W]` in `[-1, 1]`: identity without a VAE; else
        `(z - shift_factor) * scaling_factor` with `z` the latent mean, or a sample when `generator` is given."""
        if self.vae is None:
            return images
        scale, shift = self._vae_factors()
        dist = self.vae.encode(images.to(_module_dtype(self.vae))).latent_dist
        z = dist.mean if generator is None else dist.sample(generator)
        return ((z - shift) * scale).to(images.dtype)

    # ------------------------------------------------------------------ frozen copies
    def freeze_(self) -> "DiffusionModel":
        """In place: no parameter requires grad, eval mode. Returns self."""
        self.requires_grad_(False)
        return self.eval()

    def copy_frozen(self, dtype: torch.dtype | None = None) -> "DiffusionModel":
        """A frozen copy (eval, requires_grad False) of the denoiser, cast to `dtype` if given.

        The VAE, text encoders and tokenizers are *shared* with `self`, not copied (they are frozen
        everywhere in lit_distill); `forward` casts inputs to the copy's dtype, so a bf16 copy is a drop-in
        frozen teacher/reference."""
        shared = [getattr(self, n) for n in ("vae",) + TEXT_ENCODERS + TOKENIZERS if getattr(self, n) is not None]
        new = copy.deepcopy(self, memo={id(m): m for m in shared})
        drop_compiled(new.net)  # a compiled copy would run the original's weights
        new._null_cache = dict(self._null_cache)
        new.net.requires_grad_(False)
        new.net.eval()
        new.training = False
        if dtype is not None:
            nn.Module.to(new.net, dtype)  # (ModelMixin.to warns about fp32-kept modules; the embedded nets have none)
        return new

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, torch_dtype: torch.dtype | None = None,
                        subfolder: str | None = None, **kwargs) -> "DiffusionModel":
        """Load a diffusers-pipeline-style directory (layout in the module docstring). Only local paths.

        Raises FileNotFoundError (naming `path`) when the directory, its denoiser folder (`unet/` or
        `transformer/`) or `scheduler/scheduler_config.json` is missing. `kwargs` go to `__init__`."""
        root = Path(path) / subfolder if subfolder else Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"path={str(root)!r} is not a directory: expected a diffusers pipeline "
                                    "directory (unet/ or transformer/, scheduler/, optional vae/ and text_encoder/)")
        index = json.loads((root / "model_index.json").read_text()) if (root / "model_index.json").is_file() else {}
        folder = next((f for f in ("unet", "transformer") if (root / f / "config.json").is_file()), None)
        if folder is None:
            raise FileNotFoundError(f"path={str(root)!r} has no denoiser: expected a subfolder 'unet/' or "
                                    "'transformer/' with a config.json (a diffusers model saved by save_pretrained)")
        if not (root / SCHEDULER_CONFIG).is_file():
            raise FileNotFoundError(f"path={str(root)!r} has no {SCHEDULER_CONFIG}: save the scheduler with "
                                    "scheduler.save_pretrained(path / 'scheduler')")
        extra = json.loads((root / EXTRA_CONFIG).read_text()) if (root / EXTRA_CONFIG).is_file() else {}
        parts = {name: _load_component(root, name, index.get(name), torch_dtype)
                 for name in ("vae",) + TEXT_ENCODERS + TOKENIZERS}
        net = _load_component(root, folder, index.get(folder), torch_dtype)
        scheduler_config = json.loads((root / SCHEDULER_CONFIG).read_text())
        sample_shape = extra.get("sample_shape") or _infer_sample_shape(net, root)
        kwargs.setdefault("max_sequence_length", extra.get("max_sequence_length"))
        return cls(net, scheduler_config, sample_shape, **parts, **kwargs)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the pipeline layout to `path`, atomically: everything goes to a temporary directory next
        to `path`, which then replaces it. Denoisers with LoRA adapters must be merged first (`merge_lora`)."""
        if getattr(self.net, "peft_config", None):
            raise ValueError("net has LoRA adapters: call lit_distill.models.lora.merge_lora(model.net) before "
                             "save_pretrained, or save only the adapter with save_lora(net, path)")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            index = {"_class_name": self._pipeline_class_name()}
            try:
                import diffusers
                index["_diffusers_version"] = diffusers.__version__
            except ImportError:  # pragma: no cover
                pass
            for name in (self.denoiser_folder, "vae") + TEXT_ENCODERS + TOKENIZERS:
                comp = self.net if name == self.denoiser_folder else getattr(self, name)
                if comp is None:
                    continue
                comp.save_pretrained(tmp / name)
                lib = "diffusers" if type(comp).__module__.startswith("diffusers") else "transformers"
                index[name] = [lib, type(comp).__name__]
            (tmp / "scheduler").mkdir()
            (tmp / SCHEDULER_CONFIG).write_text(json.dumps(self.scheduler_config, indent=2, sort_keys=True))
            index["scheduler"] = ["diffusers", self.scheduler_config["_class_name"]]
            if index["_class_name"] == "StableDiffusionPipeline":
                index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
            extra = {"sample_shape": list(self.sample_shape)}
            if self.max_sequence_length is not None:
                extra["max_sequence_length"] = self.max_sequence_length
            (tmp / EXTRA_CONFIG).write_text(json.dumps(extra, indent=2))
            os.chmod(tmp, 0o755)
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
                os.replace(path, old / path.name)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _pipeline_class_name(self) -> str:
        name = type(self.net).__name__
        if name == "UNet2DConditionModel" and self.vae is not None and self.text_encoder is not None \
                and self.text_encoder_2 is None:
            return "StableDiffusionPipeline"
        if name == "SD3Transformer2DModel" and self.vae is not None and self.text_encoder_2 is not None:
            return "StableDiffusion3Pipeline"
        return "LitDistillDiffusionModel"  # not loadable by DiffusionPipeline (no VAE or unusual parts)


def _load_component(root: Path, name: str, index_entry, torch_dtype):
    """Load `root/name` (None when absent); the class comes from model_index.json, else the folder's configs."""
    folder = root / name
    if not folder.is_dir() or (index_entry is not None and index_entry[0] is None):
        return None
    if name.startswith("tokenizer"):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    if index_entry is not None:
        lib, cls_name = index_entry
    elif "_class_name" in config:
        lib, cls_name = "diffusers", config["_class_name"]
    else:
        lib, cls_name = "transformers", config["architectures"][0]
    model_cls = getattr(importlib.import_module(lib), cls_name)
    if torch_dtype is None:
        return model_cls.from_pretrained(str(folder))
    dtype_key = "torch_dtype" if lib == "diffusers" else "dtype"  # transformers 5 renamed it
    return model_cls.from_pretrained(str(folder), **{dtype_key: torch_dtype})


def _infer_sample_shape(net: nn.Module, root: Path) -> tuple[int, int, int]:
    cfg = net.config
    size = getattr(cfg, "sample_size", None)
    if size is None or getattr(cfg, "in_channels", None) is None:
        raise ValueError(f"sample_shape: cannot infer it from {type(net).__name__}'s config (no in_channels/"
                         f"sample_size); write {{'sample_shape': [C, H, W]}} to {root / EXTRA_CONFIG}")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(cfg.in_channels), int(h), int(w)

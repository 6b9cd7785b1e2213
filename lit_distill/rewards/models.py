"""Adapters for learned reward models loaded from a LOCAL directory (never a hub id).

Each adapter takes ``path``: a directory written by ``save_pretrained`` (transformers format) with
the model, its tokenizer and its image-processor config (``processor_config.json`` or
``preprocessor_config.json``; without one, CLIP defaults are used). Images ``[B, C, H, W]`` in
``[-1, 1]`` are preprocessed on their device, differentiably: grey -> RGB, resize (the processor's
resample, antialiased) and center crop to the model's input size, normalise with the processor's
mean/std. Scores are float32 ``[B]``; ``differentiable = True`` for all adapters.

=================  ===========================================  =============================
name               score                                        on disk (``path``)
=================  ===========================================  =============================
``clip_score``     ``100 * cos(img, txt)`` (torchmetrics)       CLIPModel dir
``pickscore``      ``logit_scale.exp() * cos(img, txt)``        PickScore CLIPModel dir
``hpsv2``          ``cos(img, txt)`` (HPSv2's img_score)        CLIPModel dir with HPS weights
``laion_aesthetic`` MLP(normalised CLIP image embedding)        CLIP dir + MLP head file
``image_reward``   ``(MLP(BLIP ITM [CLS]) - mean) / std``       BlipForImageTextRetrieval dir + head
=================  ===========================================  =============================
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_distill.rewards.base import Reward, register_reward

__all__ = ["ImagePreprocess", "PreferenceMLP", "ClipScore", "PickScore", "HPSv2", "LaionAesthetic", "ImageReward"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL enum values -> F.interpolate modes


def check_model_dir(path: Any, reward: str, needs: str) -> Path:
    """``Path(path)`` if it is an existing local directory, else ``FileNotFoundError`` naming ``path``."""
    if path is None or not Path(str(path)).expanduser().is_dir():
        raise FileNotFoundError(
            f"{reward}: path={path!r} is not a local directory. Pass path=<directory> holding {needs}. "
            "Hub ids are never downloaded: fetch the model yourself and save it with save_pretrained."
        )
    return Path(str(path)).expanduser()


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


class ImagePreprocess(nn.Module):
    """``[B, C, H, W]`` in ``[-1, 1]`` (C = 1 or 3) -> normalised ``pixel_values [B, 3, h, w]``.

    Mirrors a transformers image processor on-device: resize (shortest edge to ``shortest_edge``,
    or to ``(height, width)``), center crop to ``crop``, ``(x01 - mean) / std``. Differentiable.
    """

    def __init__(self, shortest_edge: int | None, resize_hw: tuple[int, int] | None, crop: tuple[int, int] | None,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD, mode: str = "bicubic"):
        super().__init__()
        self.shortest_edge, self.resize_hw, self.crop, self.mode = shortest_edge, resize_hw, crop, mode
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    @classmethod
    def from_dir(cls, path: Path, default_size: int) -> "ImagePreprocess":
        """From the image-processor config in ``path``; CLIP defaults at ``default_size`` without one."""
        try:
            from transformers import AutoImageProcessor

            ip = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError):
            return cls(None, (default_size, default_size), None)
        size, crop = _get(ip, "size"), _get(ip, "crop_size")
        edge = _get(size, "shortest_edge") if size is not None and _get(ip, "do_resize") is not False else None
        hw = (_get(size, "height"), _get(size, "width")) if size is not None and _get(size, "height") else None
        if edge is None and hw is None:
            hw = (default_size, default_size)
        crop_hw = (_get(crop, "height"), _get(crop, "width")) if crop is not None and _get(ip, "do_center_crop") else None
        mode = _RESAMPLE.get(int(_get(ip, "resample") or 3), "bicubic")
        return cls(edge, hw, crop_hw, _get(ip, "image_mean") or CLIP_MEAN, _get(ip, "image_std") or CLIP_STD, mode)

    def forward(self, images: Tensor) -> Tensor:
        x = ((images.float() + 1.0) * 0.5).clamp(0.0, 1.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        if self.shortest_edge:
            s = self.shortest_edge
            size = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        else:
            size = self.resize_hw
        if tuple(size) != (h, w):
            kw = {} if self.mode == "nearest" else {"align_corners": False, "antialias": True}
            x = F.interpolate(x, size=tuple(size), mode=self.mode, **kw).clamp(0.0, 1.0)
        if self.crop:
            (ch, cw), (h, w) = self.crop, x.shape[-2:]
            top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
            x = x[..., top : top + ch, left : left + cw]
        return (x - self.mean) / self.std


def _pooled(out: Any) -> Tensor:
    """Projected embeddings from ``get_*_features`` (a tensor in transformers 4, an output in 5)."""
    if isinstance(out, Tensor):
        return out
    for key in ("image_embeds", "text_embeds", "pooler_output"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    raise TypeError(f"cannot find embeddings in {type(out).__name__}")


def _tokenize(tokenizer: Any, prompts: Sequence[str], max_length: int, device: torch.device) -> dict[str, Tensor]:
    enc = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}


class _ClipSimilarity(Reward):
    """``scale * cos(image_embedding, text_embedding)`` with a transformers ``CLIPModel`` from ``path``."""

    differentiable = True
    needs = "a transformers CLIPModel (config.json + weights) with its tokenizer and image-processor config"

    def __init__(self, path: str, max_length: int | None = None):
        super().__init__()
        from transformers import AutoTokenizer, CLIPModel

        d = check_model_dir(path, self.name, self.needs)
        self.model = CLIPModel.from_pretrained(str(d), local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        self.preprocess = ImagePreprocess.from_dir(d, self.model.config.vision_config.image_size)
        self.max_length = max_length or self.model.config.text_config.max_position_embeddings
        self.freeze()

    def scale(self) -> Tensor | float:
        return 1.0

    def cosine(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """``cos(image_emb, text_emb)`` per row, ``[B]`` float32. Each distinct prompt is encoded once."""
        uniq = list(dict.fromkeys(prompts))
        txt = _pooled(self.model.get_text_features(**_tokenize(self.tokenizer, uniq, self.max_length, images.device)))
        txt = F.normalize(txt.float(), dim=-1)[torch.tensor([uniq.index(p) for p in prompts], device=images.device)]
        px = self.preprocess(images).to(self.model.dtype)
        img = F.normalize(_pooled(self.model.get_image_features(pixel_values=px)).float(), dim=-1)
        return (img * txt).sum(-1)

    def forward(self, images: Tensor, prompts: Sequence[str], tasks: Sequence[str], **metadata: Any) -> Tensor:
        return self.scale() * self.cosine(images, prompts)


@register_reward("clip_score")
class ClipScore(_ClipSimilarity):
    """CLIPScore as torchmetrics: ``100 * cos(E_img, E_txt)``, range ``[-100, 100]``, ``max_value = 100``.

    torchmetrics clamps the batch mean at 0; here ``clamp=True`` clamps each row at 0 (off by default,
    since a clamp hides the gradient of bad samples).
    """

    max_value = 100.0

    def __init__(self, path: str, max_length: int | None = None, clamp: bool = False):
        super().__init__(path, max_length)
        self.clamp = clamp

    def forward(self, images: Tensor, prompts: Sequence[str], tasks: Sequence[str], **metadata: Any) -> Tensor:
        s = 100.0 * self.cosine(images, prompts)
        return s.clamp_min(0.0) if self.clamp else s


@register_reward("pickscore")
class PickScore(_ClipSimilarity):
    """PickScore (Kirstain et al. 2023): ``logit_scale.exp() * cos(E_img, E_txt)`` with the PickScore
    CLIP-H weights (``yuvalkirstain/PickScore_v1`` + the ``laion/CLIP-ViT-H-14`` processor, saved
    locally). ``max_value = logit_scale.exp()`` (about 100); typical values 18-24."""

    def __init__(self, path: str, max_length: int | None = None):
        super().__init__(path, max_length)
        self.max_value = self.model.logit_scale.detach().exp().item()

    def scale(self) -> Tensor:
        return self.model.logit_scale.exp().float()


@register_reward("hpsv2")
class HPSv2(_ClipSimilarity):
    """HPSv2 (Wu et al. 2023): ``cos(E_img, E_txt)`` (the diagonal of ``image_features @ text_features.T``
    in HPSv2's ``img_score.py``; no logit scale), ``max_value = 1``; typical values 0.2-0.3.

    HPSv2 ships an open_clip ViT-H-14 state dict: convert it to a transformers ``CLIPModel`` dir
    (config of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, keys renamed open_clip -> transformers; no
    converter ships here)
    with that model's tokenizer and processor config, and pass the dir as ``path``.
    """

    max_value = 1.0


class PreferenceMLP(nn.Module):
    """The head of the LAION improved-aesthetic-predictor and of ImageReward (no activations, as in
    both originals): Linear(d0, d1) Dropout(.2) Linear(d1, d2) Dropout(.2) Linear(d2, d3) Dropout(.1)
    Linear(d3, d4) Linear(d4, 1), dims ``(768, 1024, 128, 64, 16)``. ``[B, d0] -> [B, 1]``."""

    def __init__(self, dims: Sequence[int] = (768, 1024, 128, 64, 16)):
        super().__init__()
        d = list(dims)
        self.layers = nn.Sequential(
            nn.Linear(d[0], d[1]), nn.Dropout(0.2), nn.Linear(d[1], d[2]), nn.Dropout(0.2),
            nn.Linear(d[2], d[3]), nn.Dropout(0.1), nn.Linear(d[3], d[4]), nn.Linear(d[4], 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)

    @classmethod
    def from_file(cls, file: Path) -> "PreferenceMLP":
        """Load ``layers.{0,2,4,6,7}.{weight,bias}`` from ``.safetensors`` / ``.pt`` / ``.pth`` (keys may
        carry an ``mlp.`` prefix, e.g. the full ``ImageReward.pt``); dims are read from the shapes."""
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(file))
        else:
            sd = torch.load(str(file), map_location="cpu", weights_only=True)
            sd = sd.get("state_dict", sd)
        sd = {k.split("mlp.", 1)[-1] if k.startswith(("mlp.", "module.mlp.")) else k: v for k, v in sd.items()}
        sd = {k: v for k, v in sd.items() if k.startswith("layers.")}
        if "layers.0.weight" not in sd:
            raise ValueError(f"head: {file} has no 'layers.0.weight'; expected the MLP state dict (layers.0/2/4/6/7)")
        dims = [sd["layers.0.weight"].shape[1]] + [sd[f"layers.{i}.weight"].shape[0] for i in (0, 2, 4, 6)]
        mlp = cls(dims)
        mlp.load_state_dict(sd)
        return mlp


def _find_head(d: Path, head: str | None, defaults: Sequence[str], reward: str) -> Path:
    if head:
        cands = [Path(head).expanduser() if Path(head).expanduser().is_absolute() else d / head]
    else:
        cands = [d / f for f in defaults]
    for c in cands:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"{reward}: head={head!r}: no MLP head file found (looked for {[str(c) for c in cands]}); "
        f"put the head weights in the model dir or pass head=<file>"
    )


@register_reward("laion_aesthetic")
class LaionAesthetic(Reward):
    """LAION improved-aesthetic-predictor: ``MLP(E_img / |E_img|)`` on the CLIP ViT-L/14 image
    embedding. Rating scale 1-10 (``max_value = 10``, the top of the scale; the MLP is unbounded).

    ``path``: a transformers ``CLIPModel`` or ``CLIPVisionModelWithProjection`` dir (ViT-L/14 for the
    released head) with its image-processor config, plus the head: ``head`` (a file name in ``path``
    or an absolute path), default the first of ``aesthetic_head.safetensors``, ``aesthetic_head.pth``,
    ``sac+logos+ava1-l14-linearMSE.pth`` found in ``path``.
    """

    max_value = 10.0
    differentiable = True
    HEAD_FILES = ("aesthetic_head.safetensors", "aesthetic_head.pth", "sac+logos+ava1-l14-linearMSE.pth")

    def __init__(self, path: str, head: str | None = None):
        super().__init__()
        from transformers import AutoConfig, CLIPModel, CLIPVisionModelWithProjection

        d = check_model_dir(path, self.name, "a transformers CLIP (vision) model and the aesthetic MLP head file")
        self.full_clip = AutoConfig.from_pretrained(str(d), local_files_only=True).model_type == "clip"
        cls = CLIPModel if self.full_clip else CLIPVisionModelWithProjection
        self.model = cls.from_pretrained(str(d), local_files_only=True)
        vcfg = self.model.config.vision_config if self.full_clip else self.model.config
        self.preprocess = ImagePreprocess.from_dir(d, vcfg.image_size)
        self.head = PreferenceMLP.from_file(_find_head(d, head, self.HEAD_FILES, self.name))
        self.freeze()

    def image_embeddings(self, images: Tensor) -> Tensor:
        """L2-normalised CLIP image embeddings ``[B, D]``."""
        px = self.preprocess(images).to(self.model.dtype)
        emb = self.model.get_image_features(pixel_values=px) if self.full_clip else self.model(pixel_values=px)
        return F.normalize(_pooled(emb).float(), dim=-1)

    def forward(self, images: Tensor, prompts: Sequence[str], tasks: Sequence[str], **metadata: Any) -> Tensor:
        return self.head(self.image_embeddings(images)).squeeze(-1)


@register_reward("image_reward")
class ImageReward(Reward):
    """ImageReward (Xu et al. 2023): the BLIP text encoder reads the prompt with cross-attention to
    the image; its [CLS] state goes through the MLP head; ``(r - 0.16717) / 1.03334``. Unbounded
    (``max_value = None``; typical range -2..2). Prompts padded/truncated to 35 tokens, as the original.

    ``path``: a transformers ``BlipForImageTextRetrieval`` dir holding ImageReward's BLIP weights
    (ViT-L vision, BERT-base text with cross-attention; rename ``blip.visual_encoder.*`` ->
    ``vision_model.*`` and ``blip.text_encoder.*`` -> ``text_encoder.*`` as transformers'
    ``convert_blip_original_pytorch_to_hf.py`` does), its BERT tokenizer and an image-processor config (224, bicubic, CLIP
    mean/std), plus the head: ``head`` or the first of ``imagereward_head.safetensors``,
    ``imagereward_head.pth``, ``ImageReward.pt`` (the ``mlp.*`` keys are used).
    """

    max_value = None
    differentiable = True
    MEAN, STD = 0.16717362830052426, 1.0333394966054072
    HEAD_FILES = ("imagereward_head.safetensors", "imagereward_head.pth", "ImageReward.pt")

    def __init__(self, path: str, head: str | None = None, max_length: int = 35):
        super().__init__()
        from transformers import AutoTokenizer, BlipForImageTextRetrieval

        d = check_model_dir(path, self.name, "a transformers BlipForImageTextRetrieval model and the MLP head file")
        self.model = BlipForImageTextRetrieval.from_pretrained(str(d), local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        self.preprocess = ImagePreprocess.from_dir(d, self.model.config.vision_config.image_size)
        self.head = PreferenceMLP.from_file(_find_head(d, head, self.HEAD_FILES, self.name))
        self.max_length = max_length
        self.freeze()

    def forward(self, images: Tensor, prompts: Sequence[str], tasks: Sequence[str], **metadata: Any) -> Tensor:
        img = self.model.vision_model(pixel_values=self.preprocess(images).to(self.model.dtype)).last_hidden_state
        atts = torch.ones(img.shape[:-1], dtype=torch.long, device=img.device)
        txt = self.model.text_encoder(
            **_tokenize(self.tokenizer, prompts, self.max_length, images.device),
            encoder_hidden_states=img, encoder_attention_mask=atts,
        ).last_hidden_state[:, 0]
        return ((self.head(txt.float()).squeeze(-1) - self.MEAN) / self.STD).float()

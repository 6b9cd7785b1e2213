"""Rewards: built-ins by hand, registry and composition, and the model adapters on tiny random models."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lit_distill.rewards import (
    DigitCorrectness,
    Reward,
    build_reward,
    parse_digit,
    register_reward,
    validate_rewards,
)

CHARS = "abcdefghijklmnopqrstuvwxyz"
PROMPTS = ["a handwritten seven", "a cat", "a handwritten seven", "a bold digit two"]
TASKS = ["t"] * 4


def grid_images(b=4, c=1, size=32, seed=0) -> torch.Tensor:
    """Random images whose values are exact uint8 levels, so processors and our path see the same pixels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, size, size), generator=g).float() / 255 * 2 - 1


# ----------------------------------------------------------------------------- built-ins
def test_jpeg_constant_more_compressible_than_noise_and_by_hand():
    const = torch.zeros(1, 1, 32, 32)
    noise = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    comp, incomp = build_reward("jpeg_compressibility"), build_reward("jpeg_incompressibility")
    x = torch.cat([const, noise])
    rc, ri = comp(x, ["p"] * 2, ["t"] * 2), incomp(x, ["p"] * 2, ["t"] * 2)
    assert rc[0] > rc[1] and torch.equal(rc, -ri) and rc.dtype == torch.float32
    arr = ((noise[0, 0] + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    assert rc[1].item() == pytest.approx(-len(buf.getvalue()) / 1000)
    assert comp.max_value is not None and comp.max_value >= rc.max().item() - 1e-6  # set from the batch shape
    assert build_reward({"name": "jpeg_compressibility", "resolution": 32}).max_value == comp.max_value
    assert incomp.max_value is None


def test_brightness_by_hand():
    x = torch.full((3, 1, 4, 4), -1.0)
    x[1] = 1.0
    x[2, :, :2] = 1.0  # half ink
    r = build_reward({"name": "brightness", "target": 0.25})
    assert torch.allclose(r(x, ["p"] * 3, ["t"] * 3), torch.tensor([-0.25, -0.75, -0.25]))
    assert r.max_value == 0.0
    with pytest.raises(ValueError, match="target"):
        build_reward({"name": "brightness", "target": 2.0})


def test_slant_by_hand_and_differentiable():
    """Two ink pixels one row apart, the upper one ``d`` columns to the right: slant = d (pixels per row)."""
    x = torch.full((3, 1, 6, 6), -1.0)
    x[0, 0, 2, 3], x[0, 0, 3, 3] = 1.0, 1.0  # upright
    x[1, 0, 2, 3], x[1, 0, 3, 2] = 1.0, 1.0  # top one column right: slant 1
    x[2, 0, 2, 2], x[2, 0, 3, 3] = 1.0, 1.0  # top one column left: slant -1
    r = build_reward({"name": "slant", "target": 0.7})
    # mu02 = 0.25 is below the floor of 0.5 pixels^2, so slant = -mu11 / 0.5 = d / 2 for these two-pixel shapes
    torch.testing.assert_close(r(x, ["p"] * 3, ["t"] * 3), torch.tensor([-0.7, -0.2, -1.2]))
    tall = torch.full((1, 1, 8, 8), -1.0)
    for row in range(1, 7):
        tall[0, 0, row, 2 + (6 - row) // 2] = 1.0  # a stroke shifting right by 1/2 pixel per row upwards
    from lit_distill.utils.images import slant
    assert abs(float(slant(tall)) - 0.5) < 0.05
    y = tall.clone().requires_grad_(True)
    r(y, ["p"], ["t"]).sum().backward()
    assert y.grad.abs().sum() > 0 and r.max_value == 0.0 and r.differentiable
    with pytest.raises(ValueError, match="target"):
        build_reward({"name": "slant", "target": 9})


def test_symmetry_by_hand():
    x = torch.full((2, 1, 2, 2), -1.0)
    x[1, :, :, 0] = 1.0  # left column ink 1, right 0 -> |diff| = 1 everywhere
    assert torch.allclose(build_reward("symmetry")(x, ["p"] * 2, ["t"] * 2), torch.tensor([0.0, -1.0]))


class TinyClassifier(nn.Module):
    resolution = 8

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)


def test_digit_correctness_equals_softmax_by_hand():
    clf = TinyClassifier()
    r = build_reward(DigitCorrectness(classifier=clf))
    x = grid_images(4, 1, 8)
    probs = clf(x).softmax(-1)
    want = probs[torch.arange(4), torch.tensor([7, 0, 7, 2])]
    got = r(x, ["a handwritten seven", "the digit 0", "a handwritten seven", "a bold digit two"], TASKS)
    assert torch.allclose(got, want, atol=1e-6)
    digit = torch.tensor([1, 2, 3, 4])  # metadata wins over the prompt
    assert torch.allclose(r(x, PROMPTS, TASKS, digit=digit), probs[torch.arange(4), digit], atol=1e-6)
    # RGB with equal channels == grey; larger images are resized to the classifier's resolution
    assert torch.allclose(r(x.expand(-1, 3, -1, -1), PROMPTS, TASKS, digit=digit), r(x, PROMPTS, TASKS, digit=digit), atol=1e-5)
    big = r(grid_images(4, 1, 16), PROMPTS, TASKS, digit=digit)
    assert big.shape == (4,) and bool(((big >= 0) & (big <= 1)).all())
    assert r.max_value == 1.0 and not any(p.requires_grad for p in r.parameters())
    r.train()
    assert not r.training and not clf.training
    xg = x.clone().requires_grad_(True)
    r(xg, PROMPTS, TASKS, digit=digit).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_parse_digit():
    assert parse_digit("a handwritten seven") == 7
    assert parse_digit("The number Three written by hand") == 3
    assert parse_digit("the digit 4") == 4
    for bad in ["a cat", "one or two", "someone"]:
        with pytest.raises(ValueError, match="digit"):
            parse_digit(bad)
    r = DigitCorrectness(classifier=TinyClassifier())
    with pytest.raises(ValueError, match="digit"):
        r(grid_images(4, 1, 8), PROMPTS, TASKS)  # "a cat" names no digit and no metadata


# ----------------------------------------------------------------------------- registry, composition
def test_registry_unknown_name_lists_names_and_custom_reward():
    with pytest.raises(ValueError, match="jpeg_compressibility"):
        build_reward("no_such_reward")
    with pytest.raises(ValueError, match="name"):
        build_reward({"target": 0.3})

    @register_reward("test_constant")
    class Constant(Reward):
        max_value = 1.0

        def __init__(self, value: float = 1.0):
            super().__init__()
            self.value = value

        def forward(self, images, prompts, tasks, **metadata):
            return torch.full((images.shape[0],), self.value, device=images.device)

    r = build_reward({"name": "test_constant", "value": 0.5})
    assert r.name == "test_constant" and torch.equal(r(torch.zeros(2, 1, 4, 4), ["a"] * 2, ["t"] * 2), torch.full((2,), 0.5))


def test_weighted_sum_equals_hand_sum():
    x = grid_images(4, 1, 8)
    spec = {"name": "weighted_sum", "rewards": [{"name": "brightness", "target": 0.2, "weight": 2.0}, {"name": "symmetry", "weight": -0.5}]}
    ws = build_reward(spec)
    want = 2.0 * build_reward({"name": "brightness", "target": 0.2})(x, PROMPTS, TASKS) - 0.5 * build_reward("symmetry")(x, PROMPTS, TASKS)
    assert torch.allclose(ws(x, PROMPTS, TASKS), want)
    assert ws.max_value is None  # a negative weight: no upper bound
    assert set(ws.components(x, PROMPTS, TASKS)) == {"brightness", "symmetry"}
    pos = build_reward({"name": "weighted_sum", "rewards": {"brightness": 1.0, "symmetry": 3.0}})
    assert pos.max_value == 0.0
    mixed = build_reward({"name": "weighted_sum", "rewards": [("brightness", 1.0), DigitCorrectness(classifier=TinyClassifier())]})
    assert mixed.max_value == 1.0 and mixed(x, PROMPTS, TASKS, digit=torch.arange(4)).shape == (4,)


def test_task_routed_routes_rows_and_rejects_unknown_task():
    clf = TinyClassifier()
    x = grid_images(4, 1, 8)
    tasks = ["bright", "correct", "bright", "correct"]
    digit = torch.tensor([3, 5, 7, 9])
    routed = build_reward({"name": "per_task", "rewards": {"bright": {"name": "brightness", "target": 0.9},
                                                         "correct": DigitCorrectness(classifier=clf)}})
    got = routed(x, PROMPTS, tasks, digit=digit)
    b = build_reward({"name": "brightness", "target": 0.9})(x, PROMPTS, tasks)
    c = clf(x).softmax(-1)[torch.arange(4), digit]
    assert torch.allclose(got, torch.stack([b[0], c[1], b[2], c[3]]), atol=1e-6)
    assert routed.max_values == {"bright": 0.0, "correct": 1.0} and routed.max_value is None
    with pytest.raises(ValueError, match=r"'other'.*bright"):
        routed(x, PROMPTS, ["bright", "other", "bright", "correct"], digit=digit)


def test_validate_rewards():
    assert validate_rewards(torch.ones(3, dtype=torch.float64), 3, "r").dtype == torch.float32
    with pytest.raises(ValueError, match="'myreward'.*shape"):
        validate_rewards(torch.ones(3, 1), 3, "myreward")
    with pytest.raises(ValueError, match="'myreward'.*NaN"):
        validate_rewards(torch.tensor([0.0, float("nan"), 1.0]), 3, "myreward")
    with pytest.raises(ValueError, match="inf"):
        validate_rewards(torch.tensor([0.0, float("inf"), 1.0]), 3, "myreward")
    with pytest.raises(ValueError, match="Tensor"):
        validate_rewards([1.0, 2.0, 3.0], 3, "myreward")


# ----------------------------------------------------------------------------- model adapters (tiny random models)
def _clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab[c] = len(vocab)
    for c in CHARS:
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[]), len(vocab)


def _head_state(in_dim: int, seed: int) -> dict[str, torch.Tensor]:
    from lit_distill.rewards import PreferenceMLP

    torch.manual_seed(seed)
    return {k: v.contiguous() for k, v in PreferenceMLP((in_dim, 1024, 128, 64, 16)).state_dict().items()}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    d = tmp_path_factory.mktemp("clip")
    tok, n = _clip_tokenizer()
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(d)
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=24, logit_scale_init_value=2.0,
    )
    CLIPModel(cfg).eval().save_pretrained(d)
    save_file(_head_state(24, 1), str(d / "aesthetic_head.safetensors"))
    return d


@pytest.fixture(scope="module")
def clip_ref(clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval(), CLIPProcessor.from_pretrained(clip_dir, local_files_only=True)


def _pooled(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _ref_pixels(proc, images):
    arr = [((im + 1) / 2 * 255).round().to(torch.uint8).permute(1, 2, 0).numpy() for im in images]
    if arr[0].shape[-1] == 1:
        arr = [np.repeat(a, 3, axis=-1) for a in arr]
    return proc(images=arr, return_tensors="pt")["pixel_values"]


def _ref_clip_cosine(model, proc, images, prompts):
    with torch.no_grad():
        img = F.normalize(_pooled(model.get_image_features(pixel_values=_ref_pixels(proc, images))), dim=-1)
        enc = proc.tokenizer(prompts, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
        txt = F.normalize(_pooled(model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])), dim=-1)
    return (img * txt).sum(-1)


@pytest.mark.parametrize("name", ["clip_score", "pickscore", "hpsv2"])
def test_clip_adapters_match_reference(name, clip_dir, clip_ref):
    model, proc = clip_ref
    r = build_reward({"name": name, "path": str(clip_dir)})
    x = grid_images(4, 3, 32)
    got = r(x, PROMPTS, TASKS)
    cos = _ref_clip_cosine(model, proc, x, PROMPTS)
    scale = {"clip_score": 100.0, "pickscore": model.logit_scale.exp().item(), "hpsv2": 1.0}[name]
    assert got.shape == (4,) and got.dtype == torch.float32 and torch.isfinite(got).all()
    assert torch.allclose(got, scale * cos, atol=1e-4 * scale)
    assert r.max_value == pytest.approx(scale)
    # grey input == the same image as RGB; other sizes are resized on-device
    g = grid_images(4, 1, 32)
    assert torch.allclose(r(g, PROMPTS, TASKS), r(g.expand(-1, 3, -1, -1), PROMPTS, TASKS), atol=1e-5)
    assert torch.isfinite(r(grid_images(4, 1, 16), PROMPTS, TASKS)).all()


def test_clip_score_is_differentiable_and_frozen(clip_dir):
    r = build_reward({"name": "clip_score", "path": str(clip_dir)})
    x = grid_images(2, 3, 32).requires_grad_(True)
    r(x, PROMPTS[:2], TASKS[:2]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in r.parameters()) and not r.model.training


def test_laion_aesthetic_matches_reference(clip_dir, clip_ref, tmp_path):
    from transformers import CLIPVisionModelWithProjection

    from lit_distill.rewards import PreferenceMLP

    model, proc = clip_ref
    r = build_reward({"name": "laion_aesthetic", "path": str(clip_dir)})
    x = grid_images(4, 3, 32)
    head = PreferenceMLP((24, 1024, 128, 64, 16)).eval()
    head.load_state_dict(_head_state(24, 1))
    with torch.no_grad():
        want = head(F.normalize(_pooled(model.get_image_features(pixel_values=_ref_pixels(proc, x))), dim=-1)).squeeze(-1)
    got = r(x, PROMPTS, TASKS)
    assert got.shape == (4,) and torch.isfinite(got).all() and torch.allclose(got, want, atol=1e-5)
    # a vision-only dir with the head as a .pth under its original file name
    vdir = tmp_path / "vision"
    vcfg = model.config.vision_config
    vcfg.projection_dim = model.config.projection_dim
    vis = CLIPVisionModelWithProjection(vcfg)
    vis.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith(("vision_model.", "visual_projection."))})
    vis.save_pretrained(vdir)
    proc.image_processor.save_pretrained(vdir)
    torch.save(_head_state(24, 1), vdir / "sac+logos+ava1-l14-linearMSE.pth")
    assert torch.allclose(build_reward({"name": "laion_aesthetic", "path": str(vdir)})(x, PROMPTS, TASKS), want, atol=1e-5)


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor, BlipProcessor

    d = tmp_path_factory.mktemp("blip")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(CHARS) + ["##" + c for c in CHARS]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(d)
    torch.manual_seed(0)
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=40, bos_token_id=2, sep_token_id=3, pad_token_id=0),
        vision_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16, image_text_hidden_size=16,
    )
    BlipForImageTextRetrieval(cfg).eval().save_pretrained(d)
    torch.save({"mlp." + k: v for k, v in _head_state(32, 2).items()}, d / "ImageReward.pt")
    return d


def test_image_reward_matches_reference(blip_dir):
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    from lit_distill.rewards import PreferenceMLP

    model = BlipForImageTextRetrieval.from_pretrained(blip_dir, local_files_only=True).eval()
    proc = BlipProcessor.from_pretrained(blip_dir, local_files_only=True)
    r = build_reward({"name": "image_reward", "path": str(blip_dir)})
    x = grid_images(4, 3, 32)
    enc = proc.tokenizer(PROMPTS, padding="max_length", max_length=35, truncation=True, return_tensors="pt")
    head = PreferenceMLP((32, 1024, 128, 64, 16)).eval()
    head.load_state_dict(_head_state(32, 2))
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=_ref_pixels(proc, x))
        want = (head(out.question_embeds[:, 0]).squeeze(-1) - 0.16717362830052426) / 1.0333394966054072
    got = r(x, PROMPTS, TASKS)
    assert got.shape == (4,) and torch.isfinite(got).all() and torch.allclose(got, want, atol=1e-5)
    assert r.max_value is None


@pytest.mark.parametrize("name", ["clip_score", "pickscore", "hpsv2", "laion_aesthetic", "image_reward"])
def test_adapters_need_a_local_dir(name, tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        build_reward({"name": name, "path": str(tmp_path / "missing")})
    with pytest.raises(FileNotFoundError, match="path"):
        build_reward({"name": name, "path": "openai/clip-vit-large-patch14"})


def test_missing_head_names_head(clip_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="head"):
        build_reward({"name": "laion_aesthetic", "path": str(clip_dir), "head": "nope.safetensors"})

"""lit_distill.models: DiffusionModel loading/saving/encoding, builders, LoRA, EMA (tiny models, CPU)."""

import copy

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from lit_distill.models import (
    EMA,
    DiffusionModel,
    add_lora,
    build_embedded_model,
    build_sd3_like_transformer,
    build_sd15_like_unet,
    build_text_encoder,
    build_word_tokenizer,
    load_denoiser,
    lora_disabled,
    merge_lora,
    save_lora,
)

VOCAB = ["a", "handwritten", "seven", "three", "digit", "photo", "of", "cat"]
PROMPTS = ["a handwritten seven", "a photo of a cat"]


def tiny_vae(latent_channels=4, scaling_factor=0.5, shift_factor=None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=32, scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )


def ddim_config():
    from diffusers import DDIMScheduler

    return {**DDIMScheduler(clip_sample=False, steps_offset=1).config, "_class_name": "DDIMScheduler"}


def tiny_sd15_model() -> DiffusionModel:
    """A tiny SD-1.5-structured DiffusionModel (UNet2DConditionModel + AutoencoderKL + CLIPTextModel)."""
    torch.manual_seed(0)
    tok = build_word_tokenizer(VOCAB, max_length=8)
    unet = build_sd15_like_unet(
        sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2,
    )
    enc = build_text_encoder(len(tok), hidden_size=32, max_length=8)
    return DiffusionModel(unet, ddim_config(), (4, 16, 16), vae=tiny_vae(), text_encoder=enc, tokenizer=tok).eval()


def tiny_sd3_model() -> DiffusionModel:
    """A tiny SD3-structured DiffusionModel (SD3Transformer2DModel, two CLIP encoders with projection, T5, VAE)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    tok = build_word_tokenizer(VOCAB, max_length=8)

    def clip(hidden):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=8, projection_dim=16, pad_token_id=0, bos_token_id=2,
            eos_token_id=3)).eval()

    t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).eval()
    transformer = build_sd3_like_transformer(
        sample_size=16, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16,
    )
    return DiffusionModel(transformer, FlowMatchEulerDiscreteScheduler(shift=3.0), (4, 16, 16), vae=tiny_vae(),
                          text_encoder=clip(16), tokenizer=tok, text_encoder_2=clip(24), tokenizer_2=tok,
                          text_encoder_3=t5, tokenizer_3=tok).eval()


@pytest.fixture(scope="module")
def sd15():
    return tiny_sd15_model()


def sd15_pipeline(model: DiffusionModel, unet=None):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=unet or model.net,
        scheduler=DDIMScheduler.from_config(model.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )


# ---------------------------------------------------------------------------------------------- embedded
def test_embedded_model_forward_encode_and_round_trip(tmp_path):
    model = build_embedded_model(seed=0).eval()
    n_params = sum(p.numel() for p in model.net.parameters())
    assert 3e5 < n_params < 2e6
    assert model.schedule.family == "flow" and model.sample_shape == (1, 16, 16)
    cond = model.encode_prompts(["a handwritten seven", "the number zero written by hand"])
    assert cond["encoder_hidden_states"].shape == (2, 16, 64)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10.0, 900.0])
    out = model(x, t, cond)
    assert out.shape == x.shape
    assert model.null_cond(3)["encoder_hidden_states"].shape == (3, 16, 64)
    assert torch.equal(model.decode(x), x.clamp(-1, 1)) and torch.equal(model.encode_images(x), x)

    model.save_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "base")  # overwriting is atomic and leaves no temp dirs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    loaded = DiffusionModel.from_pretrained(tmp_path / "base").eval()
    assert loaded.sample_shape == model.sample_shape and loaded.scheduler_config == model.scheduler_config
    assert torch.equal(loaded(x, t, loaded.encode_prompts(["a handwritten seven", "the number zero written by hand"])),
                       out)


def test_embedded_model_vp_and_frozen_copy():
    model = build_embedded_model(family="vp", block_channels=(16, 32), seed=1)
    assert model.schedule.family == "vp" and model.schedule.prediction_type == "v_prediction"
    assert build_embedded_model(family="vp", prediction_type="epsilon", block_channels=(16, 32)) \
        .schedule.prediction_type == "epsilon"
    with pytest.raises(ValueError, match="family"):
        build_embedded_model(family="edm")
    frozen = model.copy_frozen(torch.bfloat16)
    assert frozen.dtype == torch.bfloat16 and model.dtype == torch.float32
    assert not any(p.requires_grad for p in frozen.net.parameters()) and not frozen.training
    assert frozen.text_encoder is model.text_encoder  # shared, not copied
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 700])
    cond = model.encode_prompts(["a handwritten two", "zero"])
    assert frozen(x, t, cond).dtype == torch.float32
    torch.testing.assert_close(frozen(x, t, cond), model(x, t, cond), atol=0.1, rtol=0.1)


def test_word_tokenizer_save_load(tmp_path):
    from transformers import AutoTokenizer

    tok = build_word_tokenizer(VOCAB, max_length=6)
    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(str(tmp_path))
    ids = tok2(["A Handwritten SEVEN!", "dog"], padding="max_length", truncation=True).input_ids
    assert ids == tok(["a handwritten seven !", "dog"], padding="max_length", truncation=True).input_ids
    assert ids[0][0] == 2 and ids[0][4] == 1 and ids[0][5] == 3  # <bos> ... "!"=<unk> <eos>
    assert ids[1] == [2, 1, 3, 0, 0, 0]


def test_missing_dir_and_denoiser_errors_name_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="path="):
        DiffusionModel.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="path=.*unet/"):
        DiffusionModel.from_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="scheduler_config"):
        DiffusionModel(torch.nn.Linear(1, 1), {"num_train_timesteps": 1000}, (1, 1, 1))


# ---------------------------------------------------------------------------------------------- SD-1.5 tiny
def test_sd15_structure_round_trip_latents_and_prompts(sd15, tmp_path):
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([3, 800])
    cond = sd15.encode_prompts(PROMPTS)
    pipe = sd15_pipeline(sd15)
    expected, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    assert torch.equal(cond["encoder_hidden_states"], expected)

    images = sd15.decode(x)
    assert images.shape == (2, 3, 32, 32) and images.abs().max() <= 1
    with torch.no_grad():
        ref = sd15.vae.decode(x / 0.5).sample.clamp(-1, 1)
        img = torch.rand(2, 3, 32, 32) * 2 - 1
        latents = sd15.encode_images(img)
        assert latents.shape == (2, 4, 16, 16)
        torch.testing.assert_close(latents, sd15.vae.encode(img).latent_dist.mean * 0.5)
        torch.testing.assert_close(images, ref)
        sampled = sd15.encode_images(img, generator=torch.Generator().manual_seed(0))
        assert sampled.shape == latents.shape and not torch.equal(sampled, latents)

    sd15.save_pretrained(tmp_path / "sd15")
    assert (tmp_path / "sd15" / "unet" / "config.json").is_file()
    loaded = DiffusionModel.from_pretrained(tmp_path / "sd15").eval()
    assert type(loaded.vae).__name__ == "AutoencoderKL" and loaded.sample_shape == (4, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, loaded.encode_prompts(PROMPTS)), sd15(x, t, cond))
        assert torch.equal(loaded.decode(x), images)
    # the same directory is a StableDiffusionPipeline directory
    from diffusers import StableDiffusionPipeline

    pipe2 = StableDiffusionPipeline.from_pretrained(str(tmp_path / "sd15"))
    assert type(pipe2.unet).__name__ == "UNet2DConditionModel"
    assert type(load_denoiser(str(tmp_path / "sd15"))).__name__ == "UNet2DConditionModel"


def test_latent_shift_factor():
    model = DiffusionModel(torch.nn.Linear(1, 1), ddim_config(), (4, 16, 16), vae=tiny_vae(shift_factor=0.2))
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.decode(x, clamp=False), model.vae.decode(x / 0.5 + 0.2).sample)
        img = torch.rand(1, 3, 32, 32) * 2 - 1
        torch.testing.assert_close(model.encode_images(img), (model.vae.encode(img).latent_dist.mean - 0.2) * 0.5)


# ---------------------------------------------------------------------------------------------- SD3 tiny
def test_sd3_structure_encode_prompts_matches_pipeline(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    model = tiny_sd3_model()
    transformer, tok, t5 = model.net, model.tokenizer, model.text_encoder_3
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config)
    assert model.schedule.family == "flow" and model.max_sequence_length == 8
    cond = model.encode_prompts(PROMPTS)
    assert cond["encoder_hidden_states"].shape == (2, 8 + 8, 32)
    assert cond["pooled_projections"].shape == (2, 32)

    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=model.vae,
                                    text_encoder=model.text_encoder, tokenizer=tok, text_encoder_2=model.text_encoder_2,
                                    tokenizer_2=tok, text_encoder_3=t5, tokenizer_3=tok)
    emb, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device=torch.device("cpu"),
                                           do_classifier_free_guidance=False, max_sequence_length=8)
    torch.testing.assert_close(cond["encoder_hidden_states"], emb)
    torch.testing.assert_close(cond["pooled_projections"], pooled)

    x, t = torch.randn(2, 4, 16, 16), torch.tensor([900.0, 100.0])
    with torch.no_grad():
        out = model(x, t, cond)
    assert out.shape == x.shape
    assert model.null_cond(2)["pooled_projections"].shape == (2, 32)

    model.save_pretrained(tmp_path / "sd3")
    loaded = DiffusionModel.from_pretrained(tmp_path / "sd3").eval()
    assert type(loaded.text_encoder_3).__name__ == "T5EncoderModel" and loaded.max_sequence_length == 8
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, loaded.encode_prompts(PROMPTS)), out)

    add_lora(transformer, rank=2)  # joint-attention default targets exist on SD3
    assert any("add_q_proj.lora_A" in n for n, _ in transformer.named_parameters())


# ---------------------------------------------------------------------------------------------- LoRA
def test_lora_trainable_init_disable_save_load_merge(sd15, tmp_path):
    base_unet = copy.deepcopy(sd15.net)
    model = DiffusionModel(copy.deepcopy(sd15.net), sd15.scheduler_config, sd15.sample_shape,
                           text_encoder=sd15.text_encoder, tokenizer=sd15.tokenizer).eval()
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([3, 800])
    with torch.no_grad():
        cond = model.encode_prompts(PROMPTS)
        base_out = model(x, t, cond)

    add_lora(model, rank=4, alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("lora_" in n for n, _ in model.net.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, cond), base_out)  # B = 0 at init

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):
        opt.zero_grad()
        model(x, t, cond).pow(2).mean().backward()
        opt.step()
    with torch.no_grad():
        adapted = model(x, t, cond)
        assert not torch.allclose(adapted, base_out)
        with lora_disabled(model):
            torch.testing.assert_close(model(x, t, cond), base_out)
        torch.testing.assert_close(model(x, t, cond), adapted)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable

    path = save_lora(model, tmp_path / "lora")
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        assert all(k.startswith("unet.") for k in f.keys())
    pipe = sd15_pipeline(sd15, unet=base_unet)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample,
                                   adapted, atol=1e-5, rtol=1e-5)

    merge_lora(model)
    assert not any("lora_" in n for n, _ in model.net.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, cond), adapted, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- EMA
def test_ema_update_swap_and_state_round_trip():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = EMA(net, decay=0.9, warmup=True)
    shadow = {n: p.detach().clone() for n, p in net.named_parameters()}
    for k in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net[1].running_mean.add_(1.0)
        d = min(0.9, (1 + k) / (10 + k))
        shadow = {n: d * shadow[n] + (1 - d) * p.detach() for n, p in net.named_parameters()}
        ema.update(net)
    assert ema.num_updates == 3
    current = copy.deepcopy(net.state_dict())
    with ema.swap(net):
        for n, p in net.named_parameters():
            torch.testing.assert_close(p, shadow[n])
        torch.testing.assert_close(net[1].running_mean, current["1.running_mean"])  # buffers copied
    for k, v in net.state_dict().items():
        assert torch.equal(v, current[k])

    ema2 = EMA(net, decay=0.5, warmup=False)
    ema2.load_state_dict(ema.state_dict())
    assert ema2.num_updates == 3 and ema2.decay == 0.9 and ema2.warmup
    ema2.copy_to(net)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p, shadow[n])

    frozen_first = torch.nn.Linear(2, 2)
    frozen_first.weight.requires_grad_(False)
    assert EMA(frozen_first).param_names == ["bias"]  # trainable parameters only (LoRA)

"""The methods on SD-1.5- and SD3-structured pipelines from disk: latent space through the VAE, LoRA with the
LoRA-free base as reference, classifier-free guidance, export in the diffusers formats."""
import lightning as L
import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from lit_distill.methods import OPDStudent, TeacherRL
from lit_distill.models import DiffusionModel, build_sd3_like_transformer, build_sd15_like_unet, build_text_encoder
from lit_distill.models import build_word_tokenizer
from test_models import VOCAB, ddim_config, tiny_vae

PROMPTS = {"prompt": ["a handwritten seven", "a photo of a cat"], "task": ["compress", "compress"]}


def sd15_dir(path):
    torch.manual_seed(0)
    tok = build_word_tokenizer(VOCAB, max_length=8)
    unet = build_sd15_like_unet(
        sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2)
    DiffusionModel(unet, ddim_config(), (4, 16, 16), vae=tiny_vae(), text_encoder=build_text_encoder(len(tok), 32, max_length=8),
                   tokenizer=tok).save_pretrained(path)
    return str(path)


def sd3_dir(path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    tok = build_word_tokenizer(VOCAB, max_length=8)

    def clip(hidden):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=8, projection_dim=16, pad_token_id=0, bos_token_id=2,
            eos_token_id=3))

    transformer = build_sd3_like_transformer(
        sample_size=16, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    DiffusionModel(transformer, FlowMatchEulerDiscreteScheduler(shift=3.0), (4, 16, 16), vae=tiny_vae(),
                   text_encoder=clip(16), tokenizer=tok, text_encoder_2=clip(16), tokenizer_2=tok,
                   text_encoder_3=t5, tokenizer_3=tok).save_pretrained(path)
    return str(path)


def fit(module, steps=2):
    loader = torch.utils.data.DataLoader([0, 1], batch_size=2, collate_fn=lambda _: PROMPTS)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, loader)
    return trainer


def test_teacher_rl_with_lora_on_an_sd15_pipeline_dir(tmp_path):
    source = sd15_dir(tmp_path / "sd15")
    module = TeacherRL(source, "jpeg_compressibility", lora_rank=4, kl_weight=0.1, reference="lora_base",
                       num_steps=3, noise_level=1.0, guidance_scale=2.0, group_size=2, minibatch_size=4,
                       logprob_reduction="mean", eval_steps=3)
    assert module.model.vae is not None and module.reference is None
    trainer = fit(module)
    assert torch.isfinite(trainer.callback_metrics["train/kl_ref"])
    module.export(tmp_path / "teacher")
    assert (tmp_path / "teacher" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    images = module.generate_eval_samples(["a photo of a cat"], torch.Generator().manual_seed(0))
    assert images.shape == (1, 3, 32, 32) and images.abs().max() <= 1

    student = OPDStudent(source, {"compress": str(tmp_path / "teacher")}, num_steps=3, noise_level=1.0,
                         guidance_scale=2.0, minibatch_size=4, teacher_dtype="bfloat16", eval_steps=3)
    assert torch.isfinite(fit(student, 1).callback_metrics["train/kl"])


def test_teacher_rl_on_an_sd3_pipeline_dir(tmp_path):
    module = TeacherRL(sd3_dir(tmp_path / "sd3"), "jpeg_compressibility", num_steps=3, noise_level=0.7,
                       group_size=2, minibatch_size=4, logprob_reduction="mean", eval_steps=3)
    assert module.model.schedule.family == "flow"
    assert torch.isfinite(fit(module).callback_metrics["train/policy_loss"])

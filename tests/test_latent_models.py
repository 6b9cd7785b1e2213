"""The methods on SD-1.5- and SD3-structured pipelines from disk: latent space through the VAE, LoRA with the
LoRA-free base as reference, classifier-free guidance, export in the diffusers formats."""
import lightning as L
import torch

from lit_distill.methods import OPDStudent, TeacherRL
from test_models import tiny_sd3_model, tiny_sd15_model

PROMPTS = {"prompt": ["a handwritten seven", "a photo of a cat"], "task": ["compress", "compress"]}


def sd15_dir(path):
    tiny_sd15_model().save_pretrained(path)
    return str(path)


def sd3_dir(path):
    tiny_sd3_model().save_pretrained(path)
    return str(path)


def fit(module, steps=2):
    loader = torch.utils.data.DataLoader([0, 1], batch_size=2, collate_fn=lambda _: PROMPTS)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, loader)
    return trainer


def test_teacher_rl_with_lora_on_an_sd15_pipeline_dir(tmp_path):
    source = sd15_dir(tmp_path / "sd15")
    module = TeacherRL(source, "jpeg_compressibility", lora_rank=4, policy={"kl_weight": 0.1, "reference": "lora_base"},
                       sampling={"num_steps": 3, "noise_level": 1.0, "guidance_scale": 2.0, "rollouts_per_prompt": 2,
                                 "eval_steps": 3}, updates={"minibatch_size": 4, "reduction": "mean"})
    assert module.model.vae is not None and module.reference is None
    trainer = fit(module, 1)
    assert torch.isfinite(trainer.callback_metrics["train/kl_ref"])
    module.export(tmp_path / "teacher")
    assert (tmp_path / "teacher" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    images = module.generate_eval_samples(1, torch.Generator().manual_seed(0), ["a photo of a cat"])
    assert images.shape == (1, 3, 32, 32) and images.abs().max() <= 1

    student = OPDStudent(source, {"compress": str(tmp_path / "teacher")}, teacher_dtype="bfloat16",
                         sampling={"num_steps": 3, "noise_level": 1.0, "guidance_scale": 2.0, "eval_steps": 3},
                         updates={"minibatch_size": 4})
    assert torch.isfinite(fit(student, 1).callback_metrics["train/kl"])


def test_teacher_rl_on_an_sd3_pipeline_dir(tmp_path):
    module = TeacherRL(sd3_dir(tmp_path / "sd3"), "jpeg_compressibility",
                       sampling={"num_steps": 3, "noise_level": 0.7, "rollouts_per_prompt": 2, "eval_steps": 3},
                       updates={"minibatch_size": 4, "reduction": "mean"})
    assert module.model.schedule.family == "flow"
    assert torch.isfinite(fit(module, 1).callback_metrics["train/policy_loss"])

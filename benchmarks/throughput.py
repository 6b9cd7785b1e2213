"""Training-step throughput of every method on real-size denoisers, against the peers' own loop in the same run.

What runs. Each method's REAL ``training_step`` (TeacherRL ``teacher_rl``, OPDStudent ``opd``, DisBackStudent
``disback``, NoDistillOneStep ``nodistill``, DiffusionPretrain ``pretrain``) through a Lightning
``Trainer(precision="bf16-mixed", accelerator="gpu", devices=1)`` on a dummy prompt / image dataloader, on
denoisers built from config with random weights, with the project's default settings for a CUDA run
(``runtime.compile="auto"``: regional compilation; ``runtime.norm_precision="input"``; fused AdamW) unless
``--runtime KEY=VALUE`` overrides them (results then go under ``methods_<--variant>``):

- ``unet``: an SD-1.5-size ``UNet2DConditionModel`` (860M parameters) on 4x64x64 latents with 77x768 text
  states, SD-1.5's DDIM schedule (scaled-linear betas, eps prediction), every method;
- ``sd3``: an SD3-medium-size ``SD3Transformer2DModel`` (2B parameters) on 16x64x64 latents (512 px) with
  333x4096 text states and 2048 pooled, rectified-flow schedule (shift 3), TeacherRL and OPDStudent.

Text encoders are not part of the measurement: the ``DiffusionModel`` has no text encoder and
:class:`StubCondModel` encodes every prompt as the same fixed random tensors of the real encoders' output
shapes (``encode_prompts`` / ``null_cond`` overridden; the tensors are materialised per batch as a real
encoder's output would be). OPD's two teachers are bf16 copies of the same random model (built after the
student with meta-device placeholders, then swapped in: see ``build_module``). No VAE: rewards ("brightness")
read the latents, a negligible cost.

Settings (per GPU step). TeacherRL / OPD on the UNet: 4 prompts x 8 rollouts = 32 images, 10 SDE steps
(DDIM eta 1), every (sample, step) pair trained (320 pairs) in minibatches of 32 (10 optimiser steps);
``updates.reduction="mean"`` as DDPO / Flow-GRPO. On SD3: 2 prompts x 8 = 16 images, Flow-GRPO noise level
0.7, minibatches of 16 (10 optimiser steps). DisBack (its backtracking stage: one fake-score DSM update and
one generator update per step) and NoDistillOneStep (one classifier update and one generator update per
step): 32 generated images per step. DiffusionPretrain: 32 training images per step. No classifier-free
guidance, no KL to a reference.

Timing (CUDA events, no host synchronisation inside the step). A callback records an event at every
``on_train_batch_start`` and at ``on_train_epoch_end``: step ``i`` lasts from start ``i`` to start ``i+1``
(the whole step: rollout, rewards, every update, the EMA, Lightning's per-batch work). The instance's
``sample_trajectories`` (the rollout) is wrapped with a pair of events; *update* = step - rollout (everything
else). Medians over the timed steps after ``warmup`` steps. ``images_per_s`` = images per step / step time;
``rollout_images_per_s`` and ``update_images_per_s`` likewise per phase. ``compile_warmup_s``: the time from the
start of the first step to the start of the first step that runs at full speed (within 15% of the median of the
timed steps), 0 when nothing is compiled; each method starts with dynamo's in-memory caches cleared, and
``compile_cache_files`` says how many files the on-disk compile cache held then (0: a cold start).

MFU. Model FLOPs counted with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (no GPU time)
for one forward and one forward+backward of the denoiser at the batch sizes used (and of NoDistill's
classifier), combined per method in :func:`model_flops` (recomputation by gradient checkpointing is not
counted: this is MFU, not hardware utilisation), divided by the phase time and by ``peak_tflops``: a
large bf16 matmul timed in the same run.

The peer reference, in the same process on the same model and workload (``peer_images_per_s``,
``speedup_vs_peer``):
- TeacherRL / OPD: a loop written as ddpo-pytorch and Flow-GRPO write theirs (:class:`PeerRL`): fp32 weights
  under bf16 autocast, frozen teachers in bf16; the rollout a Python loop over the steps whose step function
  returns the next latent *and its log-probability* (DDIM with eta for the UNet as ddpo-pytorch's
  ``ddim_step_with_logprob``; the Flow-GRPO SDE step for SD3), log-densities averaged over the elements as
  both do; group-standardised advantages; then for each train batch of ``minibatch`` samples (per inner epoch:
  samples shuffled, each sample's timesteps in its own random order, as ddpo-pytorch), one forward and backward
  per timestep with the gradient accumulated over all the timesteps of the batch (loss divided by their number,
  as accelerate does) and ONE optimiser step per batch: ``clip_grad_norm_``, fused ``torch.optim.AdamW``. The
  same (sample, step) pairs and forward batch sizes as ours; fewer optimiser steps (the peers' accumulation).
- DisBack, NoDistillOneStep, DiffusionPretrain: the same module and losses in a plain bf16 loop: bf16-mixed,
  eager (``runtime.compile="off"``), autocast's fp32 norms (``norm_precision="float32"``), torch's default
  (foreach) AdamW.
- ``--fp32-loop`` adds the labelled extra row of earlier versions (``fp32_loop_images_per_s``): fp32, no
  autocast, diffusers' ``scheduler.step`` in a Python loop, the log-probs recomputed in a second no-grad pass,
  non-fused AdamW (TeacherRL / OPD, its update timed over ``--fp32-chunks`` minibatches and scaled), or the
  same module in ``precision="32-true"`` with non-fused AdamW (the others). No peer trains like this: ddpo-pytorch
  runs fp16 mixed precision and Flow-GRPO bf16.
TF32 flags are left at PyTorch's defaults (recorded in ``settings``).

Out of memory. With ``--gradient-checkpointing auto`` (default) a method that runs out of memory is rerun
with the method's ``runtime.gradient_checkpointing=True`` (recorded per method); the peer loop falls back to
smaller train batches with accumulation over them, the one-step peers to gradient checkpointing.

Usage: docs/speed.md lists the GPU commands that fill ``benchmarks/results/throughput.json``, each under 9
minutes on one H200; for example

    PYTHONUNBUFFERED=1 python benchmarks/throughput.py --model unet --methods teacher_rl opd
    PYTHONUNBUFFERED=1 python benchmarks/throughput.py --model unet --methods teacher_rl --runtime compile=off --variant eager
    PYTHONUNBUFFERED=1 python benchmarks/throughput.py --ddp-scaling          # needs 2 GPUs
    python benchmarks/throughput.py --tiny                                   # CPU smoke test
    python benchmarks/report.py                                              # tables from the JSON

Results: ``benchmarks/results/throughput.json`` (merged into an existing file method by method, so parts can come
from separate runs; ``--fresh`` starts a new one) and the ``throughput`` section of docs/benchmarks.md (not with
``--tiny``).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import logging
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ROOT, write_results  # noqa: E402

import report  # noqa: E402

import lightning as L  # noqa: E402

from lit_distill.models.diffusion_model import DiffusionModel  # noqa: E402

RL_METHODS = ("teacher_rl", "opd")
ALL_METHODS = ("teacher_rl", "opd", "disback", "nodistill", "pretrain")
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "throughput.json"
TINY_OUT = ROOT / "benchmarks" / "results" / "throughput_tiny.json"
#: the peers' plain loop for the one-step methods and pretraining: the same module, eager, autocast's norms
PLAIN_RUNTIME = {"compile": "off", "norm_precision": "float32", "rollout_cuda_graphs": False}
#: a step within this fraction of the timed median runs at full speed (compile warm-up ends there)
FULL_SPEED_TOLERANCE = 0.15


def say(*parts) -> None:
    print(f"[throughput {time.strftime('%H:%M:%S')}]", *parts, flush=True)


# -- models ----------------------------------------------------------------------------------------
class StubCondModel(DiffusionModel):
    """A ``DiffusionModel`` whose prompt encoder is a stub: every prompt (and the empty prompt) is encoded as
    the same fixed random tensors of ``cond_shapes`` (e.g. ``{"encoder_hidden_states": (77, 768)}``), created on
    the net's device and materialised per batch. Text encoders are thereby left out of the measurement."""

    def __init__(self, net: nn.Module, scheduler_config: dict, sample_shape: tuple, cond_shapes: dict, seed: int = 0):
        super().__init__(net, scheduler_config, sample_shape)
        device = next(net.parameters()).device
        gen = torch.Generator("cpu").manual_seed(seed)
        self.cond_keys = list(cond_shapes)
        for key, shape in cond_shapes.items():
            value = torch.randn((1,) + tuple(shape), generator=gen).to(device)
            self.register_buffer(f"stub_{key}", value, persistent=False)

    def encode_prompts(self, prompts):
        return {k: getattr(self, f"stub_{k}").repeat(len(prompts), *([1] * (getattr(self, f"stub_{k}").ndim - 1)))
                for k in self.cond_keys}

    def null_cond(self, batch_size: int):
        return self.encode_prompts([""] * batch_size)


def sd15_scheduler_config() -> dict:
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    return {**{k: v for k, v in dict(sched.config).items() if k != "_use_default_values"}, "_class_name": "DDIMScheduler"}


def sd3_scheduler_config() -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return {**{k: v for k, v in dict(sched.config).items() if k != "_use_default_values"},
            "_class_name": "FlowMatchEulerDiscreteScheduler"}


@dataclass
class Spec:
    """One benchmark model and the batch sizes used on it."""
    key: str
    label: str
    build: Callable[[], nn.Module]
    scheduler_config: dict
    sample_shape: tuple
    cond_shapes: dict
    prompts: int           # prompts per RL step
    group: int             # rollouts per prompt
    minibatch: int         # (sample, step) pairs per RL update
    num_steps: int         # sampling steps of a rollout
    noise_level: float     # DDIM eta / Flow-GRPO a
    one_step_batch: int    # images per one-step / pretrain step
    methods: tuple = ALL_METHODS
    extra: dict = field(default_factory=dict)

    @property
    def family(self) -> str:
        return "flow" if "Flow" in self.scheduler_config["_class_name"] else "vp"

    @property
    def rollout_batch(self) -> int:
        return self.prompts * self.group


def model_specs(tiny: bool) -> dict[str, Spec]:
    from lit_distill.models.builders import build_sd3_like_transformer, build_sd15_like_unet

    if tiny:
        unet = lambda: build_sd15_like_unet(  # noqa: E731
            sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=4, norm_num_groups=8)
        sd3 = lambda: build_sd3_like_transformer(  # noqa: E731
            sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
            caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16)
        return {
            "unet": Spec("unet", "UNet2DConditionModel tiny", unet, sd15_scheduler_config(), (4, 8, 8),
                         {"encoder_hidden_states": (8, 32)}, 2, 4, 8, 4, 1.0, 8),
            "sd3": Spec("sd3", "SD3Transformer2DModel tiny", sd3, sd3_scheduler_config(), (16, 8, 8),
                        {"encoder_hidden_states": (12, 32), "pooled_projections": (32,)}, 2, 4, 8, 4, 0.7, 8,
                        methods=RL_METHODS),
        }
    return {
        "unet": Spec("unet", "UNet2DConditionModel sd15-size", build_sd15_like_unet, sd15_scheduler_config(),
                     (4, 64, 64), {"encoder_hidden_states": (77, 768)}, 4, 8, 32, 10, 1.0, 32),
        "sd3": Spec("sd3", "SD3Transformer2DModel sd3-medium-size", build_sd3_like_transformer, sd3_scheduler_config(),
                    (16, 64, 64), {"encoder_hidden_states": (333, 4096), "pooled_projections": (2048,)}, 2, 8, 16, 10,
                    0.7, 16, methods=RL_METHODS),
    }


def build_net(spec: Spec, device, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with torch.device(device):  # parameters initialised on the device directly (fast for 2B parameters)
        net = spec.build()
    return net.to(device)  # buffers a builder made on the CPU (e.g. from numpy) follow


def stub_model(spec: Spec, device, seed: int = 0) -> StubCondModel:
    return StubCondModel(build_net(spec, device, seed), spec.scheduler_config, spec.sample_shape, spec.cond_shapes)


# -- the modules -----------------------------------------------------------------------------------
def build_module(method: str, spec: Spec, device, *, runtime: dict, tiny: bool):
    """The LightningModule of ``method`` on a stub-conditioned random model of ``spec``, with the ``runtime``
    settings given (the method's defaults for the others; seed 0)."""
    common = dict(runtime={"seed": 0, **runtime})
    model = stub_model(spec, device)
    sampling = {"num_steps": spec.num_steps, "noise_level": spec.noise_level, "rollouts_per_prompt": spec.group}
    updates = {"minibatch_size": spec.minibatch, "steps_per_sample": None, "reduction": "mean"}
    if method == "teacher_rl":
        from lit_distill.methods.teacher_rl import TeacherRL

        return TeacherRL(model, "brightness", sampling=sampling, policy={"kl_weight": 0.0}, optim={"lr": 1e-5},
                         updates=updates, **common)
    if method == "opd":
        from lit_distill.methods.opd import OPDStudent

        # Teachers given as DiffusionModel instances would be deep-copied into hparams by
        # save_hyperparameters (a full extra copy on the GPU): pass meta-device placeholders of the same spec
        # (cheap to copy, same schedule and sample shape for the compatibility check), then swap in bf16 copies.
        placeholder = stub_model(spec, "meta")
        module = OPDStudent(model, {"a": placeholder, "b": placeholder}, sampling=sampling, optim={"lr": 1e-5},
                            updates={**updates, "timestep_fraction": 1.0}, **common)
        module.teachers = {name: model.copy_frozen(None if tiny else torch.bfloat16) for name in ("a", "b")}
        return module
    if method == "disback":
        from lit_distill.methods.disback import DisBackStudent

        module = DisBackStudent(model, backtracking=True, stages={"num_checkpoints": 2, "iterations_per_stage": 10**9},
                                optim={"lr": 1e-5, "aux_updates_per_generator_update": 1}, **common)
        module.stage_schedule.next_stage()  # the backtracking stage (real score: a frozen copy; both networks trained)
        return module
    if method == "nodistill":
        from lit_distill.methods.nodistill import NoDistillOneStep

        return NoDistillOneStep(model, optim={"lr": 1e-5, "aux_updates_per_generator_update": 1}, **common)
    if method == "pretrain":
        from lit_distill.methods.pretrain import DiffusionPretrain

        return DiffusionPretrain(model, optim={"lr": 1e-5}, prompt_dropout=0.0, **common)
    raise ValueError(f"method={method!r}: choose from {ALL_METHODS}")


def make_loader(method: str, spec: Spec, batches: int, world: int = 1):
    """A dataloader of ``batches`` batches per rank: prompt batches for TeacherRL / OPD (tasks alternate
    between OPD's two teachers), prompt + image batches for the others."""
    if method in RL_METHODS:
        rows = [{"prompt": f"prompt {i}", "task": "ab"[i % 2]} for i in range(spec.prompts * batches * world)]
        collate = lambda rs: {"prompt": [r["prompt"] for r in rs], "task": [r["task"] for r in rs]}  # noqa: E731
        size = spec.prompts
    else:
        rows = list(range(spec.one_step_batch * batches * world))
        shape = spec.sample_shape

        def collate(rs):
            gen = torch.Generator().manual_seed(int(rs[0]))
            return {"image": torch.rand((len(rs),) + shape, generator=gen) * 2 - 1,
                    "prompt": [f"caption {r}" for r in rs]}
        size = spec.one_step_batch
    return torch.utils.data.DataLoader(rows, batch_size=size, collate_fn=collate, shuffle=False)


def images_per_step(method: str, spec: Spec) -> int:
    return spec.rollout_batch if method in RL_METHODS else spec.one_step_batch


# -- timing ----------------------------------------------------------------------------------------
class Clock:
    """CUDA events on a GPU, ``perf_counter`` on the CPU; ``seconds(a, b)`` after ``finish()``."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def finish(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1000.0 if self.cuda else b - a


class StepTimer(L.Callback):
    """Marks at each ``on_train_batch_start`` and at ``on_train_epoch_end`` (step i = mark i -> mark i+1) and
    around the module instance's ``sample_trajectories`` when it has one (the rollout)."""

    def __init__(self, module: L.LightningModule, clock: Clock):
        self.clock, self.marks, self.rollouts = clock, [], []
        if hasattr(module, "sample_trajectories"):
            original = module.sample_trajectories

            def timed(*args, **kwargs):
                start = self.clock.mark()
                out = original(*args, **kwargs)
                self.rollouts.append((start, self.clock.mark()))
                return out

            module.sample_trajectories = timed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.marks.append(self.clock.mark())

    def on_train_epoch_end(self, trainer, pl_module):
        self.marks.append(self.clock.mark())

    def result(self, warmup: int) -> dict:
        """Medians over the steps after ``warmup`` (``step_s``, ``rollout_s``, ``update_s``) and every step's time
        (``all_steps_s``, warm-up included)."""
        self.clock.finish()
        every = [self.clock.seconds(a, b) for a, b in zip(self.marks[:-1], self.marks[1:])]
        steps = every[warmup:]
        rollouts = [self.clock.seconds(a, b) for a, b in self.rollouts][warmup:]
        if not steps:
            raise RuntimeError(f"no timed step: {len(self.marks) - 1} steps ran, warmup={warmup}")
        out = {"step_s": statistics.median(steps), "steps_s": steps, "all_steps_s": every}
        if rollouts:
            out["rollout_s"] = statistics.median(rollouts)
            out["update_s"] = statistics.median([s - r for s, r in zip(steps, rollouts)])
        return out


def compile_warmup_seconds(all_steps_s: list[float], full_speed_s: float) -> float:
    """Seconds from the start of the first step to the start of the first step within
    :data:`FULL_SPEED_TOLERANCE` of ``full_speed_s`` (the sum of the slower steps before it)."""
    spent = 0.0
    for seconds in all_steps_s:
        if seconds <= (1 + FULL_SPEED_TOLERANCE) * full_speed_s:
            return spent
        spent += seconds
    return spent


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def make_trainer(device: torch.device, precision: str, batches: int, callbacks: list, devices: int = 1,
                 strategy="auto") -> L.Trainer:
    """The benchmarks' Trainer: ``batches`` training batches, one epoch, no logging, checkpoints or validation."""
    return L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=devices, strategy=strategy,
                     precision=precision, max_epochs=1, limit_train_batches=batches, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks)


def cache_files(directory: Optional[str]) -> Optional[int]:
    """Files in the compile cache directory (None when there is none)."""
    if not directory or not Path(directory).is_dir():
        return None
    return sum(len(files) for _, _, files in os.walk(directory))


def fit_and_time(method: str, spec: Spec, args, *, precision: str, runtime: dict, plain_adamw: bool = False,
                 warmup: int, steps: int) -> dict:
    """Build ``method``'s module with ``runtime``, fit it for ``warmup + steps`` batches and time the steps
    (``plain_adamw``: torch's default foreach AdamW instead of the methods' fused one)."""
    device = args.device
    torch._dynamo.reset()  # every method compiles for itself (the on-disk cache may still hold its kernels)
    files = cache_files(os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
    module = build_module(method, spec, device, runtime=runtime, tiny=args.tiny)
    if plain_adamw:
        def make_optimizer(params, lr=None, _m=module):
            return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr or _m.optim.lr, betas=_m.optim.betas,
                                     weight_decay=_m.optim.weight_decay)
        module.make_optimizer = make_optimizer
    clock = Clock(device.type == "cuda")
    timer = StepTimer(module, clock)
    trainer = make_trainer(device, precision, warmup + steps, [timer])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer.fit(module, make_loader(method, spec, warmup + steps))
        out = timer.result(warmup)
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        out["compile"] = module.compile_mode()
        out["compile_cache_files"] = files
        out["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()
                          if k in ("train/approx_kl", "train/clipfrac", "train/kl", "train/policy_loss")}
        return out
    finally:
        del module, trainer, timer
        free_memory()


def with_checkpointing_fallback(run: Callable[[bool], dict], mode: str, what: str) -> dict:
    """``run(gradient_checkpointing)``; with ``mode="auto"`` retried with checkpointing after out-of-memory."""
    choices = {"on": [True], "off": [False], "auto": [False, True]}[mode]
    for i, gc_on in enumerate(choices):
        try:
            out = run(gc_on)
            out["gradient_checkpointing"] = gc_on
            return out
        except Exception as error:  # noqa: BLE001 - out-of-memory comes wrapped by Lightning at times
            if not is_oom(error) or i == len(choices) - 1:
                raise
            say(f"  {what}: out of memory without gradient checkpointing; retrying with it")
        free_memory()
    raise AssertionError


# -- FLOPs -------------------------------------------------------------------------------------------
def _count(fn: Callable[[], torch.Tensor], backward: bool) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        with torch.set_grad_enabled(backward):
            out = fn()
            if backward:
                out.float().pow(2).mean().backward()
    return counter.get_total_flops()


def flop_counts(method: str, spec: Spec) -> dict:
    """Per-image model FLOPs on the meta device: ``fwd`` / ``fwd_bwd`` of the denoiser at the batch sizes
    used; for NoDistill also its classifier (``cls_fwd_bwd``: parameters trained; ``cls_input_bwd``: forward
    plus the backward to its input only, as in the generator update)."""
    model = stub_model(spec, "meta")
    rl = method in RL_METHODS
    fwd_batch = spec.rollout_batch if rl else spec.one_step_batch
    bwd_batch = spec.minibatch if rl else spec.one_step_batch

    def call(m, batch, requires_grad=False):
        x = torch.randn((batch,) + spec.sample_shape, device="meta", requires_grad=requires_grad)
        t = torch.full((batch,), 500.0, device="meta")
        if spec.family == "vp":
            t = t.long()
        return lambda: m(x, t, model.encode_prompts([""] * batch))  # DiffusionModel / classifier signature

    counts = {"fwd": _count(call(model, fwd_batch), False) / fwd_batch,
              "fwd_bwd": _count(call(model, bwd_batch), True) / bwd_batch}
    if method == "nodistill":
        from lit_distill.models import DensityRatioClassifier
        from lit_distill.methods.one_step import trainable_copy

        with torch.device("meta"):
            classifier = DensityRatioClassifier(trainable_copy(model.freeze_(), "teacher"))
        b = spec.one_step_batch
        counts["cls_fwd_bwd"] = _count(call(classifier, 2 * b), True) / (2 * b)
        classifier.requires_grad_(False)
        counts["cls_input_bwd"] = _count(call(classifier, b, requires_grad=True), True) / b
    return counts


def model_flops(method: str, spec: Spec, c: dict) -> tuple[Optional[float], float]:
    """``(rollout FLOPs, update FLOPs)`` of one training step (no CFG, no reference KL):

    teacher_rl: rollout N*B*fwd; update pairs*fwd_bwd (pairs = B*N).
    opd:        rollout N*B*fwd; update pairs*(fwd_bwd + fwd) (the routed teacher's forward per pair).
    disback:    auxiliary: generator fwd + fake-score fwd_bwd; generator: generator fwd_bwd + fake and real
                score fwd: B*(3 fwd + 2 fwd_bwd).
    nodistill:  auxiliary: generator fwd + classifier fwd_bwd on 2B (real + fake); generator: generator
                fwd_bwd + classifier forward and input-backward: B*(fwd + 2 cls_fwd_bwd + fwd_bwd + cls_input_bwd).
    pretrain:   B*fwd_bwd.
    """
    n, b = spec.num_steps, images_per_step(method, spec)
    if method == "teacher_rl":
        return n * b * c["fwd"], n * b * c["fwd_bwd"]
    if method == "opd":
        return n * b * c["fwd"], n * b * (c["fwd_bwd"] + c["fwd"])
    if method == "disback":
        return None, b * (3 * c["fwd"] + 2 * c["fwd_bwd"])
    if method == "nodistill":
        return None, b * (c["fwd"] + 2 * c["cls_fwd_bwd"] + c["fwd_bwd"] + c["cls_input_bwd"])
    return None, b * c["fwd_bwd"]


def peak_matmul_tflops(device: torch.device) -> float:
    """Median rate of a large matmul (bf16 8192^3 on a GPU, fp32 1024^3 on the CPU), rotating over three
    random input pairs (no zeros, no single cached pair)."""
    cuda = device.type == "cuda"
    n, dtype, reps = (8192, torch.bfloat16, 30) if cuda else (1024, torch.float32, 5)
    gen = torch.Generator(device).manual_seed(0)
    pairs = [(torch.randn(n, n, device=device, dtype=dtype, generator=gen),
              torch.randn(n, n, device=device, dtype=dtype, generator=gen)) for _ in range(3)]
    clock, times = Clock(cuda), []
    for i in range(reps + 5):
        a, b = pairs[i % 3]
        start = clock.mark()
        torch.mm(a, b)
        end = clock.mark()
        if i >= 5:
            times.append((start, end))
    clock.finish()
    seconds = statistics.median(clock.seconds(a, b) for a, b in times)
    del pairs
    free_memory()
    return 2 * n**3 / seconds / 1e12


# -- the reference loops of TeacherRL / OPD ------------------------------------------------------------
class ReferenceRL:
    """What the reference loops share: the trained net (fp32 weights) and OPD's frozen teachers, fixed random
    conditioning, diffusers' scheduler of the spec, and one reverse step as a Gaussian (mean, std) written the
    way ddpo-pytorch (DDIM with eta) and Flow-GRPO (the flow SDE step) write it."""

    def __init__(self, spec: Spec, method: str, device, teacher_dtype: torch.dtype):
        self.spec, self.method, self.device = spec, method, device
        self.cuda = device.type == "cuda"
        self.net = build_net(spec, device)
        self.teachers = ([nn.Module.to(copy.deepcopy(self.net), teacher_dtype).requires_grad_(False).eval() for _ in range(2)]
                         if method == "opd" else [])
        gen = torch.Generator("cpu").manual_seed(0)
        b = spec.rollout_batch
        self.cond = {k: torch.randn((b,) + tuple(s), generator=gen).to(device) for k, s in spec.cond_shapes.items()}
        self.gen = torch.Generator(device).manual_seed(0)
        if spec.family == "vp":
            from diffusers import DDIMScheduler

            self.sched = DDIMScheduler.from_config(spec.scheduler_config)
        else:
            from diffusers import FlowMatchEulerDiscreteScheduler

            self.sched = FlowMatchEulerDiscreteScheduler.from_config(spec.scheduler_config)
        self.sched.set_timesteps(spec.num_steps, device=device)
        self.timesteps = self.sched.timesteps

    def predict(self, net, x, t, cond):
        return net(x, timestep=t, **cond, return_dict=False)[0]

    def mean_std(self, pred, x, index: torch.Tensor):
        """Kernel mean and std at step indices ``index [B]`` (per sample)."""
        shape = (-1,) + (1,) * (x.ndim - 1)
        if self.spec.family == "vp":
            s = self.sched
            t = s.timesteps[index]
            prev_t = t - s.config.num_train_timesteps // s.num_inference_steps
            ac = s.alphas_cumprod.to(x.device)
            a_t = ac[t].view(shape)
            a_prev = torch.where(prev_t >= 0, ac[prev_t.clamp_min(0)], torch.as_tensor(s.final_alpha_cumprod, device=x.device)).view(shape)
            variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
            std = self.spec.noise_level * variance.sqrt()
            x0 = (x - (1 - a_t).sqrt() * pred) / a_t.sqrt()
            mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * pred
            return mean, std
        sigmas = self.sched.sigmas.to(x.device)
        sigma, sigma_prev, sigma_max = sigmas[index].view(shape), sigmas[index + 1].view(shape), sigmas[1]
        dt = sigma_prev - sigma
        std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * self.spec.noise_level
        mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + pred * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
        return mean, std_dev_t * torch.sqrt(-dt)

    def log_prob(self, x_next, mean, std):
        """Per-element mean of the Gaussian log-density (ddpo-pytorch's and Flow-GRPO's reduction)."""
        std = std.expand_as(mean)
        return (-((x_next - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3))

    def advantages(self, sample: torch.Tensor) -> torch.Tensor:
        """Group-standardised advantages of the "brightness" reward read on the latents."""
        rewards = -((sample.clamp(-1, 1) + 1) / 2).mean(dim=(1, 2, 3)).sub(0.5).abs()
        groups = rewards.view(-1, self.spec.group)
        return ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).view(-1)

    def teacher_targets(self, x, t, steps, rows, cond) -> torch.Tensor:
        """OPD: each pair's routed teacher's kernel mean (tasks alternate a / b by prompt), no gradient."""
        task = (rows // self.spec.group) % 2
        target = torch.empty_like(x)
        with torch.no_grad(), self.autocast():
            for k, teacher in enumerate(self.teachers):
                sel = task == k
                if bool(sel.any()):
                    pick = {key: v[sel] for key, v in cond.items()}
                    pred = self.predict(teacher, x[sel], t[sel], pick).float()
                    target[sel] = self.mean_std(pred, x[sel], steps[sel])[0]
        return target

    def autocast(self):
        """The autocast region of the forwards (none here: fp32)."""
        return contextlib.nullcontext()

    def halving_on_oom(self, work: Callable[[], Any], what: str) -> Any:
        """``work()``, retried with ``self.micro`` (samples per forward pass) halved after each out-of-memory
        error, down to 1."""
        while True:
            try:
                return work()
            except torch.OutOfMemoryError:
                self.opt.zero_grad(set_to_none=True)
                free_memory()
                if self.micro == 1:
                    raise
                self.micro //= 2
                say(f"  {what} {self.method}: out of memory; forward passes of {self.micro} samples")

    @staticmethod
    def policy_loss(log_prob, old_log_prob, adv) -> torch.Tensor:
        """TeacherRL's PPO-clipped loss (clip range 0.2, advantages clipped to 5)."""
        ratio = torch.exp(log_prob - old_log_prob)
        adv = adv.clamp(-5, 5)
        return torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()

    @staticmethod
    def distill_loss(mean, target) -> torch.Tensor:
        """OPD's per-step loss with the default ``step_weighting="mean"`` and ``reduction="mean"``: mean matching."""
        return (mean - target).pow(2).mean()


class PeerRL(ReferenceRL):
    """ddpo-pytorch's / Flow-GRPO's training loop on the spec's model and workload (see the module docstring): bf16
    autocast over fp32 weights, the log-prob returned by the sampling step, gradient accumulation over the timesteps
    of each train batch of ``spec.minibatch`` samples, one fused-AdamW step per batch."""

    def __init__(self, spec: Spec, method: str, device, autocast: bool):
        super().__init__(spec, method, device, torch.bfloat16 if autocast else torch.float32)
        self.autocast_on = autocast
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-5, fused=self.cuda)
        self.micro = spec.minibatch  # samples per forward; halved on out-of-memory (accumulating over them)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast_on)

    def step_with_logprob(self, pred, x, index, prev=None):
        """The next latent (drawn unless ``prev`` is given) and its log-probability: one call, as the peers' step."""
        mean, std = self.mean_std(pred.float(), x.float(), index)
        if prev is None:
            prev = mean + std * torch.randn(mean.shape, device=mean.device, generator=self.gen)
        return prev, self.log_prob(prev, mean, std), mean, std

    @torch.no_grad()
    def rollout(self):
        b = self.spec.rollout_batch
        x = torch.randn((b,) + self.spec.sample_shape, device=self.device, generator=self.gen)
        latents, log_probs = [x], []
        for i, t in enumerate(self.timesteps):
            with self.autocast():
                pred = self.predict(self.net, x, t.expand(b), self.cond)
            x, log_prob, _, _ = self.step_with_logprob(pred, x, torch.full((b,), i, device=self.device))
            latents.append(x)
            log_probs.append(log_prob)
        return torch.stack(latents, dim=1), torch.stack(log_probs, dim=1)  # [B, N+1, ...], [B, N]

    def train(self, latents, old_logp, adv) -> None:
        """One inner epoch: samples shuffled, each sample's timesteps in its own random order; per train batch of
        ``spec.minibatch`` samples a forward/backward per timestep (and per micro-batch), one optimiser step."""
        b, n = old_logp.shape
        order = torch.randperm(b, device=self.device, generator=self.gen)
        times = torch.stack([torch.randperm(n, device=self.device, generator=self.gen) for _ in range(b)])
        for group in order.split(self.spec.minibatch):
            self.opt.zero_grad(set_to_none=True)
            for rows in group.split(self.micro):
                cond = {k: v[rows] for k, v in self.cond.items()}
                for j in range(n):
                    steps = times[rows, j]
                    x, x_next = latents[rows, steps], latents[rows, steps + 1]
                    t = self.timesteps[steps]
                    target = self.teacher_targets(x, t, steps, rows, cond) if self.teachers else None
                    with self.autocast():
                        pred = self.predict(self.net, x, t, cond)
                    _, log_prob, mean, std = self.step_with_logprob(pred, x, steps, prev=x_next)
                    loss = (self.policy_loss(log_prob, old_logp[rows, steps], adv[rows]) if target is None
                            else self.distill_loss(mean, target))
                    (loss * len(rows) / len(group) / n).backward()  # accelerate's division by the accumulation
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
            self.opt.step()

    def run(self, warmup: int, steps: int) -> dict:
        clock, times = Clock(self.cuda), []
        for k in range(warmup + steps):
            start = clock.mark()
            latents, old_logp = self.rollout()
            middle = clock.mark()
            adv = self.advantages(latents[:, -1])
            self.halving_on_oom(lambda: self.train(latents, old_logp, adv), "peer")
            if k >= warmup:
                times.append((start, middle, clock.mark()))
        clock.finish()
        rollout_s = statistics.median(clock.seconds(a, b) for a, b, _ in times)
        update_s = statistics.median(clock.seconds(b, c) for _, b, c in times)
        step_s = statistics.median(clock.seconds(a, c) for a, _, c in times)
        return {"rollout_s": rollout_s, "update_s": update_s, "step_s": step_s, "microbatch": self.micro,
                "optimizer_steps_per_step": math.ceil(self.spec.rollout_batch / self.spec.minibatch),
                "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None}


class Fp32LoopRL(ReferenceRL):
    """The fp32 loop of earlier versions (an extra row, not a peer): diffusers' stock step in the rollout (VP) or
    the Flow-GRPO step inline (flow), TeacherRL's log-probs in a second no-grad pass, then updates over the same
    (sample, step) pairs in minibatches of ``spec.minibatch`` with non-fused AdamW, micro-batches halved on
    out-of-memory."""

    def __init__(self, spec: Spec, method: str, device):
        super().__init__(spec, method, device, torch.float32)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-5)  # default (foreach), not fused
        self.micro = spec.minibatch

    @torch.no_grad()
    def rollout(self) -> list[torch.Tensor]:
        b, s = self.spec.rollout_batch, self.sched
        x = torch.randn((b,) + self.spec.sample_shape, device=self.device, generator=self.gen)
        xs = [x]
        for i, t in enumerate(self.timesteps):
            pred = self.predict(self.net, x, t.expand(b), self.cond)
            if self.spec.family == "vp":
                x = s.step(pred, t, x, eta=self.spec.noise_level, generator=self.gen).prev_sample
            else:
                mean, std = self.mean_std(pred, x, torch.full((b,), i, device=self.device))
                x = mean + std * torch.randn(x.shape, device=self.device, generator=self.gen)
            xs.append(x)
        return xs

    @torch.no_grad()
    def logprob_pass(self, xs) -> torch.Tensor:
        b, out = self.spec.rollout_batch, []
        for i, t in enumerate(self.timesteps):
            pred = self.predict(self.net, xs[i], t.expand(b), self.cond)
            mean, std = self.mean_std(pred, xs[i], torch.full((b,), i, device=self.device))
            out.append(self.log_prob(xs[i + 1], mean, std))
        return torch.stack(out, dim=1)

    def update_chunk(self, latents, rows, steps, old_logp, adv) -> None:
        """One optimiser step over the pairs ``(rows, steps)``, in micro-batches with gradient accumulation."""
        self.opt.zero_grad(set_to_none=True)
        n = len(rows)
        for mr, ms in zip(rows.split(self.micro), steps.split(self.micro)):
            x, x_next = latents[mr, ms], latents[mr, ms + 1]
            t = self.timesteps[ms]
            cond = {k: v[mr] for k, v in self.cond.items()}
            target = self.teacher_targets(x, t, ms, mr, cond) if self.teachers else None
            mean, std = self.mean_std(self.predict(self.net, x, t, cond), x, ms)
            loss = (self.policy_loss(self.log_prob(x_next, mean, std), old_logp[mr, ms], adv[mr]) if target is None
                    else self.distill_loss(mean, target))
            (loss * len(mr) / n).backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.opt.step()

    def run(self, chunks_to_time: int, all_chunks: bool) -> dict:
        spec, clock = self.spec, Clock(self.cuda)
        b, n = spec.rollout_batch, spec.num_steps
        with torch.no_grad():  # warm-up: kernels, handles
            self.predict(self.net, torch.randn((b,) + spec.sample_shape, device=self.device), self.timesteps[:1].expand(b),
                         self.cond)
        clock.finish()
        t0 = clock.mark()
        xs = self.rollout()
        latents = torch.stack(xs, dim=1)  # [B, N+1, C, H, W], as ddpo-pytorch keeps them
        t1 = clock.mark()
        old_logp = self.logprob_pass(xs) if self.method == "teacher_rl" else None
        t2 = clock.mark()
        adv = self.advantages(xs[-1])
        gen = torch.Generator().manual_seed(0)
        rows = torch.arange(b).repeat_interleave(n)
        steps = torch.arange(n).repeat(b)
        chunks = torch.randperm(len(rows), generator=gen).split(spec.minibatch)
        todo = len(chunks) if all_chunks else min(len(chunks), chunks_to_time)
        chunk_times = []
        for chunk in chunks[:todo]:
            def timed_update(chunk=chunk) -> tuple:
                start = clock.mark()
                self.update_chunk(latents, rows[chunk].to(self.device), steps[chunk].to(self.device), old_logp, adv)
                return start, clock.mark()

            chunk_times.append(self.halving_on_oom(timed_update, "fp32 loop"))
        clock.finish()
        rollout_s, logprob_s = clock.seconds(t0, t1), clock.seconds(t1, t2)
        per_chunk = [clock.seconds(a, c) for a, c in chunk_times]
        timed = per_chunk[1:] or per_chunk  # the first allocates the optimizer state
        update_s = statistics.median(timed) * len(chunks)
        return {"rollout_s": rollout_s, "logprob_pass_s": logprob_s, "update_s": update_s,
                "step_s": rollout_s + logprob_s + update_s, "microbatch": self.micro,
                "update_chunks_timed": len(timed), "update_chunks": len(chunks),
                "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None}


def peer_reference(method: str, spec: Spec, args) -> dict:
    """The peers' loop on ``method``'s workload (see the module docstring)."""
    if args.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if method in RL_METHODS:
        runner = PeerRL(spec, method, args.device, autocast=args.precision == "bf16-mixed")
        try:
            return runner.run(warmup=1, steps=max(1, args.peer_steps))
        finally:
            del runner
            free_memory()
    out = with_checkpointing_fallback(
        lambda gc_on: fit_and_time(method, spec, args, precision=args.precision,
                                   runtime={**PLAIN_RUNTIME, "gradient_checkpointing": gc_on}, plain_adamw=True,
                                   warmup=1, steps=max(1, args.peer_steps)),
        args.gradient_checkpointing, f"peer {method}")
    out.pop("metrics", None)
    return out


def fp32_reference(method: str, spec: Spec, args) -> dict:
    """The fp32 loop of earlier versions (``--fp32-loop``): an extra row, not a peer."""
    if args.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if method in RL_METHODS:
        runner = Fp32LoopRL(spec, method, args.device)
        try:
            return runner.run(args.fp32_chunks, all_chunks=args.tiny)
        finally:
            del runner
            free_memory()
    out = with_checkpointing_fallback(
        lambda gc_on: fit_and_time(method, spec, args, precision="32-true",
                                   runtime={**PLAIN_RUNTIME, "gradient_checkpointing": gc_on}, plain_adamw=True,
                                   warmup=1, steps=max(1, args.peer_steps)),
        args.gradient_checkpointing, f"fp32 loop {method}")
    out.pop("metrics", None)
    return out


# -- one method --------------------------------------------------------------------------------------
def compiles(args) -> bool:
    """Whether this run's modules compile (``runtime.compile`` resolved as the methods resolve ``"auto"``)."""
    mode = args.runtime.get("compile", "auto")
    if isinstance(mode, bool):
        mode = "full" if mode else "off"
    return args.device.type == "cuda" if mode == "auto" else mode != "off"


def default_steps(method: str, args) -> tuple[int, int]:
    """(warmup, timed) steps: TeacherRL / OPD 1 + 2, one-step 2 + 5, pretrain 3 + 10 unless given; two more warm-up
    steps when the modules compile (the first step compiles training and rollout graphs, the next may recompile)."""
    warmup, steps = {"teacher_rl": (1, 2), "opd": (1, 2), "disback": (2, 5), "nodistill": (2, 5)}.get(method, (3, 10))
    if args.tiny:
        warmup, steps = 1, 2
    elif compiles(args):
        warmup += 2
    return (args.warmup if args.warmup is not None else warmup), (args.steps if args.steps is not None else steps)


def bench_method(method: str, spec: Spec, args, peak_tflops: float) -> dict:
    warmup, steps = default_steps(method, args)
    held = f", {torch.cuda.memory_allocated() / 2**30:.1f} GiB still allocated" if args.device.type == "cuda" else ""
    say(f"{spec.key}/{method}: ours ({args.precision}, runtime {args.runtime or 'defaults'}), "
        f"{warmup} warm-up + {steps} timed steps{held}")
    t_start = time.time()
    ours = with_checkpointing_fallback(
        lambda gc_on: fit_and_time(method, spec, args, precision=args.precision,
                                   runtime={**args.runtime, "gradient_checkpointing": gc_on}, warmup=warmup, steps=steps),
        args.gradient_checkpointing, f"{spec.key}/{method}")
    say(f"  step {ours['step_s']:.3f} s (rollout {ours.get('rollout_s', 0):.3f} s), peak "
        f"{ours['peak_mem_gib'] or 0:.1f} GiB, compile {ours['compile']}, gradient checkpointing "
        f"{ours['gradient_checkpointing']}, {time.time() - t_start:.0f} s wall")
    references = {}
    for name, measure, wanted in (("peer", peer_reference, not args.no_peer), ("fp32_loop", fp32_reference, args.fp32_loop)):
        if not wanted:
            continue
        t_start = time.time()
        say(f"{spec.key}/{method}: {'peer loop' if name == 'peer' else 'fp32 loop (extra row)'}")
        try:
            references[name] = measure(method, spec, args)
            say(f"  {name} step {references[name]['step_s']:.3f} s, {time.time() - t_start:.0f} s wall")
        except Exception as error:  # noqa: BLE001 - keep our figures, record why the reference is missing
            references[name] = {"error": f"{type(error).__name__}: {error}"[:500]}
            say(f"  {name} FAILED: {references[name]['error']}")
            free_memory()
    images = images_per_step(method, spec)
    try:
        counts = flop_counts(method, spec)
        flops_rollout, flops_update = model_flops(method, spec, counts)
    except Exception as error:  # noqa: BLE001 - no MFU rather than no figures
        say(f"  FLOP count FAILED: {type(error).__name__}: {error}")
        counts, flops_rollout, flops_update = {}, None, None
    peak = peak_tflops * 1e12

    def rates(run: Optional[dict]) -> dict:
        """images/s and MFU of one run's phases (None where it has no such phase or failed)."""
        if not run or "error" in run:
            return dict.fromkeys(("images_per_s", "rollout_images_per_s", "update_images_per_s", "mfu_rollout",
                                  "mfu_update", "peak_mem_gib"))
        rollout_s, update_s = run.get("rollout_s"), run.get("update_s", run["step_s"])
        if run.get("logprob_pass_s"):  # the fp32 loop's second pass belongs to its update
            update_s += run["logprob_pass_s"]
        return {"images_per_s": images / run["step_s"],
                "rollout_images_per_s": images / rollout_s if rollout_s else None,
                "update_images_per_s": images / update_s,
                "mfu_rollout": flops_rollout / rollout_s / peak if rollout_s and flops_rollout else None,
                "mfu_update": flops_update / update_s / peak if flops_update else None,
                "peak_mem_gib": run.get("peak_mem_gib")}

    mine, peer, fp32 = rates(ours), rates(references.get("peer")), rates(references.get("fp32_loop"))
    warmup_s = compile_warmup_seconds(ours["all_steps_s"], ours["step_s"]) if ours["compile"] != "off" else 0.0
    entry = {
        **mine,
        "peer_images_per_s": peer["images_per_s"],
        "speedup_vs_peer": mine["images_per_s"] / peer["images_per_s"] if peer["images_per_s"] else None,
        "compile_warmup_s": warmup_s,
        "peer_rollout_images_per_s": peer["rollout_images_per_s"], "peer_update_images_per_s": peer["update_images_per_s"],
        "peer_mfu_rollout": peer["mfu_rollout"], "peer_mfu_update": peer["mfu_update"],
        "peer_peak_mem_gib": peer["peak_mem_gib"],
        "more_memory_than_peer": (mine["peak_mem_gib"] > peer["peak_mem_gib"]
                                  if mine["peak_mem_gib"] is not None and peer["peak_mem_gib"] is not None else None),
        "fp32_loop_images_per_s": fp32["images_per_s"],
        "speedup_vs_fp32_loop": mine["images_per_s"] / fp32["images_per_s"] if fp32["images_per_s"] else None,
        "images_per_step": images, "step_s": ours["step_s"], "rollout_s": ours.get("rollout_s"),
        "update_s": ours.get("update_s", ours["step_s"]), "steps_s": ours["steps_s"], "all_steps_s": ours["all_steps_s"],
        "warmup_steps": warmup, "timed_steps": steps, "compile": ours["compile"],
        "compile_cache_files": ours["compile_cache_files"], "gradient_checkpointing": ours["gradient_checkpointing"],
        "runtime": dict(args.runtime), "precision": args.precision, "peak_tflops": peak_tflops,
        "tflop_per_step": {"rollout": flops_rollout and flops_rollout / 1e12, "update": flops_update and flops_update / 1e12},
        "tflop_per_image": {k: v / 1e12 for k, v in counts.items()},
        "diagnostics": ours.get("metrics", {}), **references,
    }
    say(f"  {method}: {entry['images_per_s']:.2f} images/s"
        + (f", peer {entry['peer_images_per_s']:.2f} ({entry['speedup_vs_peer']:.2f}x)" if entry["peer_images_per_s"] else "")
        + (f", MFU update {entry['mfu_update']:.1%}" if entry["mfu_update"] is not None else "")
        + (f", rollout {entry['mfu_rollout']:.1%}" if entry["mfu_rollout"] is not None else "")
        + (f", compile warm-up {warmup_s:.0f} s" if ours["compile"] != "off" else ""))
    return entry


# -- profile -----------------------------------------------------------------------------------------
class ProfileStep(L.Callback):
    """``torch.profiler`` around training step ``at`` (after warm-up); the operator table goes to ``path``."""

    def __init__(self, at: int, path: str):
        self.at, self.path, self.prof = at, path, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.at:
            from torch.profiler import ProfilerActivity, profile

            cuda = pl_module.device.type == "cuda"
            self.prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
            self.prof.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.at and self.prof is not None:
            cuda = pl_module.device.type == "cuda"
            if cuda:
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            table = self.prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=40, max_name_column_width=60)
            Path(self.path).write_text(table)
            say(f"wrote the profile of step {self.at} to {self.path}")


def profile_method(method: str, spec: Spec, args) -> None:
    """One profiled training step of ``method`` (with ``--runtime``'s settings) after the warm-up steps (one, or three
    when the modules compile)."""
    warmup = 3 if compiles(args) else 1
    runtime = {**args.runtime, "gradient_checkpointing": args.gradient_checkpointing == "on"}
    module = build_module(method, spec, args.device, runtime=runtime, tiny=args.tiny)
    make_trainer(args.device, args.precision, warmup + 1, [ProfileStep(warmup, args.profile_out)]).fit(
        module, make_loader(method, spec, warmup + 1))


# -- DDP scaling ---------------------------------------------------------------------------------------
def ddp_scaling(args) -> dict:
    """TeacherRL on the UNet with 1 and 2 GPUs at the same per-GPU batch (32 rollouts), each a fresh process, with
    this run's ``--runtime`` settings (the defaults: regional compilation on CUDA)."""
    count = torch.cuda.device_count()
    if count < 2 and not args.tiny:
        raise SystemExit(f"--ddp-scaling needs 2 GPUs; this machine has {count}")
    previous = json.loads(Path(args.out).read_text()).get("figures", {}) if Path(args.out).is_file() else {}
    gc_mode = args.gradient_checkpointing
    if gc_mode == "auto":  # the single-GPU run found out; else checkpoint (a rank out of memory hangs the other)
        known = previous.get("methods", {}).get("teacher_rl", {}).get("gradient_checkpointing")
        gc_mode = "off" if known is False else "on"
    from scaling import run_point  # one launcher of multi-process measurements (benchmarks/scaling.py)

    warmup, steps = default_steps("teacher_rl", args)
    results = {}
    for devices in (1, 2):
        say(f"DDP: TeacherRL on the UNet with {devices} GPU(s)")
        results[devices] = run_point("teacher_rl", "ddp", devices, Path(args.out).parent, tiny=args.tiny,
                                     warmup=warmup, steps=steps, gradient_checkpointing=gc_mode == "on",
                                     precision=args.precision, runtime=args.runtime)
        say(f"  {devices} GPU(s): {results[devices]['images_per_s']:.2f} images/s")
    ips = {str(d): r["images_per_s"] for d, r in results.items()}
    return {"ddp_scaling": ips, "ddp_method": "teacher_rl",
            "ddp_details": {"model": model_specs(args.tiny)["unet"].label,
                            "per_gpu_images_per_step": model_specs(args.tiny)["unet"].rollout_batch,
                            "strategy": "DiffusionDDPStrategy", "gradient_checkpointing": gc_mode == "on",
                            "runtime": dict(args.runtime), "scaling_efficiency": ips["2"] / (2 * ips["1"]),
                            "step_s": {str(d): r["step_s"] for d, r in results.items()},
                            "peak_mem_gib": {str(d): r["peak_mem_gib"] for d, r in results.items()}}}


def parse_runtime(pairs: list[str]) -> dict[str, Any]:
    """``["compile=off", "rollout_cuda_graphs=true"]`` -> ``{"compile": "off", "rollout_cuda_graphs": True}``
    (values read as JSON where they parse, else as strings); names are checked against ``Runtime``."""
    from dataclasses import fields

    from lit_distill.methods.settings import Runtime

    known, out = {f.name for f in fields(Runtime)}, {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in known:
            raise SystemExit(f"--runtime {pair!r}: give NAME=VALUE with NAME one of {sorted(known)}")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    Runtime(**out)  # bad values fail here, naming the field
    return out


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["unet", "sd3", "all"], default="all")
    parser.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=list(ALL_METHODS))
    parser.add_argument("--steps", type=int, default=None, help="timed steps per method (default 2 RL, 5 one-step, 10 pretrain)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per method (default 1 RL, 2 one-step, "
                        "3 pretrain; 2 more when the modules compile)")
    parser.add_argument("--runtime", nargs="*", default=[], metavar="NAME=VALUE",
                        help="runtime settings of the methods (e.g. compile=off, rollout_cuda_graphs=true, "
                             "norm_precision=float32); needs --variant")
    parser.add_argument("--variant", default=None, help="label of a --runtime variant: its results go under "
                        "methods_LABEL / methods_sd3_LABEL")
    parser.add_argument("--gradient-checkpointing", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--precision", default=None, help="default bf16-mixed on GPU, 32-true with --tiny")
    parser.add_argument("--peer-steps", type=int, default=2, help="timed steps of the peer loops (after one warm-up)")
    parser.add_argument("--no-peer", action="store_true", help="skip the peer loop")
    parser.add_argument("--fp32-loop", action="store_true", help="also time the fp32 loop of earlier versions "
                        "(an extra row, not a peer)")
    parser.add_argument("--fp32-chunks", type=int, default=3, help="minibatches the fp32 loop's RL update is timed over")
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU in fp32 (smoke test)")
    parser.add_argument("--ddp-scaling", action="store_true", help="TeacherRL images/s on 1 and 2 GPUs (DDP)")
    parser.add_argument("--out", default=None, help=f"results JSON (default {DEFAULT_OUT.relative_to(ROOT)}; "
                                                    f"{TINY_OUT.relative_to(ROOT)} with --tiny)")
    parser.add_argument("--fresh", action="store_true", help="start a new results file instead of merging into --out")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite README.md and docs/ (implied by --tiny)")
    parser.add_argument("--profile", choices=ALL_METHODS, default=None, help="profile one step of this method on "
                        "--model (torch.profiler operator table to --profile-out) instead of timing")
    parser.add_argument("--profile-out", default="profile.txt")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds after which no further method "
                                                                         "is started (results are saved per method)")
    args = parser.parse_args(argv)
    args.runtime = parse_runtime(args.runtime)
    if args.runtime and not args.variant:
        parser.error("--runtime changes the default settings: name the variant with --variant LABEL")

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or pass --tiny for the CPU smoke test")
    args.device = torch.device("cpu") if args.tiny else torch.device("cuda")
    args.precision = args.precision or ("32-true" if args.tiny else "bf16-mixed")
    args.out = args.out or str(TINY_OUT if args.tiny else DEFAULT_OUT)
    if args.tiny:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.fresh:
        Path(args.out).unlink(missing_ok=True)

    if args.profile:
        profile_method(args.profile, model_specs(args.tiny)[args.model if args.model != "all" else "unet"], args)
        return
    started = time.time()
    if args.ddp_scaling:
        figures = ddp_scaling(args)
    else:
        specs = model_specs(args.tiny)
        keys = ["unet", "sd3"] if args.model == "all" else [args.model]
        say("measuring the matmul peak")
        peak = peak_matmul_tflops(args.device)
        say(f"  peak {peak:.1f} TFLOP/s ({'bf16' if args.device.type == 'cuda' else 'fp32 CPU'})")
        figures = {"peak_tflops": peak, "settings": {
            "precision": args.precision, "runtime": args.runtime, "variant": args.variant,
            "gradient_checkpointing": args.gradient_checkpointing,
            "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
            "torch": torch.__version__, "lightning": L.__version__}}
        for key in keys:
            spec = specs[key]
            figures["settings"][key] = {"batch": spec.rollout_batch, "prompts": spec.prompts, "group": spec.group,
                                        "minibatch": spec.minibatch, "num_steps": spec.num_steps,
                                        "noise_level": spec.noise_level, "one_step_batch": spec.one_step_batch,
                                        "sample_shape": list(spec.sample_shape),
                                        "cond_shapes": {k: list(v) for k, v in spec.cond_shapes.items()}}
            results = {}
            suffix = f"_{args.variant}" if args.variant else ""  # variants go beside the default settings
            figures[("methods" if key == "unet" else "methods_sd3") + suffix] = results
            figures["model" if key == "unet" else "model_sd3"] = spec.label
            for method in [m for m in args.methods if m in spec.methods]:
                if args.time_budget and time.time() - started > args.time_budget:
                    say(f"{key}/{method}: skipped (--time-budget {args.time_budget:.0f} s spent)")
                    continue
                try:
                    results[method] = bench_method(method, spec, args, peak)
                except Exception as error:  # noqa: BLE001 - record it, go on with the next method
                    say(f"  {key}/{method} FAILED: {type(error).__name__}: {error}")
                    results[method] = {"error": f"{type(error).__name__}: {error}"[:500]}
                    free_memory()
                # after every method, so that a run stopped by a time limit keeps what it measured
                write_results("throughput", figures, args.out, merge=True, merge_depth=2)
    figures["wall_seconds_last_run"] = time.time() - started
    write_results("throughput", figures, args.out, merge=True, merge_depth=2)  # method entries replaced
    if not (args.tiny or args.no_docs):
        report.write_all()
        say("updated README.md and docs/ from benchmarks/results/")
    say(f"done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()

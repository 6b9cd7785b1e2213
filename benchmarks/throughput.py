"""Training-step throughput of every method on real-size denoisers, against the loop a user would write.

What runs. Each method's REAL ``training_step`` (TeacherRL ``teacher_rl``, OPDStudent ``opd``, DisBackStudent
``disback``, NoDistillOneStep ``nodistill``, DiffusionPretrain ``pretrain``) through a Lightning
``Trainer(precision="bf16-mixed", accelerator="gpu", devices=1)`` on a dummy prompt / image dataloader, on
denoisers built from config with random weights:

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
``logprob_reduction="mean"`` as DDPO / Flow-GRPO. On SD3: 2 prompts x 8 = 16 images, Flow-GRPO noise level
0.7, minibatches of 16 (10 optimiser steps). DisBack (its backtracking stage: one fake-score DSM update and
one generator update per step) and NoDistillOneStep (one classifier update and one generator update per
step): 32 generated images per step. DiffusionPretrain: 32 training images per step. No classifier-free
guidance, no KL to a reference.

Timing (CUDA events, no host synchronisation inside the step). A callback records an event at every
``on_train_batch_start`` and at ``on_train_epoch_end``: step ``i`` lasts from start ``i`` to start ``i+1``
(the whole step: rollout, rewards, every update, the EMA, Lightning's per-batch work). The instance's
``sample_trajectories`` (the rollout) is wrapped with a pair of events; *update* = step - rollout (everything
else). Medians over the timed steps after ``warmup`` steps (compilation happens there). ``images_per_s`` =
images per step / step time; ``rollout_images_per_s`` and ``update_images_per_s`` likewise per phase.

MFU. Model FLOPs counted with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (no GPU time)
for one forward and one forward+backward of the denoiser at the batch sizes used (and of NoDistill's
classifier), combined per method in :func:`model_flops` (recomputation by gradient checkpointing is not
counted: this is MFU, not hardware utilisation), divided by the phase time and by ``peak_tflops``: a
large bf16 matmul timed in the same run.

The naive reference, in the same run on the same model, is what a user would otherwise write:
- TeacherRL / OPD: fp32, no autocast; a Python loop over the steps calling diffusers' ``DDIMScheduler.step
  (..., eta=1)`` (VP) or the Flow-GRPO SDE step written inline (flow: diffusers' Euler step is
  deterministic); for TeacherRL the old log-probs recomputed in a second no-grad pass over every step
  (the stock scheduler does not return them; ddpo-pytorch and Flow-GRPO avoid this pass with a custom step
  that returns the log-prob, so ``naive.logprob_pass_s`` is reported apart); then the update over the same
  (sample, step) pairs, minibatches of the same size, non-fused ``torch.optim.AdamW`` (the default foreach
  implementation), ``clip_grad_norm_``; gradient accumulation over micro-batches halved on out-of-memory,
  as a user would. Its update phase is timed over ``--naive-chunks`` minibatches (the first not counted:
  optimizer-state allocation) and scaled to all of them (``--naive-full`` runs them all).
- DisBack, NoDistillOneStep, DiffusionPretrain: the same module and losses in fp32 (``precision="32-true"``),
  non-fused AdamW, no compile.
TF32 flags are left at PyTorch's defaults (recorded in ``settings``).

Out of memory. With ``--gradient-checkpointing auto`` (default) a method that runs out of memory is rerun
with the method's ``gradient_checkpointing=True`` (recorded per method); the naive loops fall back to
micro-batches (TeacherRL / OPD) or gradient checkpointing (the others).

Usage (see docs/scaling.md; estimated GPU time of ``--model all``: 6-7 minutes on one H100, so run the two
models as two commands where a command is limited to 10 minutes):

    PYTHONUNBUFFERED=1 python benchmarks/throughput.py --model unet
    PYTHONUNBUFFERED=1 python benchmarks/throughput.py --model sd3
    PYTHONUNBUFFERED=1 python benchmarks/throughput.py --model unet --methods teacher_rl opd --compile --no-naive
    PYTHONUNBUFFERED=1 python benchmarks/throughput.py --ddp-scaling          # needs 2 GPUs
    python benchmarks/throughput.py --tiny                                   # CPU smoke test, ~20 s
    python benchmarks/report.py                                              # tables from the JSON

Compiled runs are stored beside the eager ones (``methods_compile``, ``methods_sd3_compile``).

Results: ``benchmarks/results/throughput.json`` (merged into an existing file, so the DDP part can come from
a separate run) and the ``throughput`` section of docs/benchmarks.md (not with ``--tiny``).
"""
from __future__ import annotations

import argparse
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
from typing import Callable, Optional

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
def build_module(method: str, spec: Spec, device, *, gradient_checkpointing: bool, compile: bool, tiny: bool):
    """The LightningModule of ``method`` on a stub-conditioned random model of ``spec``."""
    runtime = dict(compile=compile, gradient_checkpointing=gradient_checkpointing, seed=0)
    common = dict(runtime=runtime)
    model = stub_model(spec, device)
    sampling = {"num_steps": spec.num_steps, "noise_level": spec.noise_level, "rollouts_per_prompt": spec.group}
    if method == "teacher_rl":
        from lit_distill.methods.teacher_rl import TeacherRL

        return TeacherRL(model, "brightness", sampling=sampling, policy={"kl_weight": 0.0}, optim={"lr": 1e-5},
                         updates={"minibatch_size": spec.minibatch, "steps_per_sample": None, "reduction": "mean"},
                         **common)
    if method == "opd":
        from lit_distill.methods.opd import OPDStudent

        # Teachers given as DiffusionModel instances would be deep-copied into hparams by
        # save_hyperparameters (a full extra copy on the GPU): pass meta-device placeholders of the same spec
        # (cheap to copy, same schedule and sample shape for the compatibility check), then swap in bf16 copies.
        placeholder = stub_model(spec, "meta")
        module = OPDStudent(model, {"a": placeholder, "b": placeholder}, sampling=sampling, optim={"lr": 1e-5},
                            updates={"minibatch_size": spec.minibatch, "steps_per_sample": None, "reduction": "mean"},
                            **common)
        dtype = None if tiny else torch.bfloat16
        module.teachers = {name: model.copy_frozen(dtype) for name in ("a", "b")}
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
        self.clock.finish()
        steps = [self.clock.seconds(a, b) for a, b in zip(self.marks[:-1], self.marks[1:])][warmup:]
        rollouts = [self.clock.seconds(a, b) for a, b in self.rollouts][warmup:]
        if not steps:
            raise RuntimeError(f"no timed step: {len(self.marks) - 1} steps ran, warmup={warmup}")
        out = {"step_s": statistics.median(steps), "steps_s": steps}
        if rollouts:
            out["rollout_s"] = statistics.median(rollouts)
            out["update_s"] = statistics.median([s - r for s, r in zip(steps, rollouts)])
        return out


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


def fit_and_time(method: str, spec: Spec, args, *, precision: str, gradient_checkpointing: bool, compile: bool,
                 naive: bool = False, warmup: int, steps: int) -> dict:
    """Build ``method``'s module, fit it for ``warmup + steps`` batches and time the steps."""
    device = args.device
    module = build_module(method, spec, device, gradient_checkpointing=gradient_checkpointing, compile=compile,
                          tiny=args.tiny)
    if args.channels_last and not naive:  # an experiment: NHWC activations for cuDNN's convolutions
        for sub in module.modules():
            if isinstance(sub, DiffusionModel):
                sub.net.to(memory_format=torch.channels_last)
        for teacher in getattr(module, "teachers", {}).values():
            teacher.net.to(memory_format=torch.channels_last)
    if naive:  # the fp32 reference of the one-step methods and pretraining: non-fused AdamW
        def plain_adamw(params, lr=None, _m=module):
            return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr or _m.optim.lr, betas=_m.optim.betas,
                                     weight_decay=_m.optim.weight_decay)
        module.make_optimizer = plain_adamw
    clock = Clock(device.type == "cuda")
    timer = StepTimer(module, clock)
    trainer = make_trainer(device, precision, warmup + steps, [timer])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer.fit(module, make_loader(method, spec, warmup + steps))
        out = timer.result(warmup)
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
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


# -- the naive reference loops of TeacherRL / OPD ----------------------------------------------------------
class NaiveRL:
    """What a user writes with diffusers alone: fp32, the stock scheduler step (VP) or the Flow-GRPO SDE step
    inline (flow), log-probs in a second pass (TeacherRL), a plain AdamW update over the same pairs."""

    def __init__(self, spec: Spec, method: str, device, args):
        self.spec, self.method, self.device, self.args = spec, method, device, args
        self.net = build_net(spec, device)
        self.teachers = ([copy.deepcopy(self.net).requires_grad_(False).eval() for _ in range(2)]
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
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-5)  # default (foreach), not fused
        self.micro = spec.minibatch

    def predict(self, net, x, t, cond):
        return net(x, timestep=t, **cond, return_dict=False)[0]

    # one reverse step as a Gaussian: VP from the DDIM formulas (as ddpo-pytorch), flow as Flow-GRPO
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
        std = std.expand_as(mean)
        return (-((x_next - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3))

    @torch.no_grad()
    def rollout(self) -> list[torch.Tensor]:
        b, s = self.spec.rollout_batch, self.sched
        x = torch.randn((b,) + self.spec.sample_shape, device=self.device, generator=self.gen)
        xs = [x]
        for i, t in enumerate(s.timesteps):
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
        for i, t in enumerate(self.sched.timesteps):
            pred = self.predict(self.net, xs[i], t.expand(b), self.cond)
            mean, std = self.mean_std(pred, xs[i], torch.full((b,), i, device=self.device))
            out.append(self.log_prob(xs[i + 1], mean, std))
        return torch.stack(out, dim=1)

    def update_chunk(self, latents, rows, steps, old_logp, adv) -> None:
        """One optimiser step over the pairs ``(rows, steps)`` (CPU LongTensors), in micro-batches of
        ``self.micro`` with gradient accumulation. ``latents``: ``[B, N+1, C, H, W]``."""
        self.opt.zero_grad(set_to_none=True)
        n = len(rows)
        for mr, ms in zip(rows.split(self.micro), steps.split(self.micro)):
            x, x_next = latents[mr, ms], latents[mr, ms + 1]
            t = self.sched.timesteps[ms]
            cond = {k: v[mr] for k, v in self.cond.items()}
            mean, std = self.mean_std(self.predict(self.net, x, t, cond), x, ms)
            if self.method == "teacher_rl":
                ratio = torch.exp(self.log_prob(x_next, mean, std) - old_logp[mr, ms])
                a = adv[mr]
                loss = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a).mean()
            else:  # each pair's prompt task (alternating a / b) picks its teacher
                task = (mr // self.spec.group) % 2
                mean_t = torch.empty_like(mean)
                with torch.no_grad():
                    for k, teacher in enumerate(self.teachers):
                        sel = task == k
                        if bool(sel.any()):
                            pick = {key: v[sel] for key, v in cond.items()}
                            mean_t[sel] = self.mean_std(self.predict(teacher, x[sel], t[sel], pick), x[sel], ms[sel])[0]
                loss = ((mean - mean_t) ** 2 / (2 * std**2)).mean()
            (loss * len(mr) / n).backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.opt.step()

    def run(self) -> dict:
        spec, args, clock = self.spec, self.args, Clock(self.device.type == "cuda")
        b, n = spec.rollout_batch, spec.num_steps
        with torch.no_grad():  # warm-up: kernels, handles
            self.predict(self.net, torch.randn((b,) + spec.sample_shape, device=self.device),
                         self.sched.timesteps[:1].expand(b), self.cond)
        clock.finish()
        t0 = clock.mark()
        xs = self.rollout()
        latents = torch.stack(xs, dim=1)  # [B, N+1, C, H, W], as ddpo-pytorch keeps them
        t1 = clock.mark()
        old_logp = self.logprob_pass(xs) if self.method == "teacher_rl" else None
        t2 = clock.mark()
        rewards = -((xs[-1].clamp(-1, 1) + 1) / 2).mean(dim=(1, 2, 3)).sub(0.5).abs()
        groups = rewards.view(-1, spec.group)
        adv = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).view(-1)
        gen = torch.Generator().manual_seed(0)
        rows = torch.arange(b).repeat_interleave(n)
        steps = torch.arange(n).repeat(b)
        perm = torch.randperm(len(rows), generator=gen)
        chunks = perm.split(spec.minibatch)
        todo = len(chunks) if args.naive_full else min(len(chunks), args.naive_chunks)
        chunk_times = []
        for chunk in chunks[:todo]:
            while True:
                try:
                    start = clock.mark()
                    self.update_chunk(latents, rows[chunk], steps[chunk], old_logp, adv)
                    chunk_times.append((start, clock.mark()))
                    break
                except torch.OutOfMemoryError:
                    self.opt.zero_grad(set_to_none=True)
                    free_memory()
                    if self.micro == 1:
                        raise
                    self.micro //= 2
                    say(f"  naive {self.method}: out of memory; micro-batches of {self.micro}")
        clock.finish()
        rollout_s, logprob_s = clock.seconds(t0, t1), clock.seconds(t1, t2)
        per_chunk = [clock.seconds(a, c) for a, c in chunk_times]
        timed = per_chunk[1:] or per_chunk  # the first allocates the optimizer state
        update_s = statistics.median(timed) * len(chunks)
        return {"rollout_s": rollout_s, "logprob_pass_s": logprob_s, "update_s": update_s,
                "step_s": rollout_s + logprob_s + update_s, "microbatch": self.micro,
                "update_chunks_timed": len(timed), "update_chunks": len(chunks),
                "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else None}


def naive_reference(method: str, spec: Spec, args) -> dict:
    if args.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if method in RL_METHODS:
        runner = NaiveRL(spec, method, args.device, args)
        try:
            return runner.run()
        finally:
            del runner
            free_memory()
    warmup, steps = 1, max(1, args.naive_steps)
    out = with_checkpointing_fallback(
        lambda gc_on: fit_and_time(method, spec, args, precision="32-true", gradient_checkpointing=gc_on,
                                   compile=False, naive=True, warmup=warmup, steps=steps),
        args.gradient_checkpointing, f"naive {method}")
    out.pop("metrics", None)
    return out


# -- one method --------------------------------------------------------------------------------------
def default_steps(method: str, args) -> tuple[int, int]:
    """(warmup, timed) steps: TeacherRL / OPD 1 + 2, one-step 2 + 5, pretrain 3 + 10 unless given."""
    warmup, steps = {"teacher_rl": (1, 2), "opd": (1, 2), "disback": (2, 5), "nodistill": (2, 5)}.get(method, (3, 10))
    if args.tiny:
        warmup, steps = 1, 2
    if args.compile:
        warmup += 1
    return (args.warmup if args.warmup is not None else warmup), (args.steps if args.steps is not None else steps)


def bench_method(method: str, spec: Spec, args, peak_tflops: float) -> dict:
    warmup, steps = default_steps(method, args)
    held = f", {torch.cuda.memory_allocated() / 2**30:.1f} GiB still allocated" if args.device.type == "cuda" else ""
    say(f"{spec.key}/{method}: ours ({args.precision}{', compile' if args.compile else ''}), "
        f"{warmup} warm-up + {steps} timed steps{held}")
    t_start = time.time()
    ours = with_checkpointing_fallback(
        lambda gc_on: fit_and_time(method, spec, args, precision=args.precision, gradient_checkpointing=gc_on,
                                   compile=args.compile, warmup=warmup, steps=steps),
        args.gradient_checkpointing, f"{spec.key}/{method}")
    say(f"  step {ours['step_s']:.3f} s (rollout {ours.get('rollout_s', 0):.3f} s), peak "
        f"{ours['peak_mem_gib'] or 0:.1f} GiB, gradient checkpointing {ours['gradient_checkpointing']}, "
        f"{time.time() - t_start:.0f} s wall")
    naive, naive_error = None, None
    if not args.no_naive:
        t_start = time.time()
        say(f"{spec.key}/{method}: naive reference (fp32)")
        try:
            naive = naive_reference(method, spec, args)
            say(f"  naive step {naive['step_s']:.3f} s, {time.time() - t_start:.0f} s wall")
        except Exception as error:  # noqa: BLE001 - keep our figures, record why the reference is missing
            naive_error = f"{type(error).__name__}: {error}"[:500]
            say(f"  naive reference FAILED: {naive_error}")
            free_memory()
    images = images_per_step(method, spec)
    try:
        counts = flop_counts(method, spec)
        flops_rollout, flops_update = model_flops(method, spec, counts)
    except Exception as error:  # noqa: BLE001 - no MFU rather than no figures
        say(f"  FLOP count FAILED: {type(error).__name__}: {error}")
        counts, flops_rollout, flops_update = {}, None, None
    rollout_s = ours.get("rollout_s")
    update_s = ours.get("update_s", ours["step_s"])
    peak = peak_tflops * 1e12
    entry = {
        "images_per_s": images / ours["step_s"],
        "rollout_images_per_s": images / rollout_s if rollout_s else None,
        "update_images_per_s": images / update_s,
        "mfu_rollout": flops_rollout / rollout_s / peak if rollout_s and flops_rollout else None,
        "mfu_update": flops_update / update_s / peak if flops_update else None,
        "peak_mem_gib": ours["peak_mem_gib"],
        "naive_images_per_s": images / naive["step_s"] if naive else None,
        "speedup_vs_naive": naive["step_s"] / ours["step_s"] if naive else None,
        "images_per_step": images, "step_s": ours["step_s"], "rollout_s": rollout_s, "update_s": update_s,
        "steps_s": ours["steps_s"], "warmup_steps": warmup, "timed_steps": steps,
        "gradient_checkpointing": ours["gradient_checkpointing"], "compile": bool(args.compile),
        "precision": args.precision, "peak_tflops": peak_tflops, "tflop_per_step": {"rollout": flops_rollout and flops_rollout / 1e12,
                                                         "update": flops_update and flops_update / 1e12},
        "tflop_per_image": {k: v / 1e12 for k, v in counts.items()},
        "diagnostics": ours.get("metrics", {}),
        "naive": naive if naive_error is None else {"error": naive_error},
    }
    if naive and method == "teacher_rl":
        entry["naive_images_per_s_without_logprob_pass"] = images / (naive["step_s"] - naive["logprob_pass_s"])
    say(f"  {method}: {entry['images_per_s']:.2f} images/s"
        + (f", naive {entry['naive_images_per_s']:.2f} ({entry['speedup_vs_naive']:.2f}x)" if naive else "")
        + (f", MFU update {entry['mfu_update']:.1%}" if entry["mfu_update"] is not None else "")
        + (f", rollout {entry['mfu_rollout']:.1%}" if entry["mfu_rollout"] is not None else ""))
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
    """One profiled training step of ``method`` (eager or ``--compile``) after one warm-up step."""
    module = build_module(method, spec, args.device, gradient_checkpointing=args.gradient_checkpointing == "on",
                          compile=args.compile, tiny=args.tiny)
    make_trainer(args.device, args.precision, 2, [ProfileStep(1, args.profile_out)]).fit(
        module, make_loader(method, spec, 2))


# -- DDP scaling ---------------------------------------------------------------------------------------
def ddp_scaling(args) -> dict:
    """TeacherRL on the UNet with 1 and 2 GPUs at the same per-GPU batch (32 rollouts), each a fresh process."""
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
                                     precision=args.precision, compile=args.compile)
        say(f"  {devices} GPU(s): {results[devices]['images_per_s']:.2f} images/s")
    ips = {str(d): r["images_per_s"] for d, r in results.items()}
    return {"ddp_scaling": ips, "ddp_method": "teacher_rl",
            "ddp_details": {"model": model_specs(args.tiny)["unet"].label,
                            "per_gpu_images_per_step": model_specs(args.tiny)["unet"].rollout_batch,
                            "strategy": "DiffusionDDPStrategy", "gradient_checkpointing": gc_mode == "on",
                            "scaling_efficiency": ips["2"] / (2 * ips["1"]),
                            "step_s": {str(d): r["step_s"] for d, r in results.items()},
                            "peak_mem_gib": {str(d): r["peak_mem_gib"] for d, r in results.items()}}}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["unet", "sd3", "all"], default="all")
    parser.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=list(ALL_METHODS))
    parser.add_argument("--steps", type=int, default=None, help="timed steps per method (default 2 RL, 5 one-step, 10 pretrain)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per method (default 1 RL, 2 one-step, 3 pretrain; +1 with --compile)")
    parser.add_argument("--compile", action="store_true", help="the modules' compile=True (nn.Module.compile of the trained net)")
    parser.add_argument("--channels-last", action="store_true", help="convert the trained and frozen nets to "
                        "channels-last memory format (results under methods*_channels_last)")
    parser.add_argument("--gradient-checkpointing", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--precision", default=None, help="default bf16-mixed on GPU, 32-true with --tiny")
    parser.add_argument("--naive-chunks", type=int, default=3, help="minibatches the naive RL update is timed over")
    parser.add_argument("--naive-full", action="store_true", help="run every minibatch of the naive RL update")
    parser.add_argument("--naive-steps", type=int, default=2, help="timed steps of the naive one-step/pretrain runs")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive reference")
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU in fp32 (smoke test)")
    parser.add_argument("--ddp-scaling", action="store_true", help="TeacherRL images/s on 1 and 2 GPUs (DDP)")
    parser.add_argument("--out", default=None, help=f"results JSON (default {DEFAULT_OUT.relative_to(ROOT)}; "
                                                    f"{TINY_OUT.relative_to(ROOT)} with --tiny)")
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md (implied by --tiny)")
    parser.add_argument("--profile", choices=ALL_METHODS, default=None, help="profile one step of this method on "
                        "--model (torch.profiler operator table to --profile-out) instead of timing")
    parser.add_argument("--profile-out", default="profile.txt")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds after which no further method "
                                                                         "is started (results are saved per method)")
    args = parser.parse_args(argv)

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
            "precision": args.precision, "compile": bool(args.compile), "gradient_checkpointing": args.gradient_checkpointing,
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
            # compiled / channels-last runs go beside the eager ones
            suffix = ("_compile" if args.compile else "") + ("_channels_last" if args.channels_last else "")
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

"""The embedded pipeline: base model -> three task teachers -> OPD student -> one-step generator.

``lit-distill quickstart`` runs it end to end on the embedded digits (CPU-sized by default); each
stage is also a plain ``lit-distill fit --config configs/...`` run. The base model is cached so that
every later run (configs naming ``model: embedded:base``, notebooks, tests) reuses it.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch

from .data.embedded import caption_for
from .models.sources import EMBEDDED_BASE, embedded_base_dir

# The three embedded tasks and the reward each is judged by (also in configs/teacher_rl/*.yaml); each task has
# prompts of its own (lit_distill.data.embedded.PROMPT_TEMPLATES): "bold"/"thick", "thin"/"light" and "slanted"/
# "italic" digits, words the base model learned from its captions.
TASK_REWARDS: dict[str, Any] = {
    "brightness": {"name": "brightness", "target": 0.35},
    "compress": "jpeg_compressibility",
    "slant": {"name": "slant", "target": 0.7},
}
#: Every prompt scored by the reward of its own task: evaluation, and the joint multi-reward RL baseline
PER_TASK_REWARD = {"name": "per_task", "rewards": TASK_REWARDS}
#: class-balanced prompts ("a handwritten zero" .. "a handwritten nine") on which the one-step generators of the
#: embedded digits are evaluated (their ``eval_prompts``; also in configs/disback and configs/nodistill)
DIGIT_PROMPTS = [caption_for(digit) for digit in range(10)]


def trainer(max_steps: int, out_dir: Optional[Path] = None, callbacks=(), progress: bool = True, **kwargs) -> L.Trainer:
    """The Trainer every pipeline stage uses: one device, CSV logs under ``out_dir``, ``max_steps`` training steps
    shown by ``StepProgressBar``."""
    from lightning.pytorch.loggers import CSVLogger

    from .callbacks.progress import StepProgressBar

    callbacks = list(callbacks) + ([StepProgressBar()] if progress else [])
    return L.Trainer(max_steps=max_steps, accelerator="auto", devices=1, callbacks=callbacks,
                     logger=CSVLogger(str(out_dir), name="logs") if out_dir else False,
                     enable_checkpointing=False, enable_progress_bar=progress, enable_model_summary=False,
                     limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=kwargs.pop("log_every_n_steps", 1),
                     **kwargs)


def ensure_embedded_base(resolution: int = 16, family: str = "flow", cache_dir: Optional[str] = None,
                         max_steps: int = 1000, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                         progress: bool = True) -> Path:
    """The pretrained embedded base model's directory (``load_model("embedded:base")`` reads it), training it
    on the embedded digits first if it is not cached yet (``DiffusionPretrain`` by flow matching / DSM, EMA
    weights exported)."""
    from .callbacks.export import ExportCallback
    from .data import ImageDataModule
    from .methods import DiffusionPretrain

    path = embedded_base_dir(resolution, family, cache_dir)
    if (path / "model_index.json").is_file():
        return path
    print(f"[lit-distill] training the embedded base model ({max_steps} steps) -> {path}")
    L.seed_everything(seed, verbose=False)
    module = DiffusionPretrain("embedded", {"resolution": resolution, "family": family}, optim={"lr": lr},
                               runtime={"seed": seed})
    data = ImageDataModule("embedded:mnist", resolution=resolution, batch_size=batch_size, seed=seed)
    trainer(max_steps, path.parent / f"{path.name}.logs", [ExportCallback(str(path))], progress=progress).fit(module, data)
    return path


def ensure_embedded_bases(init_args: dict) -> list[Path]:
    """Make every embedded base model that a method's arguments name (``"embedded:base"`` as ``model``,
    ``teacher`` or a value of ``teachers``), with the ``resolution`` / ``family`` / ``cache_dir`` of the
    sibling ``<name>_kwargs``: what ``lit-distill fit`` runs before it builds the module."""
    made = []
    for name, value in init_args.items():
        sources = value.values() if isinstance(value, dict) else [value]
        if any(source == EMBEDDED_BASE for source in sources):
            kwargs = dict(init_args.get(f"{name}_kwargs") or {})
            made.append(ensure_embedded_base(**{k: kwargs[k] for k in ("resolution", "family", "cache_dir")
                                                if kwargs.get(k) is not None}))
    return made


def embedded_base_main(argv: list[str]) -> None:
    """``lit-distill embedded-base``: train and cache the embedded base model (nothing if cached)."""
    parser = argparse.ArgumentParser(
        prog="lit-distill embedded-base", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train the embedded base model on the embedded digits and cache it where model: embedded:base "
                    "finds it (nothing to do when it is cached); print its directory.")
    parser.add_argument("--resolution", type=int, default=16, help="image size of the model")
    parser.add_argument("--family", default="flow", choices=["flow", "vp"], help="rectified flow or VP (DDPM) schedule")
    parser.add_argument("--cache-dir", default=None, help="default: $LIT_DISTILL_CACHE or ~/.cache/lit_distill")
    parser.add_argument("--max-steps", type=int, default=1500, help="training steps")
    print(ensure_embedded_base(**vars(parser.parse_args(argv))))


def split_prompts(out: Path, tasks: list[str], val_fraction: float = 0.2, seed: int = 0) -> dict[str, Path]:
    """Split the embedded multi-task prompt set once into training prompts per task and one held-out
    evaluation set, written as JSONL under ``out/prompts`` (every stage reads the same files)."""
    from .data import PromptDataModule, write_prompt_file

    dm = PromptDataModule("embedded:digits_multitask", tasks=tasks, val_fraction=val_fraction, seed=seed)
    dm.setup("fit")
    files = {"eval": dm.val_rows, "multitask": dm.train_rows}
    files.update({task: [r for r in dm.train_rows if r["task"] == task] for task in tasks})
    (out / "prompts").mkdir(parents=True, exist_ok=True)
    return {name: write_prompt_file(out / "prompts" / f"{name}.jsonl", rows) for name, rows in files.items()}


def fit_stage(module, prompts: Path, eval_prompts: Path, max_steps: int, out: Path, name: str,
              batch_size: int = 4, every_n_steps: int = 0, samples_per_prompt: int = 2, progress: bool = True,
              seed: int = 0):
    """Fit an on-policy module (TeacherRL / OPDStudent) on a prompt file, evaluating every task's reward
    on the held-out prompts before, during (every ``every_n_steps``) and after training; exports the model
    to ``out/name/model``. Returns ``(reward history, seconds, images_per_s)``."""
    from .callbacks.export import ExportCallback
    from .callbacks.reward import RewardCallback
    from .data import PromptDataModule

    data = PromptDataModule(str(prompts), batch_size=batch_size, val_fraction=0.0, repeat=1000, seed=seed)
    evaluation = RewardCallback(str(eval_prompts), reward=PER_TASK_REWARD, num_prompts=None,
                                samples_per_prompt=samples_per_prompt, every_n_steps=every_n_steps,
                                output_dir=str(out / name / "grids"), save_best=False, seed=seed)
    timer = _Throughput()
    start = time.time()
    trainer(max_steps, out / name, [evaluation, timer, ExportCallback(str(out / name / "model"))],
            progress=progress).fit(module, data)
    return evaluation.history, time.time() - start, timer.images_per_s


class _Throughput(L.Callback):
    """Images generated per second of training (``lit_distill.protocols.ImageCounter``: rollout samples / time
    in training steps)."""

    def __init__(self):
        self.images, self.seconds, self._t = 0, 0.0, 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        self.seconds += time.perf_counter() - self._t
        self.images += module.images_per_batch(batch)

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def rewards_of(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k != "step"}


@dataclass
class QuickstartConfig:
    out_dir: str = "outputs/quickstart"
    cache_dir: Optional[str] = None
    resolution: int = 16
    family: str = "flow"
    pretrain_steps: int = 1000
    teacher_steps: int = 30     # training steps: one rollout batch and its updates each
    opd_steps: int = 30
    one_step_steps: int = 185   # DisBack: up to the first 2/5 record the degradation path, the rest update the generator
    prompts_per_step: int = 4
    rollouts_per_prompt: int = 8
    num_steps: int = 10
    seed: int = 0
    tasks: list = field(default_factory=lambda: list(TASK_REWARDS))


def quickstart(cfg: QuickstartConfig) -> dict:
    """Run the whole embedded chain and return (and write) the summary."""
    from .methods import OPDStudent, TeacherRL

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings, rewards = {}, {}
    start = time.time()
    base = ensure_embedded_base(cfg.resolution, cfg.family, cfg.cache_dir, cfg.pretrain_steps, seed=cfg.seed)
    timings["base"] = time.time() - start
    prompts = split_prompts(out, cfg.tasks, seed=cfg.seed)

    teachers, sampling = {}, {"num_steps": cfg.num_steps, "rollouts_per_prompt": cfg.rollouts_per_prompt}
    for task in cfg.tasks:
        module = TeacherRL(str(base), TASK_REWARDS[task], sampling=sampling, updates={"minibatch_size": 64},
                           optim={"lr": 1e-4}, runtime={"seed": cfg.seed})
        history, timings[f"teacher/{task}"], _ = fit_stage(module, prompts[task], prompts["eval"], cfg.teacher_steps,
                                                           out, f"teacher_{task}", cfg.prompts_per_step)
        rewards["base"], rewards[f"teacher/{task}"] = rewards_of(history[0]), rewards_of(history[-1])
        teachers[task] = str(out / f"teacher_{task}" / "model")

    student = OPDStudent(str(base), teachers, sampling=sampling, optim={"lr": 1e-4}, runtime={"seed": cfg.seed})
    history, timings["opd"], _ = fit_stage(student, prompts["multitask"], prompts["eval"], cfg.opd_steps, out,
                                           "opd", cfg.prompts_per_step)
    rewards["opd"] = rewards_of(history[-1])

    summary = {"config": asdict(cfg), "rewards": rewards, "seconds": timings,
               "grids": sorted(str(p) for p in out.rglob("grids/*.png"))}
    one_step = run_one_step(base, cfg, out)
    if one_step is not None:
        summary["one_step"], timings["one_step"] = one_step
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_table(summary)
    return summary


def run_one_step(base: Path, cfg: QuickstartConfig, out: Path):
    """DisBack one-step generator from the base model; returns (FID summary, seconds)."""
    from .callbacks.fid import FIDCallback
    from .data import ImageDataModule
    from .methods.disback import DisBackStudent

    start = time.time()
    # CPU-sized: the recording stops after at most 2/5 of the training steps (converged or not), and the one
    # intermediate target takes 10% of the generator updates, the paper's share
    recording = max(4, cfg.one_step_steps * 2 // 5)
    updates = max(1, cfg.one_step_steps - recording)
    print(f"[lit-distill] DisBack one-step generator: {cfg.one_step_steps} steps = up to {recording} recording the "
          f"degradation path (2 checkpoints), then generator updates")
    stages = {"num_checkpoints": 2, "max_recording_updates": recording, "recording_patience": max(2, recording // 4),
              "degradation_interval": max(1, recording // 8), "iterations_per_stage": max(1, updates // 10)}
    module = DisBackStudent(teacher=str(base), stages=stages, optim={"lr": 1e-4}, eval_prompts=DIGIT_PROMPTS)
    fid = FIDCallback(every_n_steps=max(1, cfg.one_step_steps // 2), num_samples=500, cache_dir=cfg.cache_dir)
    data = ImageDataModule("embedded:mnist", resolution=cfg.resolution, batch_size=32, seed=cfg.seed, repeat=50)
    trainer(cfg.one_step_steps, out / "one_step", [fid]).fit(module, data)
    module.export(out / "one_step_generator")
    return {"fid_classifier": [[h["generator_updates"], h["fid_classifier"]] for h in fid.history]}, time.time() - start


def print_table(summary: dict) -> None:
    tasks = sorted({t for r in summary["rewards"].values() for t in r if t != "reward"})
    header = f"{'system':<22}" + "".join(f"{t:>14}" for t in tasks) + f"{'mean':>10}"
    print("\n" + header + "\n" + "-" * len(header))
    for system, r in summary["rewards"].items():
        print(f"{system:<22}" + "".join(f"{r.get(t, float('nan')):>14.3f}" for t in tasks) + f"{r['reward']:>10.3f}")
    curve = summary.get("one_step", {}).get("fid_classifier")
    if curve:
        steps = summary["config"]["one_step_steps"]
        print(f"\none-step generator (DisBack): fid_classifier {curve[0][1]:.1f} -> {curve[-1][1]:.1f} "
              f"after {curve[-1][0]} generator updates ({steps} steps, the first {steps - curve[-1][0]} recording the "
              "degradation path; digit-classifier features, not Inception)")
    print(f"\nsummary: {Path(summary['config']['out_dir']) / 'summary.json'}")


def quickstart_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="lit-distill quickstart", description=__doc__)
    for f in QuickstartConfig.__dataclass_fields__.values():
        if f.name != "tasks":
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default) if f.default is not None else str,
                                default=f.default)
    args = vars(parser.parse_args(argv))
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    quickstart(QuickstartConfig(**args))

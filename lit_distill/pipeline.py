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

from .utils import default_cache_dir

# The three embedded tasks and the reward each is judged by (also in configs/teacher_rl/*.yaml).
TASK_REWARDS: dict[str, Any] = {
    "correctness": "digit_correctness",
    "brightness": {"name": "brightness", "target": 0.6},
    "compress": "jpeg_compressibility",
}
PER_TASK_REWARD = {"name": "per_task", "rewards": TASK_REWARDS}
MULTI_REWARD = {"name": "weighted_sum", "rewards": [{"name": "digit_correctness", "weight": 1.0},
                                                     {"name": "brightness", "target": 0.6, "weight": 1.0},
                                                     {"name": "jpeg_compressibility", "weight": 1.0}]}


def base_model_dir(resolution: int = 16, family: str = "flow", cache_dir: Optional[str] = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / f"base_digits_r{resolution}_{family}"


def trainer(max_steps: int, out_dir: Optional[Path] = None, callbacks=(), progress: bool = True, **kwargs) -> L.Trainer:
    """The Trainer every pipeline stage uses: one device, CSV logs under ``out_dir``."""
    from lightning.pytorch.loggers import CSVLogger

    return L.Trainer(max_steps=max_steps, accelerator="auto", devices=1, callbacks=list(callbacks),
                     logger=CSVLogger(str(out_dir), name="logs") if out_dir else False,
                     enable_checkpointing=False, enable_progress_bar=progress, enable_model_summary=False,
                     limit_val_batches=0, num_sanity_val_steps=0, **kwargs)


def ensure_embedded_base(resolution: int = 16, family: str = "flow", cache_dir: Optional[str] = None,
                         max_steps: int = 1500, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                         progress: bool = True) -> Path:
    """The pretrained embedded base model's directory, training it on the embedded digits first if it
    is not cached yet (``DiffusionPretrain`` by flow matching / DSM, EMA weights exported)."""
    from .callbacks.export import ExportCallback
    from .data import ImageDataModule
    from .methods import DiffusionPretrain

    path = base_model_dir(resolution, family, cache_dir)
    if (path / "model_index.json").is_file():
        return path
    print(f"[lit-distill] training the embedded base model ({max_steps} steps) -> {path}")
    L.seed_everything(seed, verbose=False)
    module = DiffusionPretrain("embedded", {"resolution": resolution, "family": family}, lr=lr, seed=seed)
    data = ImageDataModule("embedded:digits", resolution=resolution, batch_size=batch_size, seed=seed)
    trainer(max_steps, path.parent / f"{path.name}.logs", [ExportCallback(str(path))], progress=progress).fit(module, data)
    return path


@dataclass
class QuickstartConfig:
    out_dir: str = "outputs/quickstart"
    cache_dir: Optional[str] = None
    resolution: int = 16
    family: str = "flow"
    pretrain_steps: int = 1500
    teacher_steps: int = 40
    opd_steps: int = 40
    one_step_steps: int = 150
    prompts_per_step: int = 4
    group_size: int = 8
    num_steps: int = 10
    seed: int = 0
    tasks: list = field(default_factory=lambda: list(TASK_REWARDS))


def train_teacher(task: str, base: Path, cfg: QuickstartConfig, out: Path):
    """TeacherRL on one task's prompts; returns (exported dir, RewardCallback history)."""
    from .callbacks.reward import RewardCallback
    from .data import PromptDataModule
    from .methods import TeacherRL

    module = TeacherRL(str(base), TASK_REWARDS[task], num_steps=cfg.num_steps, group_size=cfg.group_size,
                       lr=1e-4, minibatch_size=64, seed=cfg.seed)
    data = PromptDataModule(f"embedded:digits_{task}", batch_size=cfg.prompts_per_step, seed=cfg.seed, repeat=50)
    evaluation = RewardCallback("embedded:digits_multitask", reward=PER_TASK_REWARD, num_prompts=None,
                                every_n_steps=0, output_dir=str(out / "grids" / f"teacher_{task}"), save_best=False)
    trainer(cfg.teacher_steps, out / f"teacher_{task}", [evaluation]).fit(module, data)
    module.export(out / "teachers" / task)
    return out / "teachers" / task, evaluation.history


def quickstart(cfg: QuickstartConfig) -> dict:
    """Run the whole embedded chain and return (and write) the summary."""
    from .callbacks.reward import RewardCallback
    from .data import PromptDataModule
    from .methods import OPDStudent

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings, rewards = {}, {}
    start = time.time()
    base = ensure_embedded_base(cfg.resolution, cfg.family, cfg.cache_dir, cfg.pretrain_steps, seed=cfg.seed)
    timings["base"] = time.time() - start

    teachers = {}
    for task in cfg.tasks:
        start = time.time()
        teachers[task], history = train_teacher(task, base, cfg, out)
        rewards["base"] = {k: v for k, v in history[0].items() if k != "step"}
        rewards[f"teacher/{task}"] = {k: v for k, v in history[-1].items() if k != "step"}
        timings[f"teacher/{task}"] = time.time() - start

    start = time.time()
    student = OPDStudent(str(base), {t: str(p) for t, p in teachers.items()}, num_steps=cfg.num_steps,
                         rollouts_per_prompt=cfg.group_size, lr=1e-4, seed=cfg.seed)
    data = PromptDataModule("embedded:digits_multitask", batch_size=cfg.prompts_per_step, seed=cfg.seed, repeat=20,
                            tasks=list(cfg.tasks))
    evaluation = RewardCallback("embedded:digits_multitask", reward=PER_TASK_REWARD, num_prompts=None,
                                every_n_steps=0, output_dir=str(out / "grids" / "opd"), save_best=False)
    trainer(cfg.opd_steps, out / "opd", [evaluation]).fit(student, data)
    student.export(out / "opd_student")
    rewards["opd"] = {k: v for k, v in evaluation.history[-1].items() if k != "step"}
    timings["opd"] = time.time() - start

    summary = {"config": asdict(cfg), "rewards": rewards, "seconds": timings,
               "grids": sorted(str(p) for p in (out / "grids").rglob("*.png"))}
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
    module = DisBackStudent(teacher=str(base))
    fid = FIDCallback(every_n_steps=max(1, cfg.one_step_steps // 3), num_samples=500, features="classifier")
    data = ImageDataModule("embedded:digits", resolution=cfg.resolution, batch_size=32, seed=cfg.seed)
    trainer(cfg.one_step_steps, out / "one_step", [fid]).fit(module, data)
    module.export_generator(out / "one_step_generator")
    return {"fid_classifier": getattr(fid, "history", None)}, time.time() - start


def print_table(summary: dict) -> None:
    tasks = sorted({t for r in summary["rewards"].values() for t in r if t != "reward"})
    header = f"{'system':<22}" + "".join(f"{t:>14}" for t in tasks) + f"{'mean':>10}"
    print("\n" + header + "\n" + "-" * len(header))
    for system, r in summary["rewards"].items():
        print(f"{system:<22}" + "".join(f"{r.get(t, float('nan')):>14.3f}" for t in tasks) + f"{r['reward']:>10.3f}")
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

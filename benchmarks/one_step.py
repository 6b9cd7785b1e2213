"""One-step generators from the embedded teacher: FID against generator updates for DisBack, its
Diff-Instruct baseline, NoDistill with teacher init and with random init, and the teacher's own
many-step FID. FIDs are Fréchet distances in the project's digit-classifier features
(``fid_classifier``), not Inception FIDs.

    python benchmarks/one_step.py            # GPU
    python benchmarks/one_step.py --cpu      # short CPU variant
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import plot_curves, update_docs_table, write_results  # noqa: E402

from lit_distill.callbacks import FIDCallback  # noqa: E402
from lit_distill.data import ImageDataModule, caption_for  # noqa: E402
from lit_distill.diffusion import sample  # noqa: E402
from lit_distill.methods import DisBackStudent, NoDistillOneStep  # noqa: E402
from lit_distill.models import DiffusionModel  # noqa: E402
from lit_distill.pipeline import ensure_embedded_base  # noqa: E402

SYSTEMS = {
    "disback": (DisBackStudent, {"backtracking": True}),
    "diff_instruct": (DisBackStudent, {"backtracking": False}),
    "nodistill_teacher_init": (NoDistillOneStep, {"generator_init": "teacher", "classifier_init": "teacher"}),
    "nodistill_random_init": (NoDistillOneStep, {"generator_init": "random", "classifier_init": "random"}),
}


class Curve(L.Callback):
    """FID every ``every`` generator updates; stops training after ``total`` generator updates."""

    def __init__(self, fid: FIDCallback, every: int, total: int):
        self.fid, self.every, self.total, self.points = fid, every, total, []

    def _eval(self, trainer, module):
        updates = int(module.generator_updates)
        self.points.append([updates, round(self.fid.evaluate(trainer, module), 3)])
        print(f"  {updates:5d} generator updates: fid_classifier {self.points[-1][1]:.2f}", flush=True)

    def on_train_start(self, trainer, module):
        self._eval(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        updates = int(module.generator_updates)
        if updates >= self.points[-1][0] + self.every or updates >= self.total:
            if updates != self.points[-1][0]:
                self._eval(trainer, module)
        if updates >= self.total:
            trainer.should_stop = True


class TeacherSampler(L.LightningModule):
    """The teacher's many-step ODE sampler, with the one-step modules' ``generate_eval_samples`` contract."""

    def __init__(self, model: DiffusionModel, num_steps: int):
        super().__init__()
        self.model, self.num_steps = model, num_steps

    @torch.no_grad()
    def generate_eval_samples(self, n: int, generator: torch.Generator) -> torch.Tensor:
        captions = [caption_for(i % 10) for i in range(n)]
        z = torch.randn((n,) + self.model.sample_shape, generator=generator).to(self.device)
        x = sample(self.model, z, self.model.encode_prompts(captions), self.model.schedule, self.num_steps)
        return self.model.decode(x)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--updates", type=int, help="generator updates per system (default 600 GPU, 40 CPU)")
    p.add_argument("--every", type=int, help="FID period in generator updates")
    p.add_argument("--num-samples", type=int, default=None, help="images per FID (default 1000 GPU, 200 CPU)")
    p.add_argument("--teacher-steps", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS))
    p.add_argument("--override", type=json.loads, default={}, help="JSON of keyword arguments given to every "
                   "system's module, e.g. '{\"betas\": [0.0, 0.999]}'")
    p.add_argument("--out", default="benchmarks/results/one_step.json")
    p.add_argument("--no-docs", action="store_true", help="do not touch docs/ (e.g. when --out is a part to merge)")
    p.add_argument("--docs-only", action="store_true", help="measure nothing: rebuild figure and table from --out")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if not args.docs_only:
        for figures in measure(args):  # written after every system: a run stopped by a time limit keeps them
            write_results("one_step", figures, args.out)
    if not args.no_docs:
        write_docs(args.out)


def measure(args):
    """Yields the figures measured so far after each system."""
    updates = args.updates or (40 if args.cpu else 600)
    every = args.every or max(1, updates // 6)
    num_samples = args.num_samples or (200 if args.cpu else 1000)
    base = ensure_embedded_base(cache_dir=args.cache_dir)
    accelerator = "cpu" if args.cpu else "auto"

    def fid_callback():
        return FIDCallback(num_samples=num_samples, cache_dir=args.cache_dir, real_source="embedded:digits",
                           resolution=16, eval_at_start=False, eval_at_end=False)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    teacher = TeacherSampler(DiffusionModel.from_pretrained(base).freeze_(), args.teacher_steps).to(device)
    fake_trainer = SimpleNamespace(global_rank=0, world_size=1, is_global_zero=True, datamodule=None)
    teacher_fid = fid_callback().evaluate(fake_trainer, teacher)
    print(f"[one_step] teacher ({args.teacher_steps} ODE steps): fid_classifier {teacher_fid:.2f}", flush=True)

    curves, seconds = {}, {}

    def figures():
        return {"fid_features": "classifier", "teacher_fid": round(teacher_fid, 3), "teacher_steps": args.teacher_steps,
                "curves": curves, "wall_seconds": seconds, "generator_updates": updates, "num_samples": num_samples,
                "override": args.override,
                "note": "DisBack's stage-0 degradation recording trains only the auxiliary score; its steps are not "
                        "generator updates and are not on the x axis"}

    for name in args.systems:
        cls, kwargs = SYSTEMS[name]
        print(f"[one_step] {name}", flush=True)
        torch.manual_seed(0)
        if name == "disback":  # 3/8 of the budget on the three intermediate targets, the rest on the teacher
            kwargs = {**kwargs, "iterations_per_stage": max(1, updates // 8)}  # default num_checkpoints=4
        module = cls(str(base), **{**kwargs, **args.override})
        curve = Curve(fid_callback(), every, updates)
        start = time.time()
        L.Trainer(max_steps=100 * updates, accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[curve]).fit(
            module, ImageDataModule("embedded:digits", resolution=16, batch_size=args.batch_size, repeat=50))
        curves[name], seconds[name] = curve.points, round(time.time() - start, 1)
        yield figures()


def write_docs(results: str) -> None:
    figures = json.loads(Path(results).read_text())["figures"]
    curves, seconds = figures["curves"], figures["wall_seconds"]
    plot_curves(curves, "docs/one_step_fid.png", xlabel="generator updates", ylabel="fid_classifier (log)",
                hline=figures["teacher_fid"], hline_label=f"teacher ({figures['teacher_steps']} steps)", logy=True)
    rows = [[name, c[0][1], c[len(c) // 2][1], c[-1][0], c[-1][1], seconds.get(name, "")] for name, c in curves.items()]
    rows.append([f"teacher, {figures['teacher_steps']} ODE steps", "", "", "", figures["teacher_fid"], ""])
    for key, variants in figures.items():  # ablations of one system: {"ablation_SYSTEM": {variant: {"curve": ...}}}
        for variant, run in (variants.items() if key.startswith("ablation_") else ()):
            if isinstance(run, dict) and "curve" in run:
                c = run["curve"]
                rows.append([f"{key.removeprefix('ablation_')} [{variant}]", c[0][1], c[len(c) // 2][1], c[-1][0],
                             c[-1][1], ""])
    note = figures.get("note", "") + " Rows with [brackets] are ablations; each one's command is in the JSON."
    update_docs_table("one_step", ["system", "fid at 0", "fid at half", "updates", "final fid", "seconds"], rows,
                      results, note=note, figure="curves")


if __name__ == "__main__":
    main()

"""One-step generators from the embedded teacher: FID against generator updates for DisBack, its
Diff-Instruct baseline, NoDistill with teacher init and with random init, the teacher's own many-step FID
and the real-data floor, per seed. FIDs are Fréchet distances in the project's digit-classifier features
(``fid_classifier``), not Inception FIDs, against the held-out reference part of MNIST.

    python benchmarks/one_step.py --seeds 0 1 2 --jobs 12     # GPU: every (seed, system) in parallel
    python benchmarks/one_step.py --cpu                      # short CPU variant
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
from common import run_jobs, seed_mean, write_results  # noqa: E402

import report  # noqa: E402

from lit_distill.callbacks import FIDCallback  # noqa: E402
from lit_distill.data import ImageDataModule  # noqa: E402
from lit_distill.diffusion import sample  # noqa: E402
from lit_distill.methods import DisBackStudent, NoDistillOneStep  # noqa: E402
from lit_distill.models import DiffusionModel  # noqa: E402
from lit_distill.pipeline import DIGIT_PROMPTS, ensure_embedded_base  # noqa: E402

SYSTEMS = {
    "disback": (DisBackStudent, {"backtracking": True}),
    "diff_instruct": (DisBackStudent, {"backtracking": False}),
    "nodistill_teacher_init": (NoDistillOneStep, {"generator": {"init": "teacher"}, "classifier": {"init": "teacher"}}),
    "nodistill_random_init": (NoDistillOneStep, {"generator": {"init": "random"}, "classifier": {"init": "random"}}),
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
    def generate_eval_samples(self, n: int, generator: torch.Generator, prompts=None) -> torch.Tensor:
        prompts = prompts or [DIGIT_PROMPTS[i % len(DIGIT_PROMPTS)] for i in range(n)]
        z = torch.randn((n,) + self.model.sample_shape, generator=generator).to(self.device)
        x = sample(self.model, z, self.model.encode_prompts(list(prompts)), self.model.schedule, self.num_steps)
        return self.model.decode(x)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--updates", type=int, help="generator updates per system (default 600 GPU, 40 CPU)")
    p.add_argument("--every", type=int, help="FID period in generator updates")
    p.add_argument("--num-samples", type=int, default=None, help="images per FID (default 5000 GPU, 200 CPU)")
    p.add_argument("--teacher-steps", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--jobs", type=int, default=1, help="units (seed, system) run at once, each a process")
    p.add_argument("--intermediate-share", type=float, default=0.1,
                   help="DisBack: share of the generator updates spent on the intermediate targets (the paper's "
                        "released SDXL scripts: about 10%%)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--systems", nargs="*", default=list(SYSTEMS))
    p.add_argument("--override", type=json.loads, default={}, help="JSON of keyword arguments given to every "
                   "system's module, e.g. '{\"optim\": {\"betas\": [0.0, 0.999]}}'")
    p.add_argument("--ablations", type=json.loads, default={},
                   help='variants of one system, \'{"NAME": {"system": "disback", "settings": {...}}}\'')
    p.add_argument("--work", default="runs/bench_one_step")
    p.add_argument("--reuse", action="store_true", help="take the units whose part file is already in --work as "
                   "they are (more seeds for an earlier run: the same settings and --work)")
    p.add_argument("--unit", nargs=2, metavar=("SEED", "SYSTEM"), help=argparse.SUPPRESS)
    p.add_argument("--out", default="benchmarks/results/one_step.json")
    p.add_argument("--no-docs", action="store_true", help="do not touch docs/ (e.g. when --out is a part to merge)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.unit:
        run_unit(args, int(args.unit[0]), args.unit[1])
        return
    write_results("one_step", measure(args), args.out)
    if not args.no_docs:
        report.write_all()


def settings(args) -> tuple[int, int, int]:
    updates = args.updates or (40 if args.cpu else 600)
    return updates, args.every or max(1, updates // 6), args.num_samples or (200 if args.cpu else 5000)


def fid_callback(args, num_samples: int) -> FIDCallback:
    """FID against the held-out reference part of the embedded digits (see FIDCallback)."""
    return FIDCallback(num_samples=num_samples, cache_dir=args.cache_dir, real_source="embedded:mnist",
                       resolution=16, eval_at_start=False, eval_at_end=False, batch_size=500)


def unit_file(args, seed: int, system: str) -> Path:
    return Path(args.work) / f"seed{seed}" / f"{system}.json"


def merged(*settings: dict) -> dict:
    """Keyword arguments of several sources, later ones first; a settings group (a dict) is merged field by field,
    so an override ``{"stages": {"num_checkpoints": 2}}`` keeps the group's other fields."""
    out: dict = {}
    for layer in settings:
        for key, value in layer.items():
            out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def module_for(args, system: str, seed: int, updates: int):
    """The module of ``system`` (a key of SYSTEMS, or of ``--ablations``) for ``seed``."""
    base = ensure_embedded_base(cache_dir=args.cache_dir)
    ablation = args.ablations.get(system)
    name = ablation["system"] if ablation else system
    cls, kwargs = SYSTEMS[name]
    kwargs = merged({**kwargs, "runtime": {"seed": seed}, "eval_prompts": DIGIT_PROMPTS}, args.override,
                    ablation["settings"] if ablation else {})
    stages = dict(kwargs.get("stages", {}))
    targets = stages.get("num_checkpoints", 4) - 1
    if name == "disback" and targets > 0 and "iterations_per_stage" not in stages:
        # the paper's share of the budget on the intermediate targets, the rest on the teacher
        stages["iterations_per_stage"] = max(1, round(args.intermediate_share * updates / targets))
        kwargs["stages"] = stages
    return cls(str(base), **kwargs)


def run_unit(args, seed: int, system: str) -> dict:
    """Train one system with one seed; FID every ``every`` generator updates. Writes and returns its part."""
    updates, every, num_samples = settings(args)
    accelerator = "cpu" if args.cpu else "auto"
    L.seed_everything(seed, verbose=False)
    module = module_for(args, system, seed, updates)
    curve = Curve(fid_callback(args, num_samples), every, updates)
    start = time.time()
    L.Trainer(max_steps=100 * updates, accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[curve]).fit(
        module, ImageDataModule("embedded:mnist", resolution=16, batch_size=args.batch_size, seed=seed))
    part = {"curve": curve.points, "seconds": round(time.time() - start, 1),
            "recording_updates": getattr(module, "recording_updates", 0)}
    unit_file(args, seed, system).parent.mkdir(parents=True, exist_ok=True)
    unit_file(args, seed, system).write_text(json.dumps(part))
    print(f"[one_step] seed {seed} {system}: {curve.points[0][1]} -> {curve.points[-1][1]}", flush=True)
    return part


def reference_figures(args) -> dict:
    """The teacher's many-step FID and the real-data floor, at the benchmark's sample count."""
    _, _, num_samples = settings(args)
    base = ensure_embedded_base(cache_dir=args.cache_dir)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    teacher = TeacherSampler(DiffusionModel.from_pretrained(base).freeze_(), args.teacher_steps).to(device)
    fake_trainer = SimpleNamespace(global_rank=0, world_size=1, is_global_zero=True, datamodule=None)
    fid = fid_callback(args, num_samples)
    teacher_fid = fid.evaluate(fake_trainer, teacher)
    floor = fid.real_floor(fake_trainer, device)
    print(f"[one_step] teacher ({args.teacher_steps} ODE steps): {teacher_fid:.3f}; real floor {floor:.3f}", flush=True)
    return {"teacher_fid": round(teacher_fid, 4), "real_floor": round(floor, 4)}


def measure(args) -> dict:
    updates, _, num_samples = settings(args)
    ensure_embedded_base(cache_dir=args.cache_dir)
    systems = list(args.systems) + list(args.ablations)
    units = [(seed, name) for seed in args.seeds for name in systems]
    todo = [u for u in units if not (args.reuse and unit_file(args, *u).is_file())]
    if args.jobs > 1:
        keep = ("updates", "every", "num_samples", "teacher_steps", "batch_size", "cache_dir", "work",
                "intermediate_share")
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in keep and v is not None]
        flags += ["--override", json.dumps(args.override), "--ablations", json.dumps(args.ablations)]
        flags += ["--cpu"] if args.cpu else []
        run_jobs([[__file__, *flags, "--unit", str(s), name] for s, name in todo], args.jobs,
                 Path(args.work) / "logs")
    else:
        for u in todo:
            run_unit(args, *u)
    parts = {u: json.loads(unit_file(args, *u).read_text()) for u in units}
    reference = reference_figures(args)
    per_seed = {str(s): {name: parts[(s, name)]["curve"] for name in systems} for s in args.seeds}
    mean = seed_mean(per_seed)
    return {"fid_features": "classifier", "fid_reference": "heldout", **reference,
            "teacher_steps": args.teacher_steps, "seeds": list(args.seeds),
            "curves": {k: v for k, v in mean.items() if k in args.systems},
            "curves_per_seed": {s: {k: v for k, v in c.items() if k in args.systems} for s, c in per_seed.items()},
            "ablations": {name: {**args.ablations[name], "curve": mean[name],
                                 "curves_per_seed": {s: c[name] for s, c in per_seed.items()}}
                          for name in args.ablations},
            "disback_recording_updates": {str(s): parts[(s, "disback")]["recording_updates"]
                                          for s in args.seeds if (s, "disback") in parts},
            "wall_seconds": {name: round(sum(parts[(s, name)]["seconds"] for s in args.seeds) / len(args.seeds), 1)
                             for name in systems},
            "generator_updates": updates, "num_samples": num_samples, "override": args.override,
            "disback_intermediate_share": args.intermediate_share,
            "note": "FIDs compare samples with the held-out reference part of MNIST (its test images), which neither "
                    "the teacher, the generators nor the digit classifier trained on; real_floor is the FID of as "
                    "many held-out real images (the validation part). DisBack's degradation-recording updates train "
                    "only the auxiliary score and are not on the x axis (disback_recording_updates)."}


if __name__ == "__main__":
    main()

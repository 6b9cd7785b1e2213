"""TeacherRL on the embedded tasks, one teacher per task and seed: reward before and after on held-out
prompts, every other task's reward (a teacher is strong on its task and weak off it; reward hacking stays
visible), reward curves, images/s. Saves the teachers for benchmarks/opd_vs_rl.py.

    python benchmarks/teacher_rl.py --seeds 0 1 2 --jobs 9     # GPU: every (seed, task) in parallel
    python benchmarks/teacher_rl.py --cpu                     # the short CPU variant, seed 0

Each (seed, task) is a subprocess (``--unit SEED TASK``) writing a part under ``--work``; the parent
merges them into ``benchmarks/results/teacher_rl.json`` (the mean over seeds, and ``per_seed``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_jobs, seed_mean, write_results  # noqa: E402

import report  # noqa: E402

from lit_distill.pipeline import TASK_REWARDS, ensure_embedded_base, fit_stage, split_prompts  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="short CPU variant")
    p.add_argument("--steps", type=int, help="training steps per teacher, each a rollout batch and its "
                   "minibatch updates (default 60 GPU, 8 CPU)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--jobs", type=int, default=1, help="units run at once (each a process)")
    p.add_argument("--work", default="runs/bench", help="where teachers, prompts and logs go")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--rollouts-per-prompt", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--num-steps", type=int, default=10)
    p.add_argument("--eval-samples", type=int, default=8, help="samples per held-out prompt at each evaluation")
    p.add_argument("--tasks", nargs="+", default=list(TASK_REWARDS))
    p.add_argument("--unit", nargs=2, metavar=("SEED", "TASK"), help=argparse.SUPPRESS)
    p.add_argument("--out", default="benchmarks/results/teacher_rl.json")
    return p.parse_args(argv)


def unit_file(work: Path, seed: int, task: str) -> Path:
    return work / f"seed{seed}" / f"teacher_{task}.json"


def train_teacher(args, seed: int, task: str) -> dict:
    """Fit one teacher; returns (and writes) its part."""
    from lit_distill.methods import TeacherRL

    steps = args.steps or (8 if args.cpu else 60)
    work = Path(args.work)
    base = ensure_embedded_base(cache_dir=args.cache_dir)
    prompts = split_prompts(work / f"seed{seed}" / task, list(TASK_REWARDS))
    module = TeacherRL(str(base), TASK_REWARDS[task],
                       sampling={"num_steps": args.num_steps, "rollouts_per_prompt": args.rollouts_per_prompt},
                       updates={"minibatch_size": 64}, optim={"lr": args.lr}, runtime={"seed": seed})
    history, seconds, images_per_s = fit_stage(module, prompts[task], prompts["eval"], steps, work / f"seed{seed}",
                                               f"teacher_{task}", args.prompts_per_step,
                                               every_n_steps=max(1, steps // 6), progress=False,
                                               samples_per_prompt=args.eval_samples, seed=seed)
    part = {"base": history[0][task], "final": history[-1][task], "max": module.reward.max_value,
            "steps": history[-1]["step"], "wall_seconds": round(seconds, 1),
            "others": {t: history[-1][t] for t in history[-1] if t not in (task, "step", "reward")},
            "others_base": {t: history[0][t] for t in history[0] if t not in (task, "step", "reward")},
            "curve": [[h["step"], h[task]] for h in history], "images_per_s": round(images_per_s, 1),
            "model": str(work / f"seed{seed}" / f"teacher_{task}" / "model"), "base_model": str(base),
            "eval_prompts": str(prompts["eval"])}
    unit_file(work, seed, task).write_text(json.dumps(part))
    print(f"[teacher_rl] seed {seed} {task}: {part['base']:.3f} -> {part['final']:.3f} (max {part['max']}) "
          f"in {seconds:.0f}s", flush=True)
    return part


def train_teachers(args) -> dict:
    """Every (seed, task), in ``args.jobs`` processes; the merged figures."""
    work = Path(args.work)
    ensure_embedded_base(cache_dir=args.cache_dir)  # once, before the units share it
    units = [(seed, task) for seed in args.seeds for task in args.tasks]
    if args.jobs > 1:
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k in ("steps", "work", "cache_dir", "lr", "rollouts_per_prompt", "prompts_per_step", "num_steps",
                          "eval_samples") and v is not None]
        run_jobs([[__file__, *flags, *(["--cpu"] if args.cpu else []), "--unit", str(s), t] for s, t in units],
                 args.jobs, work / "logs_teacher_rl")
        parts = {(s, t): json.loads(unit_file(work, s, t).read_text()) for s, t in units}
    else:
        parts = {(s, t): train_teacher(args, s, t) for s, t in units}
    per_seed = {str(s): {t: parts[(s, t)] for t in args.tasks} for s in args.seeds}
    tasks = seed_mean({s: {t: {k: v for k, v in r.items() if k not in ("model", "base_model", "eval_prompts")}
                           for t, r in tasks.items()} for s, tasks in per_seed.items()})
    first = parts[units[0]]
    return {"tasks": tasks, "seeds": list(args.seeds), "per_seed": per_seed,
            "images_per_s": round(sum(p["images_per_s"] for p in parts.values()) / len(parts), 1),
            "models": {s: {t: r["model"] for t, r in tasks_.items()} for s, tasks_ in per_seed.items()},
            "base_model": first["base_model"], "eval_prompts": first["eval_prompts"],
            "eval_samples_per_prompt": args.eval_samples, "parallel_jobs": args.jobs}


def main(argv=None):
    args = parse(argv)
    if args.unit:
        train_teacher(args, int(args.unit[0]), args.unit[1])
        return
    write_results("teacher_rl", train_teachers(args), args.out)
    report.write_all()


if __name__ == "__main__":
    main()

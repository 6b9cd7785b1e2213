"""Reward against training time: TeacherRL on every SDE step against the fast setting (a window of SDE steps, ODE
steps elsewhere, only the window trained: Flow-GRPO-Fast's ``sde_window``), on an embedded task.

Each (setting, seed) is one TeacherRL run from the cached embedded base model on one task's training prompts,
until ``--budget`` seconds of training have passed. Time is *training* time on the device: the sum of the training
steps' durations (rollout, rewards, updates; the device synchronised at the end of each step), the evaluations left
out. The held-out reward (the task's held-out prompts, ``--eval-samples`` fixed-seed samples each, 20-step ODE
sampler) is measured every ``--eval-every`` steps. ``seconds_to_90``: the training seconds until the held-out reward
first reaches 90% of the headroom (the reward's ``max_value`` minus the base model's reward), interpolated linearly
between the two evaluations around the crossing, then averaged over the seeds (null when a seed never reaches it).

The two settings share everything else (prompts per step, rollouts per prompt, learning rate, sampling steps) and
the number of optimiser updates per training step: ``all_steps`` trains every (sample, step) pair in minibatches
of ``--minibatch``; ``fast`` trains the window's pairs in as many minibatches (smaller ones), as Flow-GRPO-Fast keeps
one optimiser step per train batch however few timesteps it trains. Both run ``runtime.compile="off"`` unless
``--compile`` (a compile warm-up would count against both in the first seconds).

    python benchmarks/fast_rl.py --seeds 0 1                 # GPU (docs/speed.md: about 5 minutes on one H200)
    python benchmarks/fast_rl.py --cpu                       # the short CPU variant, seed 0

Results: ``benchmarks/results/fast_rl.json`` (schema ``fast_rl``: ``runs`` with mean curves, ``seconds_to_90``,
``per_seed``); ``benchmarks/report.py`` writes the ``fast_rl`` table of docs/benchmarks.md and ``docs/fast_rl.png``.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ROOT, write_results  # noqa: E402

import report  # noqa: E402

SETTINGS = ("all_steps", "fast")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="short CPU variant (seed 0, 150 s per run, fewer samples)")
    p.add_argument("--task", default="compress", help="embedded task (compress: its reward's max is reachable; "
                   "brightness and slant rarely pass 80%% of the headroom)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--budget", type=float, default=None, help="training seconds per run (default 60 GPU, 150 CPU)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default 10 GPU, 5 CPU)")
    p.add_argument("--eval-samples", type=int, default=None, help="samples per held-out prompt (default 8 GPU, 2 CPU)")
    p.add_argument("--num-steps", type=int, default=10, help="sampling steps of a rollout")
    p.add_argument("--window", type=int, default=2, help="SDE steps in the fast setting's window")
    p.add_argument("--window-range", type=int, nargs=2, default=[0, 5], metavar=("FIRST", "END"),
                   help="steps the window lies in (Flow-GRPO-Fast: the first half of the steps)")
    p.add_argument("--window-mode", choices=["random", "sliding"], default="random")
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--rollouts-per-prompt", type=int, default=8)
    p.add_argument("--minibatch", type=int, default=64, help="pairs per update of the all-steps setting")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--compile", action="store_true", help="the methods' default runtime.compile (regional on CUDA)")
    p.add_argument("--work", default="runs/fast_rl", help="where prompts and grids go")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default=None, help="default benchmarks/results/fast_rl.json (fast_rl_cpu.json with --cpu)")
    p.add_argument("--no-docs", action="store_true", help="do not rewrite README.md and docs/ (implied by --cpu)")
    args = p.parse_args(argv)
    args.budget = args.budget or (150.0 if args.cpu else 60.0)
    args.eval_every = args.eval_every or (5 if args.cpu else 10)
    args.eval_samples = args.eval_samples or (2 if args.cpu else 8)
    name = "fast_rl_cpu.json" if args.cpu else "fast_rl.json"
    args.out = args.out or str(ROOT / "benchmarks" / "results" / name)
    return args


def settings_of(name: str, args) -> dict:
    """TeacherRL's settings groups for ``name``: the same updates per step in both settings."""
    pairs = args.prompts_per_step * args.rollouts_per_prompt * args.num_steps
    updates_per_step = math.ceil(pairs / args.minibatch)
    sampling = {"num_steps": args.num_steps, "rollouts_per_prompt": args.rollouts_per_prompt}
    if name == "all_steps":
        return {"sampling": sampling, "updates": {"minibatch_size": args.minibatch}}
    window_pairs = args.prompts_per_step * args.rollouts_per_prompt * args.window
    window = {"size": args.window, "mode": args.window_mode, "range": list(args.window_range)}
    return {"sampling": {**sampling, "sde_window": window},
            "updates": {"minibatch_size": math.ceil(window_pairs / updates_per_step)}}


def run(args, name: str, seed: int) -> dict:
    """One TeacherRL run of setting ``name``: ``{"curve": [[seconds, reward], ...], "base", "max", "steps", ...}``."""
    import lightning as L

    from lit_distill.callbacks.reward import RewardCallback
    from lit_distill.callbacks.timing import TrainingClock
    from lit_distill.data import PromptDataModule
    from lit_distill.data.prompts import read_prompt_file
    from lit_distill.methods import TeacherRL
    from lit_distill.pipeline import TASK_REWARDS, ensure_embedded_base, split_prompts

    work = Path(args.work) / f"seed{seed}"
    base = ensure_embedded_base(cache_dir=args.cache_dir)
    prompts = split_prompts(work, list(TASK_REWARDS))
    eval_rows = [row for row in read_prompt_file(str(prompts["eval"])) if row["task"] == args.task]
    settings = settings_of(name, args)
    module = TeacherRL(str(base), TASK_REWARDS[args.task], **settings, optim={"lr": args.lr},
                       runtime={"seed": seed, **({} if args.compile else {"compile": "off"})})
    clock = TrainingClock(budget_s=args.budget)
    evaluation = RewardCallback(eval_rows, reward=TASK_REWARDS[args.task], num_prompts=None,
                                samples_per_prompt=args.eval_samples, every_n_steps=args.eval_every,
                                output_dir=str(work / name / "grids"), save_best=False, seed=seed)
    data = PromptDataModule(str(prompts[args.task]), batch_size=args.prompts_per_step, val_fraction=0.0, repeat=1000,
                            seed=seed)
    L.seed_everything(seed, verbose=False)
    started = time.time()
    trainer = L.Trainer(max_steps=10**6, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[clock, evaluation])  # the clock first: evaluations after it
    trainer.fit(module, data)
    curve = [[clock.seconds_at_step[h["step"]], h[args.task]] for h in evaluation.history]
    result = {"curve": curve, "base": curve[0][1], "max": module.reward.max_value, "steps": trainer.global_step,
              "train_seconds": clock.seconds, "wall_seconds": round(time.time() - started, 1),
              "settings": {k: v for k, v in settings.items()}, "images_per_s": clock.images_per_s}
    result["seconds_to_90"] = seconds_to_fraction(curve, result["base"], result["max"], 0.9)
    print(f"[fast_rl] seed {seed} {name}: {result['base']:.3f} -> {curve[-1][1]:.3f} (max {result['max']}) in "
          f"{trainer.global_step} steps, {clock.seconds:.0f} s of training; 90% of the headroom at "
          f"{result['seconds_to_90'] if result['seconds_to_90'] is None else round(result['seconds_to_90'], 1)} s",
          flush=True)
    return result


def seconds_to_fraction(curve: list, base: float, top: float, fraction: float) -> Optional[float]:
    """Training seconds at which ``curve`` (``[[seconds, reward], ...]``) first reaches ``base + fraction * (top -
    base)``, interpolated linearly between the evaluations around the crossing; None if it never does."""
    target = base + fraction * (top - base)
    for (s0, r0), (s1, r1) in zip(curve[:-1], curve[1:]):
        if r1 >= target:
            return s1 if r1 == r0 else s0 + (s1 - s0) * max(0.0, (target - r0) / (r1 - r0))
    return None


def mean_curve(curves: list[list]) -> list[list]:
    """Point by point mean (seconds and reward) over seeds, as far as every seed's curve goes."""
    length = min(len(c) for c in curves)
    return [[sum(c[i][0] for c in curves) / len(curves), sum(c[i][1] for c in curves) / len(curves)]
            for i in range(length)]


def measure(args) -> dict:
    per_seed = {str(seed): {name: run(args, name, seed) for name in SETTINGS} for seed in args.seeds}
    runs, to_90 = {}, {}
    for name in SETTINGS:
        parts = [per_seed[str(s)][name] for s in args.seeds]
        runs[name] = {"curve": mean_curve([p["curve"] for p in parts]), "base": sum(p["base"] for p in parts) / len(parts),
                      "max": parts[0]["max"], "settings": parts[0]["settings"],
                      "images_per_s": sum(p["images_per_s"] for p in parts) / len(parts),
                      "steps": [p["steps"] for p in parts]}
        times = [p["seconds_to_90"] for p in parts]
        to_90[name] = None if any(t is None for t in times) else sum(times) / len(times)
    return {"task": args.task, "seeds": list(args.seeds), "runs": runs, "seconds_to_90": to_90,
            "speedup_to_90": to_90["all_steps"] / to_90["fast"] if all(to_90.values()) else None,
            "budget_seconds": args.budget, "eval_every": args.eval_every, "eval_samples_per_prompt": args.eval_samples,
            "compile": bool(args.compile), "per_seed": per_seed}


def main(argv=None):
    args = parse(argv)
    write_results("fast_rl", measure(args), args.out)
    if not (args.cpu or args.no_docs):
        report.write_all()


if __name__ == "__main__":
    main()

"""TeacherRL on the three embedded tasks: reward before and after, every other task's reward (reward
hacking stays visible), reward curves, images/s; saves the three teachers for benchmarks/opd_vs_rl.py.

    python benchmarks/teacher_rl.py                 # GPU (the figures in docs/benchmarks.md)
    python benchmarks/teacher_rl.py --cpu           # the shorter CPU variant
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import plot_curves, update_docs_table, write_results  # noqa: E402

from lit_distill.methods import TeacherRL  # noqa: E402
from lit_distill.pipeline import TASK_REWARDS, ensure_embedded_base, fit_stage, split_prompts  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="short CPU variant")
    p.add_argument("--steps", type=int, help="optimiser steps per teacher (default 300 GPU, 40 CPU)")
    p.add_argument("--work", default="runs/bench", help="where teachers, prompts and logs go")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--pretrain-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--num-steps", type=int, default=10)
    p.add_argument("--tasks", nargs="+", default=list(TASK_REWARDS))
    p.add_argument("--out", default="benchmarks/results/teacher_rl.json")
    p.add_argument("--docs-only", action="store_true", help="measure nothing: rebuild figures and table from --out")
    return p.parse_args(argv)


def train_teachers(args) -> dict:
    steps = args.steps or (40 if args.cpu else 300)
    work = Path(args.work)
    base = ensure_embedded_base(cache_dir=args.cache_dir, **({"max_steps": args.pretrain_steps} if args.pretrain_steps else {}))
    prompts = split_prompts(work, args.tasks)
    results, ips = {}, []
    for task in args.tasks:
        module = TeacherRL(str(base), TASK_REWARDS[task], num_steps=args.num_steps, group_size=args.group_size,
                           lr=args.lr, minibatch_size=64)
        history, seconds, images_per_s = fit_stage(module, prompts[task], prompts["eval"], steps, work,
                                                   f"teacher_{task}", args.prompts_per_step,
                                                   every_n_steps=max(1, steps // 6), progress=not args.cpu)
        results[task] = {
            "base": history[0][task], "final": history[-1][task], "max": module.reward.max_value,
            "steps": history[-1]["step"], "wall_seconds": round(seconds, 1),
            "others": {t: history[-1][t] for t in history[-1] if t not in (task, "step", "reward")},
            "others_base": {t: history[0][t] for t in history[0] if t not in (task, "step", "reward")},
            "curve": [[h["step"], h[task]] for h in history], "images_per_s": round(images_per_s, 1),
            "model": str(work / f"teacher_{task}" / "model"),
        }
        ips.append(images_per_s)
        print(f"[teacher_rl] {task}: {results[task]['base']:.3f} -> {results[task]['final']:.3f} "
              f"(max {results[task]['max']}) in {seconds:.0f}s")
    return {"tasks": results, "images_per_s": round(sum(ips) / len(ips), 1), "base_model": str(base),
            "eval_prompts": str(prompts["eval"])}


def main(argv=None):
    args = parse(argv)
    if not args.docs_only:
        write_results("teacher_rl", train_teachers(args), args.out)
    write_docs(args.out)


def write_docs(results: str) -> None:
    figures = json.loads(Path(results).read_text())["figures"]
    for task, r in figures["tasks"].items():
        plot_curves({task: r["curve"]}, f"docs/teacher_rl_{task}.png", xlabel="optimiser step",
                    ylabel=f"{task} reward (held-out prompts)", hline=r["max"])
    rows = [[t, f"{r['base']:.3f}", f"{r['final']:.3f}", f"{r['max']:.3f}" if r["max"] is not None else "-",
             f"{(r['final'] - r['base']) / max((r['final'] if r['max'] is None else r['max']) - r['base'], 1e-12):.0%}",
             r["steps"],
             f"{r['wall_seconds']:.0f}", ", ".join(f"{k} {v:.3f}" for k, v in r["others"].items())]
            for t, r in figures["tasks"].items()]
    update_docs_table("teacher_rl", ["task", "base", "final", "max", "headroom gained", "steps", "seconds",
                                     "other tasks (final)"], rows, results,
                      note="Rewards on held-out prompts (2 samples each, fixed seeds, 20-step ODE sampler).")


if __name__ == "__main__":
    main()

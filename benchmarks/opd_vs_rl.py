"""OPD student vs multi-reward RL vs cascade RL, from the same base at equal student updates.

Needs the teachers of benchmarks/teacher_rl.py (trains them if benchmarks/results/teacher_rl.json
does not point at existing ones).

    python benchmarks/opd_vs_rl.py            # GPU
    python benchmarks/opd_vs_rl.py --cpu      # short CPU variant
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import plot_bars, update_docs_table, write_results  # noqa: E402

from lit_distill.methods import OPDStudent, TeacherRL  # noqa: E402
from lit_distill.pipeline import MULTI_REWARD, TASK_REWARDS, fit_stage, rewards_of, split_prompts  # noqa: E402

import teacher_rl  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--steps", type=int, help="student optimiser steps, equal for the three students")
    p.add_argument("--work", default="runs/bench")
    p.add_argument("--teachers", default="benchmarks/results/teacher_rl.json")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--num-steps", type=int, default=10)
    p.add_argument("--out", default="benchmarks/results/opd_vs_rl.json")
    p.add_argument("--docs-only", action="store_true", help="measure nothing: rebuild figure and table from --out")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if not args.docs_only:
        write_results("opd_vs_rl", measure(args), args.out)
    write_docs(args.out)


def measure(args) -> dict:
    steps = args.steps or (40 if args.cpu else 300)
    work = Path(args.work)
    teachers_file = Path(args.teachers)
    if teachers_file.is_file():
        prior = json.loads(teachers_file.read_text())["figures"]
    if not teachers_file.is_file() or not all(Path(t["model"]).is_dir() for t in prior["tasks"].values()):
        prior = teacher_rl.train_teachers(teacher_rl.parse((["--cpu"] if args.cpu else []) + ["--work", args.work]))
    tasks = list(prior["tasks"])
    base = prior["base_model"]
    prompts = split_prompts(work, tasks)
    common = dict(num_steps=args.num_steps, lr=args.lr)
    systems, seconds = {"base": {t: prior["tasks"][t]["base"] for t in tasks}}, {}
    for t in tasks:
        systems[f"teacher/{t}"] = {t: prior["tasks"][t]["final"], **prior["tasks"][t]["others"]}

    opd = OPDStudent(base, {t: prior["tasks"][t]["model"] for t in tasks}, rollouts_per_prompt=args.group_size,
                     minibatch_size=64, **common)
    history, seconds["opd"], _ = fit_stage(opd, prompts["multitask"], prompts["eval"], steps, work, "opd",
                                           args.prompts_per_step, progress=not args.cpu)
    systems["opd"] = rewards_of(history[-1])

    multi = TeacherRL(base, MULTI_REWARD, group_size=args.group_size, minibatch_size=64, **common)
    history, seconds["multi_reward_rl"], _ = fit_stage(multi, prompts["multitask"], prompts["eval"], steps, work,
                                                       "multi_reward_rl", args.prompts_per_step, progress=not args.cpu)
    systems["multi_reward_rl"] = rewards_of(history[-1])

    model, seconds["cascade_rl"] = base, 0.0
    for i, t in enumerate(tasks):
        stage = TeacherRL(model, TASK_REWARDS[t], group_size=args.group_size, minibatch_size=64, **common)
        share = steps // len(tasks) + (1 if i < steps % len(tasks) else 0)
        history, sec, _ = fit_stage(stage, prompts[t], prompts["eval"], share, work, f"cascade_{i}_{t}",
                                    args.prompts_per_step, progress=not args.cpu)
        model, seconds["cascade_rl"] = str(work / f"cascade_{i}_{t}" / "model"), seconds["cascade_rl"] + sec
    systems["cascade_rl"] = rewards_of(history[-1])

    for name in systems:
        systems[name] = {t: systems[name][t] for t in tasks}
    return {"tasks": tasks, "systems": systems, "student_updates": steps,
            "wall_seconds": {k: round(v, 1) for k, v in seconds.items()}}


def write_docs(results: str) -> None:
    figures = json.loads(Path(results).read_text())["figures"]
    tasks, systems = figures["tasks"], figures["systems"]
    plot_bars(systems, tasks, "docs/opd_vs_rl.png", ylabel="reward on held-out prompts")
    kept = lambda s, t: (systems[s][t] - systems["base"][t]) / max(systems[f"teacher/{t}"][t] - systems["base"][t], 1e-12)  # noqa: E731
    rows = [[s] + [f"{systems[s][t]:.3f}" for t in tasks] + [f"{sum(systems[s].values()) / len(tasks):.3f}"]
            + [", ".join(f"{kept(s, t):.0%}" for t in tasks) if not s.startswith("teacher") and s != "base" else ""]
            for s in systems]
    update_docs_table("opd_vs_rl", ["system", *tasks, "mean", "teacher gain kept"], rows, results,
                      note=f"{figures['student_updates']} optimiser steps per student; rewards on held-out prompts. "
                      + figures.get("note", ""))


if __name__ == "__main__":
    main()

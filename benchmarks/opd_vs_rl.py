"""OPD student vs joint multi-reward RL vs cascade RL, from the same base at equal student updates, per seed.

Every seed's students distil (OPD) or start from (cascade) the teachers of the same seed, written by
benchmarks/teacher_rl.py (``--teachers``, its results file). The three students:

- ``opd``: OPDStudent on the mixed prompts of every task, each prompt routed to its task's teacher;
- ``multi_reward_rl``: TeacherRL on the same mixed prompts, each prompt scored by its own task's reward
  (joint RL over the tasks: DiffusionOPD's multi-reward baseline);
- ``cascade_rl``: TeacherRL on task 1, then task 2 from that result, then task 3, a third of the updates each.

``--ablations`` adds OPD variants (``{"name": {OPDStudent keyword: value}}``), each on its own, reported
under ``figures.ablations``.

    python benchmarks/opd_vs_rl.py --seeds 0 1 2 --jobs 9     # GPU
    python benchmarks/opd_vs_rl.py --cpu                     # short CPU variant, seed 0
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_jobs, seed_mean, write_results  # noqa: E402

import report  # noqa: E402

from lit_distill.pipeline import PER_TASK_REWARD, TASK_REWARDS, fit_stage, rewards_of, split_prompts  # noqa: E402

#: OPDStudent settings of the main row (its defaults): DiffusionOPD's timestep_fraction 0.99 (the last of 10 steps
#: left out) and mean matching on every step
OPD_SETTINGS = {"updates": {"timestep_fraction": 0.99}, "distill": {"step_weighting": "mean"}}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--steps", type=int, help="training steps of each student (a rollout batch and its minibatch "
                   "updates each; default 120 GPU, 8 CPU), equal for the three students")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the seeds of --teachers")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--systems", nargs="+", default=["opd", "multi_reward_rl", "cascade_rl"])
    p.add_argument("--opd", type=json.loads, default=OPD_SETTINGS, help="OPDStudent keywords of the main row (JSON)")
    p.add_argument("--ablations", type=json.loads, default={}, help='OPD variants, e.g. \'{"kl": {"distill": {"step_weighting": "kl"}}}\'')
    p.add_argument("--work", default="runs/bench")
    p.add_argument("--teachers", default="benchmarks/results/teacher_rl.json")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--rollouts-per-prompt", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--num-steps", type=int, default=10)
    p.add_argument("--eval-samples", type=int, default=8)
    p.add_argument("--unit", nargs=2, metavar=("SEED", "SYSTEM"), help=argparse.SUPPRESS)
    p.add_argument("--out", default="benchmarks/results/opd_vs_rl.json")
    return p.parse_args(argv)


def teachers_of(args) -> dict:
    figures = json.loads(Path(args.teachers).read_text())["figures"]
    missing = [m for models in figures["models"].values() for m in models.values() if not Path(m).is_dir()]
    if missing:
        raise FileNotFoundError(f"{args.teachers} names teachers that are not on disk ({missing[:3]}...): run "
                                "benchmarks/teacher_rl.py first (with the same --work)")
    return figures


def unit_file(work: Path, seed: int, system: str) -> Path:
    return work / f"seed{seed}" / f"student_{system}.json"


def run_unit(args, seed: int, system: str) -> dict:
    """Train one student of one seed; returns (and writes) ``{"rewards", "seconds"}``."""
    from lit_distill.methods import OPDStudent, TeacherRL

    steps = args.steps or (8 if args.cpu else 120)
    prior = teachers_of(args)
    tasks, base = list(prior["tasks"]), prior["base_model"]
    work = Path(args.work) / f"seed{seed}"
    prompts = split_prompts(work / system, tasks)
    common = dict(sampling={"num_steps": args.num_steps, "rollouts_per_prompt": args.rollouts_per_prompt},
                  optim={"lr": args.lr}, runtime={"seed": seed})
    fit = dict(batch_size=args.prompts_per_step, progress=False, samples_per_prompt=args.eval_samples, seed=seed)
    if system == "opd" or system.startswith("opd["):
        settings = {**args.opd, **args.ablations.get(system[4:-1], {})} if system != "opd" else dict(args.opd)
        updates = {"minibatch_size": 64, **settings.pop("updates", {})}
        student = OPDStudent(base, prior["models"][str(seed)], updates=updates, **common, **settings)
        history, seconds, _ = fit_stage(student, prompts["multitask"], prompts["eval"], steps, work, system, **fit)
    elif system == "multi_reward_rl":
        student = TeacherRL(base, PER_TASK_REWARD, updates={"minibatch_size": 64}, **common)
        history, seconds, _ = fit_stage(student, prompts["multitask"], prompts["eval"], steps, work, system, **fit)
    elif system == "cascade_rl":
        model, seconds = base, 0.0
        for i, t in enumerate(tasks):
            stage = TeacherRL(model, TASK_REWARDS[t], updates={"minibatch_size": 64}, **common)
            share = steps // len(tasks) + (1 if i < steps % len(tasks) else 0)
            history, sec, _ = fit_stage(stage, prompts[t], prompts["eval"], share, work, f"cascade_{i}_{t}", **fit)
            model, seconds = str(work / f"cascade_{i}_{t}" / "model"), seconds + sec
    else:
        raise ValueError(f"unknown system {system!r}")
    part = {"rewards": {t: rewards_of(history[-1])[t] for t in tasks}, "seconds": round(seconds, 1)}
    unit_file(Path(args.work), seed, system).write_text(json.dumps(part))
    print(f"[opd_vs_rl] seed {seed} {system}: {part['rewards']} in {seconds:.0f}s", flush=True)
    return part


def measure(args) -> dict:
    prior = teachers_of(args)
    tasks = list(prior["tasks"])
    seeds = args.seeds if args.seeds is not None else prior.get("seeds", [0])
    systems = list(args.systems) + [f"opd[{name}]" for name in args.ablations]
    units = [(seed, system) for seed in seeds for system in systems]
    if args.jobs > 1:
        keep = ("steps", "work", "teachers", "lr", "rollouts_per_prompt", "prompts_per_step", "num_steps", "eval_samples")
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in keep and v is not None]
        flags += ["--opd", json.dumps(args.opd), "--ablations", json.dumps(args.ablations)] + (["--cpu"] if args.cpu else [])
        run_jobs([[__file__, *flags, "--unit", str(s), name] for s, name in units], args.jobs,
                 Path(args.work) / "logs_opd_vs_rl")
        parts = {u: json.loads(unit_file(Path(args.work), *u).read_text()) for u in units}
    else:
        parts = {u: run_unit(args, *u) for u in units}
    per_seed = {}
    for seed in seeds:
        teachers = prior["per_seed"][str(seed)]
        rows = {"base": {t: teachers[t]["base"] for t in tasks}}
        for t in tasks:
            rows[f"teacher/{t}"] = {t: teachers[t]["final"], **{o: teachers[t]["others"][o] for o in tasks if o != t}}
        rows.update({name: parts[(seed, name)]["rewards"] for name in systems})
        per_seed[str(seed)] = rows
    mean = seed_mean(per_seed)
    main = {k: v for k, v in mean.items() if not k.startswith("opd[")}
    return {"tasks": tasks, "seeds": seeds, "systems": main, "per_seed": per_seed,
            "ablations": {k[4:-1]: {"settings": args.ablations[k[4:-1]], "rewards": v}
                          for k, v in mean.items() if k.startswith("opd[")},
            "opd_settings": args.opd, "student_steps": args.steps or (8 if args.cpu else 120),
            "wall_seconds": {name: round(sum(parts[(s, name)]["seconds"] for s in seeds) / len(seeds), 1)
                             for name in systems},
            "eval_samples_per_prompt": args.eval_samples}


def main(argv=None):
    args = parse(argv)
    if args.unit:
        run_unit(args, int(args.unit[0]), args.unit[1])
        return
    write_results("opd_vs_rl", measure(args), args.out)
    report.write_all()


if __name__ == "__main__":
    main()

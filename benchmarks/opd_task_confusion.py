"""The control of OPD's task routing: two tasks on prompts the base tells apart, or not.

The OPD student knows a prompt's task only from the prompt. This script trains a brightness and a compress
teacher (TeacherRL) on each prompt set, then OPD students from the same base at equal steps, and reports the
share of each teacher's reward gain the student keeps on held-out prompts:

- ``single``: brightness alone (one teacher: no task to tell apart);
- ``shipped``: both tasks with the shipped prompts ("a bold handwritten three" / "a thin handwritten three"),
  whose style words the base learned from its captions;
- ``templates``: both tasks on plain caption templates ("a handwritten three" / "the digit three"), which
  carry no style word: no student can be two teachers on what is, for it, the same input;
- ``digits``: brightness on digits 0-4, compress on digits 5-9 (prompts the base certainly tells apart).

    python benchmarks/opd_task_confusion.py            # CPU, about 5 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

import report  # noqa: E402

from lit_distill.data import DIGIT_WORDS, PROMPT_TEMPLATES, write_prompt_file  # noqa: E402
from lit_distill.methods import OPDStudent, TeacherRL  # noqa: E402
from lit_distill.pipeline import TASK_REWARDS, ensure_embedded_base, fit_stage, rewards_of  # noqa: E402

TASKS = ("brightness", "compress")
PROMPT_SETS = {
    "single": {"brightness": PROMPT_TEMPLATES["brightness"]},
    "shipped": {t: PROMPT_TEMPLATES[t] for t in TASKS},
    "templates": {"brightness": ["a handwritten {word}", "a handwritten digit {word}"],
                  "compress": ["the number {word} written by hand", "the digit {word}"]},
    "digits": {t: PROMPT_TEMPLATES[t] for t in TASKS},
}
DIGITS = {"digits": {"brightness": range(0, 5), "compress": range(5, 10)}}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="training steps of each teacher and each student (a rollout "
                   "batch of 4 prompts x 8 and its 5 minibatch updates each)")
    p.add_argument("--work", default="runs/opd_task_confusion")
    p.add_argument("--out", default="benchmarks/results/opd_task_confusion.json")
    return p.parse_args(argv)


def digits_of(name: str, task: str) -> range:
    """The digits whose prompts task ``task`` of prompt set ``name`` holds."""
    return DIGITS.get(name, {}).get(task, range(10))


def prompt_rows(name: str) -> tuple[list[dict], list[dict]]:
    """Training and held-out prompt rows of prompt set ``name``: template ``i`` with digit ``d`` is held out
    when ``(i + d) % 4 == 0``, so every task holds out about a quarter of its prompts, spread over its digits."""
    train, held_out = [], []
    for task, templates in PROMPT_SETS[name].items():
        for i, template in enumerate(templates):
            for d in digits_of(name, task):
                row = {"prompt": template.format(word=DIGIT_WORDS[d]), "task": task}
                (held_out if (i + d) % 4 == 0 else train).append(row)
    return train, held_out


def prompt_files(name: str, out: Path) -> dict[str, Path]:
    """:func:`prompt_rows` of prompt set ``name`` written to ``out/name/{train,eval}.jsonl``."""
    (out / name).mkdir(parents=True, exist_ok=True)
    return {key: write_prompt_file(out / name / f"{key}.jsonl", rows)
            for key, rows in zip(("train", "eval"), prompt_rows(name))}


def evaluate(model: str, task: str, files: dict, out: Path, name: str) -> dict:
    """Rewards of ``model`` on the held-out prompts (a TeacherRL fit of one step at a negligible rate)."""
    module = TeacherRL(model, TASK_REWARDS[task], sampling={"num_steps": 10, "rollouts_per_prompt": 8},
                       optim={"lr": 1e-12}, runtime={"seed": 0})
    history, _, _ = fit_stage(module, files["eval"], files["eval"], 1, out, name, 4, progress=False)
    return rewards_of(history[0])


def measure(args) -> dict:
    work, base = Path(args.work), str(ensure_embedded_base())
    teachers, files = {}, prompt_files("shipped", work)
    shipped_train, _ = prompt_rows("shipped")
    for task in TASKS:
        task_file = write_prompt_file(work / f"{task}.jsonl", [r for r in shipped_train if r["task"] == task])
        module = TeacherRL(base, TASK_REWARDS[task], sampling={"num_steps": 10, "rollouts_per_prompt": 8},
                           updates={"minibatch_size": 64}, optim={"lr": 1e-4}, runtime={"seed": 0})
        fit_stage(module, task_file, files["eval"], args.steps, work, f"teacher_{task}", 4, progress=False)
        teachers[task] = str(work / f"teacher_{task}" / "model")
    results = {}
    for name, sets in PROMPT_SETS.items():
        files = prompt_files(name, work)
        student = OPDStudent(base, {t: teachers[t] for t in sets}, sampling={"num_steps": 10, "rollouts_per_prompt": 8},
                             optim={"lr": 1e-4}, runtime={"seed": 0})
        history, seconds, _ = fit_stage(student, files["train"], files["eval"], args.steps, work, f"opd_{name}", 4,
                                        progress=False)
        entry = {"base": rewards_of(history[0]), "opd": rewards_of(history[-1]), "seconds": round(seconds, 1),
                 "example_prompts": {t: tpl[0].format(word=DIGIT_WORDS[digits_of(name, t)[-1] if name in DIGITS else 3])
                                     for t, tpl in sets.items()}}
        for task in sets:
            entry[f"teacher/{task}"] = evaluate(teachers[task], task, files, work, f"eval_{name}_{task}")
            gain = entry[f"teacher/{task}"][task] - entry["base"][task]
            entry.setdefault("kept", {})[task] = round((entry["opd"][task] - entry["base"][task]) / gain, 3)
        results[name] = entry
        print(f"[opd_task_confusion] {name}: kept {entry['kept']}", flush=True)
    return {"steps": args.steps, "prompt_sets": results,
            "note": "kept = (OPD - base) / (teacher - base) of each task's reward on that set's held-out prompts"}


def main(argv=None):
    args = parse(argv)
    write_results("opd_task_confusion", measure(args), args.out)
    report.write_all()


if __name__ == "__main__":
    main()

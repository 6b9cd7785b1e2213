"""The embedded pipeline: base model -> three task teachers -> OPD student -> one-step generator.

``lit-distill quickstart`` runs it end to end on the embedded digits (CPU-sized by default); each
stage is also a plain ``lit-distill fit --config configs/...`` run. The base model is trained by the one
``BaseRecipe`` and cached in a folder named after it, so every later run naming ``embedded:base``
(configs, notebooks, tests) reuses exactly that model.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .models.base_recipe import EMBEDDED_BASE, BaseRecipe, default_base_recipe

if TYPE_CHECKING:  # the heavy imports happen inside the functions: `lit-distill quickstart --help` stays fast
    import lightning as L

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


def __getattr__(name: str):
    """``DIGIT_PROMPTS``: class-balanced prompts ("a handwritten zero" .. "a handwritten nine") on which the one-step
    generators of the embedded digits are evaluated (their ``eval_prompts``; also in configs/disback and
    configs/nodistill). Built on first use, so that importing the pipeline stays light."""
    if name == "DIGIT_PROMPTS":
        from .data.embedded import caption_for

        return [caption_for(digit) for digit in range(10)]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def trainer(max_steps: int, out_dir: Optional[Path] = None, callbacks=(), progress: bool = True,
            **kwargs) -> "L.Trainer":
    """The Trainer every pipeline stage uses: one device, no checkpoints, ``max_steps`` training steps shown by
    ``StepProgressBar``, metrics in CSV under ``out_dir/logs`` and in TensorBoard under ``out_dir/tensorboard``
    (``tensorboard --logdir`` of the pipeline's folder finds every stage)."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from .callbacks.progress import StepProgressBar

    loggers = False
    if out_dir is not None:
        loggers = [CSVLogger(str(out_dir), name="logs"),
                   TensorBoardLogger(str(out_dir), name="tensorboard", default_hp_metric=False)]
    callbacks = list(callbacks) + ([StepProgressBar()] if progress else [])
    return L.Trainer(max_steps=max_steps, accelerator="auto", devices=1, callbacks=callbacks, logger=loggers,
                     enable_checkpointing=False, enable_progress_bar=progress, enable_model_summary=False,
                     limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=kwargs.pop("log_every_n_steps", 1),
                     **kwargs)


def ensure_embedded_base(recipe: Optional[BaseRecipe] = None, cache_dir: Optional[str] = None,
                         progress: bool = True, **changes) -> Path:
    """The directory of the embedded base model that ``recipe`` trains (default: ``default_base_recipe()``,
    with ``changes`` to its fields, e.g. ``max_steps=200``), training it first if it is not cached yet:
    ``DiffusionPretrain`` by flow matching / DSM, EMA weights exported to ``recipe.directory(cache_dir)``."""
    import lightning as L

    from .callbacks.export import ExportCallback
    from .data import ImageDataModule
    from .methods import DiffusionPretrain

    recipe = (recipe or default_base_recipe()).replace(**changes)
    path = recipe.directory(cache_dir)
    if (path / "model_index.json").is_file():
        return path
    print(f"[lit-distill] training the embedded base model ({recipe.max_steps} steps) -> {path}", flush=True)
    L.seed_everything(recipe.seed, verbose=False)
    module = DiffusionPretrain("embedded", recipe.model_kwargs, prompt_dropout=recipe.prompt_dropout,
                               ema_decay=recipe.ema_decay, optim={"lr": recipe.lr}, runtime={"seed": recipe.seed})
    data = ImageDataModule(recipe.data, resolution=recipe.resolution, batch_size=recipe.batch_size, seed=recipe.seed)
    logs = path.parent / f"{path.name}.logs"
    trainer(recipe.max_steps, logs, [ExportCallback(str(path))], progress=progress).fit(module, data)
    (path / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2) + "\n")
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
    recipe = default_base_recipe()
    parser = argparse.ArgumentParser(
        prog="lit-distill embedded-base", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train the embedded base model of the base recipe (lit_distill.models.BaseRecipe) on the embedded "
                    "digits and cache it where model: embedded:base finds it (nothing to do when it is cached); "
                    "print its directory. Another --max-steps trains and caches another base.")
    parser.add_argument("--cache-dir", default=None, help="default: $LIT_DISTILL_CACHE or ~/.cache/lit_distill")
    parser.add_argument("--max-steps", type=int, default=recipe.max_steps, help="training steps")
    args = parser.parse_args(argv)
    print(ensure_embedded_base(recipe, args.cache_dir, max_steps=args.max_steps))


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


def reward_evaluation(eval_prompts: Path, out_dir: Path, every_n_steps: int = 0, samples_per_prompt: int = 2,
                      eval_at_start: bool = True, seed: int = 0):
    """The RewardCallback of every pipeline stage: every task's reward on the held-out prompts, grids in
    ``out_dir``."""
    from .callbacks.reward import RewardCallback

    return RewardCallback(str(eval_prompts), reward=PER_TASK_REWARD, num_prompts=None,
                          samples_per_prompt=samples_per_prompt, every_n_steps=every_n_steps,
                          output_dir=str(out_dir), save_best=False, eval_at_start=eval_at_start, seed=seed)


def fit_stage(module, prompts: Path, eval_prompts: Path, max_steps: int, out: Path, name: str,
              batch_size: int = 4, every_n_steps: int = 0, samples_per_prompt: int = 2, progress: bool = True,
              seed: int = 0, eval_at_start: bool = True):
    """Fit an on-policy module (TeacherRL / OPDStudent) on a prompt file, evaluating every task's reward
    on the held-out prompts before (unless ``eval_at_start`` is False), during (every ``every_n_steps``) and
    after training; exports the model to ``out/name/model``. Returns ``(reward history, seconds, images_per_s)``."""
    from .callbacks.export import ExportCallback
    from .callbacks.timing import TrainingClock
    from .data import PromptDataModule

    data = PromptDataModule(str(prompts), batch_size=batch_size, val_fraction=0.0, repeat=1000, seed=seed)
    evaluation = reward_evaluation(eval_prompts, out / name / "grids", every_n_steps, samples_per_prompt, eval_at_start,
                                   seed)
    clock = TrainingClock()  # listed first: the evaluations run after it stops, outside the timed steps
    start = time.time()
    trainer(max_steps, out / name, [clock, evaluation, ExportCallback(str(out / name / "model"))],
            progress=progress).fit(module, data)
    return evaluation.history, time.time() - start, clock.images_per_s


def rewards_of(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k != "step"}


def _option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class QuickstartConfig:
    """The sizes of ``lit-distill quickstart`` (each one a ``--option``; ``LIT_DISTILL_TINY=1`` shrinks them)."""

    out_dir: str = _option("outputs/quickstart", "where prompts, grids, logs, models and summary.json go")
    cache_dir: Optional[str] = _option(None, "cache of the base model, the digit classifier and FID statistics "
                                             "(default: $LIT_DISTILL_CACHE, else ~/.cache/lit_distill)")
    pretrain_steps: Optional[int] = _option(None, f"steps of the base model (default: {BaseRecipe.max_steps}, the "
                                                  "base recipe's, shared with every `embedded:base` run; another "
                                                  "value trains and caches another base)")
    teacher_steps: int = _option(30, "training steps of each task teacher (TeacherRL): each one rollout batch and "
                                     "its minibatch updates")
    opd_steps: int = _option(30, "training steps of the OPD student")
    one_step_steps: int = _option(185, "training steps of the one-step generator (DisBack): up to the first 2/5 "
                                       "record the degradation path, the rest update the generator")
    prompts_per_step: int = _option(4, "prompts per rollout batch")
    rollouts_per_prompt: int = _option(8, "rollouts per prompt (TeacherRL's GRPO group, OPD's rollouts per prompt)")
    num_steps: int = _option(10, "sampling steps of a rollout")
    samples_per_prompt: int = _option(2, "images per held-out prompt in each evaluation")
    fid_samples: int = _option(500, "images of each FID evaluation of the one-step generator")
    seed: int = _option(0, "seed of the data split and of every stage")
    tasks: list = field(default_factory=lambda: list(TASK_REWARDS))

    @classmethod
    def tiny(cls, **changes) -> "QuickstartConfig":
        """Smoke-test sizes (``LIT_DISTILL_TINY=1``): a few steps per stage, small evaluations."""
        sizes = dict(teacher_steps=2, opd_steps=2, one_step_steps=8, prompts_per_step=2, rollouts_per_prompt=2,
                     num_steps=4, samples_per_prompt=1, fid_samples=32)
        return cls(**{**sizes, **changes})


class Stages:
    """Names each stage as it starts (``[4/7] teacher 'brightness': ...``) and times it."""

    def __init__(self, total: int):
        self.total, self.done, self.seconds = total, 0, {}
        self._name, self._t = None, 0.0

    def start(self, key: str, text: str) -> None:
        self._finish()
        self.done += 1
        self._name, self._t = key, time.time()
        print(f"\n[{self.done}/{self.total}] {text}", flush=True)

    def _finish(self) -> None:
        if self._name is not None:
            self.seconds[self._name] = round(time.time() - self._t, 1)
            self._name = None

    def finish(self) -> dict:
        self._finish()
        return self.seconds


@contextlib.contextmanager
def cache_in(cache_dir: Optional[str]):
    """``$LIT_DISTILL_CACHE`` set to ``cache_dir`` inside the block (nothing changes when it is None), so that every
    part (base model, the rewards' digit classifier, FID statistics) reads and writes the same cache."""
    if cache_dir is None:
        yield
        return
    old = os.environ.get("LIT_DISTILL_CACHE")
    os.environ["LIT_DISTILL_CACHE"] = str(cache_dir)
    try:
        yield
    finally:
        if old is None:
            del os.environ["LIT_DISTILL_CACHE"]
        else:
            os.environ["LIT_DISTILL_CACHE"] = old


def quickstart(cfg: QuickstartConfig) -> dict:
    """Run the whole embedded chain and return (and write) the summary; every cached part goes to ``cfg.cache_dir``."""
    with cache_in(cfg.cache_dir):
        return _quickstart(cfg)


def _quickstart(cfg: QuickstartConfig) -> dict:
    import torch

    from .methods import OPDStudent, TeacherRL

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    stages = Stages(total=len(cfg.tasks) + 4)
    recipe = default_base_recipe()
    if cfg.pretrain_steps is not None:
        recipe = recipe.replace(max_steps=cfg.pretrain_steps)
    cached = (recipe.directory(cfg.cache_dir) / "model_index.json").is_file()
    stages.start("base", f"base model {recipe.directory(cfg.cache_dir)}" + (" (cached)" if cached else ""))
    base = ensure_embedded_base(recipe, cfg.cache_dir)
    prompts = split_prompts(out, cfg.tasks, seed=cfg.seed)

    sampling = {"num_steps": cfg.num_steps, "rollouts_per_prompt": cfg.rollouts_per_prompt}

    def teacher(task: str, model: str) -> "TeacherRL":
        return TeacherRL(model, TASK_REWARDS[task], sampling=sampling, updates={"minibatch_size": 64},
                         optim={"lr": 1e-4}, runtime={"seed": cfg.seed})

    n_eval = len(prompts["eval"].read_text().splitlines())
    stages.start("evaluate_base", f"scoring the base model on {n_eval} held-out prompts ({', '.join(cfg.tasks)})")
    evaluation = reward_evaluation(prompts["eval"], out / "base" / "grids", samples_per_prompt=cfg.samples_per_prompt,
                                   seed=cfg.seed)
    module = teacher(cfg.tasks[0], str(base)).to("cuda" if torch.cuda.is_available() else "cpu")
    rewards = {"base": evaluation.score(module, grid=out / "base" / "grids" / "step_000000.png")}

    teachers = {}
    for task in cfg.tasks:
        stages.start(f"teacher/{task}", f"teacher {task!r}: TeacherRL on the {task} reward, {cfg.teacher_steps} steps")
        history, _, _ = fit_stage(teacher(task, str(base)), prompts[task], prompts["eval"], cfg.teacher_steps, out,
                                  f"teacher_{task}", cfg.prompts_per_step, samples_per_prompt=cfg.samples_per_prompt,
                                  seed=cfg.seed, eval_at_start=False)
        rewards[f"teacher/{task}"] = rewards_of(history[-1])
        teachers[task] = str(out / f"teacher_{task}" / "model")

    stages.start("opd", f"OPD student of the {len(teachers)} teachers, {cfg.opd_steps} steps")
    student = OPDStudent(str(base), teachers, sampling=sampling, optim={"lr": 1e-4}, runtime={"seed": cfg.seed})
    history, _, _ = fit_stage(student, prompts["multitask"], prompts["eval"], cfg.opd_steps, out, "opd",
                              cfg.prompts_per_step, samples_per_prompt=cfg.samples_per_prompt, seed=cfg.seed,
                              eval_at_start=False)
    rewards["opd"] = rewards_of(history[-1])

    stages.start("one_step", f"one-step generator (DisBack) from the base model, {cfg.one_step_steps} steps")
    one_step = run_one_step(base, cfg, out)
    seconds = {**stages.finish(), "total": round(time.time() - start, 1)}
    summary = {"config": asdict(cfg), "base_recipe": asdict(recipe), "base_model": str(base),
               "base_was_cached": cached, "tasks": task_descriptions(evaluation.reward, cfg.tasks), "rewards": rewards,
               "one_step": one_step, "seconds": seconds,
               "grids": sorted(str(p) for p in out.rglob("grids/*.png")),
               "tensorboard": str(out)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    return summary


def run_one_step(base: Path, cfg: QuickstartConfig, out: Path) -> dict:
    """DisBack one-step generator from the base model, exported to ``out/one_step_generator``, with a grid
    (a row per digit) in ``out/one_step/grids``; returns its FID curve."""
    import torch

    from .callbacks.fid import FIDCallback
    from .data import ImageDataModule, caption_for
    from .methods.disback import DisBackStudent
    from .utils.images import make_grid_png

    # CPU-sized: the recording stops after at most 2/5 of the training steps (converged or not), and the one
    # intermediate target takes 10% of the generator updates, the paper's share
    recording = max(4, cfg.one_step_steps * 2 // 5)
    updates = max(1, cfg.one_step_steps - recording)
    stages = {"num_checkpoints": 2, "max_recording_updates": recording, "recording_patience": max(2, recording // 4),
              "degradation_interval": max(1, recording // 8), "iterations_per_stage": max(1, updates // 10)}
    module = DisBackStudent(teacher=str(base), stages=stages, optim={"lr": 1e-4},
                            eval_prompts=[caption_for(digit) for digit in range(10)])
    fid = FIDCallback(every_n_steps=max(1, cfg.one_step_steps // 2), num_samples=cfg.fid_samples,
                      cache_dir=cfg.cache_dir)
    data = ImageDataModule("embedded:mnist", resolution=module.model.sample_shape[-1], batch_size=32, seed=cfg.seed,
                           repeat=50)
    fit = trainer(cfg.one_step_steps, out / "one_step", [fid])
    fit.fit(module, data)
    module.export(out / "one_step_generator")
    per_digit = 8
    captions = [caption_for(digit) for digit in range(10) for _ in range(per_digit)]
    images = module.sample(len(captions), captions, generator=torch.Generator().manual_seed(cfg.seed))
    grid = make_grid_png(images.cpu(), out / "one_step" / "grids" / f"step_{fit.global_step:06d}.png", nrow=per_digit,
                         row_labels=captions[::per_digit], scale=3)
    return {"fid_classifier": [[h["generator_updates"], h["fid_classifier"]] for h in fid.history],
            "model": str(out / "one_step_generator"), "grid": str(grid)}


def task_descriptions(per_task_reward, tasks: list[str]) -> dict[str, dict]:
    """``{task: {"reward", "measures", "max"}}`` of a ``per_task`` reward that has scored images: what each task's
    reward measures (the first sentence of its docstring) and its best value (``Reward.max_value``; some rewards
    know it once they have seen an image's shape). Every reward is better higher."""
    out = {}
    for task in tasks:
        reward = per_task_reward.reward_for(task)
        doc = " ".join((type(reward).__doc__ or "").split("\n\n")[0].replace("``", "").split())
        out[task] = {"reward": reward.name, "measures": doc.split(". ")[0].rstrip("."), "max": reward.max_value}
    return out


def print_summary(summary: dict) -> None:
    """The quickstart's results: every task's reward per system (tasks in their order, the best value on top),
    how much of each teacher's gain the student kept, the one-step generator's FID, and where everything went."""
    tasks, rewards = list(summary["tasks"]), summary["rewards"]
    maxima = {t: summary["tasks"][t]["max"] for t in tasks}
    base = rewards["base"]
    width = max(22, *(len(s) + 2 for s in rewards))
    header = f"{'system':<{width}}" + "".join(f"{t:>14}" for t in tasks) + f"{'mean':>10}"
    lines = ["", "Reward on the held-out prompts (higher is better; 'best possible' is each reward's maximum):",
             header, "-" * len(header)]
    lines.append(f"{'best possible':<{width}}" + "".join(
        f"{'-' if maxima[t] is None else f'{maxima[t]:.3f}':>14}" for t in tasks))
    for system, r in rewards.items():
        lines.append(f"{system:<{width}}" + "".join(f"{r.get(t, float('nan')):>14.3f}" for t in tasks)
                     + f"{r['reward']:>10.3f}")
    if "opd" in rewards:
        def kept(task: str) -> str:
            teacher = rewards.get(f"teacher/{task}", {}).get(task)
            if teacher is None or abs(teacher - base[task]) < 1e-9:
                return "-"
            return f"{(rewards['opd'][task] - base[task]) / (teacher - base[task]):.0%}"

        lines.append(f"{'opd: teacher gain kept':<{width}}" + "".join(f"{kept(t):>14}" for t in tasks))
    lines += ["", "Tasks:"] + [f"  {t:<12} {d['reward']}: {d['measures']}" for t, d in summary["tasks"].items()]
    lines.append("  'teacher gain kept' = (opd - base) / (teacher - base) on the teacher's own task.")
    curve = (summary.get("one_step") or {}).get("fid_classifier")
    if curve:
        steps = summary["config"]["one_step_steps"]
        lines += ["", f"One-step generator (DisBack): fid_classifier {curve[0][1]:.1f} -> {curve[-1][1]:.1f} after "
                      f"{curve[-1][0]} generator updates ({steps} steps, the first {steps - curve[-1][0]} recording "
                      "the degradation path; lower is better; Frechet distance in the digit classifier's features, "
                      "not Inception)"]
    out = Path(summary["config"]["out_dir"])
    lines += ["", f"Took {summary['seconds']['total'] / 60:.1f} min "
                  f"({', '.join(f'{k} {v:.0f} s' for k, v in summary['seconds'].items() if k != 'total')}).",
              f"Grids:       {out}/*/grids/ (a row per prompt)",
              f"Models:      {out}/teacher_*/model, {out}/opd/model, {out}/one_step_generator",
              f"Metrics:     {out}/*/logs/version_*/metrics.csv; tensorboard --logdir {summary['tensorboard']}",
              f"Summary:     {out / 'summary.json'}"]
    print("\n".join(lines), flush=True)


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to each option's help, except where the help already says what None means."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def quickstart_parser() -> argparse.ArgumentParser:
    """``lit-distill quickstart``'s options: one per :class:`QuickstartConfig` field, with its default."""
    parser = argparse.ArgumentParser(
        prog="lit-distill quickstart", formatter_class=_DefaultsHelp,
        description="Run the whole embedded chain on the CPU or one GPU: base model (cached) -> one TeacherRL teacher "
                    "per task -> OPD student -> DisBack one-step generator; prints a table of rewards per task and "
                    "writes grids, models, logs and summary.json. LIT_DISTILL_TINY=1 runs it at smoke-test size.")
    for f in dataclasses.fields(QuickstartConfig):
        if f.name == "tasks":
            parser.add_argument("--tasks", nargs="+", choices=list(TASK_REWARDS), default=list(TASK_REWARDS),
                                help="the tasks, in the order of the table")
            continue
        kind = int if "int" in str(f.type) else str
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default, help=f.metadata["help"])
    return parser


def quickstart_main(argv: list[str]) -> None:
    parser = quickstart_parser()
    args = vars(parser.parse_args(argv))
    from .utils import tiny_run

    if tiny_run():  # smoke-test sizes, except what the command line sets explicitly
        given = {k: v for k, v in args.items() if v != parser.get_default(k)}
        cfg = QuickstartConfig.tiny(**given)
    else:
        cfg = QuickstartConfig(**args)
    import torch

    from .quiet import quiet_third_party

    quiet_third_party()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    quickstart(cfg)

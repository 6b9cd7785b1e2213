"""OPDStudent (DiffusionOPD): on-policy distillation of several task teachers into one student."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ..diffusion import Trajectory
from ..losses import per_step_kl
from ..models.diffusion_model import DiffusionModel
from ..protocols import PromptSource
from .base import module_args
from .checkpoints import load_source
from .on_policy import OnPolicyModule
from .settings import Distillation, Optim, Runtime, Sampling, Updates, groups


class OPDStudent(OnPolicyModule):
    """A multi-task student trained on its own rollouts to match the routed teacher's kernels.

    Each training step: a batch of prompts with task tags; the student rolls out
    (``sampling.rollouts_per_prompt`` each) with the shared rollout function; at (sample, step) pairs the
    student's kernel mean is recomputed with gradient and the routed teacher's on the same ``x_t`` without; the
    loss is the closed-form per-step KL ``||mu_s - mu_T||^2 / (2 std^2)`` on stochastic steps and
    ``distill.ode_weight * ||mu_s - mu_T||^2`` on ODE steps, weighted by :meth:`step_weight`, averaged over the
    pairs of the first ``int(num_steps * updates.timestep_fraction)`` steps.

    Args (beyond :class:`OnPolicyModule`'s):
        teachers: ``{teacher_name: model source}``, one frozen teacher per task (a directory saved by
            TeacherRL's export, a checkpoint, or any source ``load_source`` accepts).
        teacher_dtype: e.g. ``"bfloat16"`` for the cheap form of frozen teachers (None: the student's).
        teacher_guidance: ``{teacher_name: guidance scale}`` of each teacher's kernels (DiffusionOPD gives each
            teacher its own); teachers not named use ``sampling.guidance_scale``, the student's.
        distill: :class:`~lit_distill.methods.settings.Distillation` (ODE-step weight, weighting over steps).

    Teachers are kept out of the student's ``state_dict`` (they are reloaded from their sources) and are
    replicated on every device, never sharded or trained. Seams: :meth:`route` (task -> teacher) and
    :meth:`step_weight` (per-step loss weight).
    """

    method = "opd"

    def __init__(self, model: "str | DiffusionModel" = "embedded:base", teachers: Optional[dict[str, Any]] = None,
                 model_kwargs: Optional[dict] = None, *, teacher_dtype: Optional[str] = None,
                 teacher_guidance: Optional[dict[str, float]] = None, lora_rank: int = 0,
                 sampling: Sampling = Sampling(rollouts_per_prompt=1),
                 updates: Updates = Updates(timestep_fraction=0.99), distill: Distillation = Distillation(), optim: Optim = Optim(lr=1e-5), runtime: Runtime = Runtime(),
                 eval_prompts: Optional[list[str]] = None):
        sampling, updates, distill, optim, runtime = groups(
            OPDStudent, sampling=sampling, updates=updates, distill=distill, optim=optim, runtime=runtime)
        super().__init__(model, model_kwargs, lora_rank=lora_rank, sampling=sampling, updates=updates, optim=optim,
                         runtime=runtime, eval_prompts=eval_prompts)
        self.save_settings(ignore=module_args(model=model) + (
            ["teachers"] if any(not isinstance(t, str) for t in (teachers or {}).values()) else []))
        self.automatic_optimization = False
        if not teachers:
            raise ValueError("teachers is empty: give {task: model source} for every task of the prompt set")
        self.distill = distill
        dtype = getattr(torch, teacher_dtype) if teacher_dtype else None
        # a plain dict, not a ModuleDict: teachers stay out of checkpoints and optimisers
        self.teachers: dict[str, DiffusionModel] = {}
        for name, source in teachers.items():
            try:
                teacher = load_source(source).copy_frozen(dtype)
            except (ValueError, FileNotFoundError) as e:  # name the teacher: the same error fits every source
                raise type(e)(f"teachers[{name!r}]: {e}") from e
            check_compatible(self.model, teacher, name)
            self.teachers[name] = teacher
        unknown = sorted(set(teacher_guidance or {}) - set(self.teachers))
        if unknown:
            raise ValueError(f"teacher_guidance names {unknown}, which are not teachers ({sorted(self.teachers)})")
        self.teacher_guidance = {name: float((teacher_guidance or {}).get(name, sampling.guidance_scale))
                                 for name in self.teachers}

    # -- seams ----------------------------------------------------------------------------------
    def route(self, task: str) -> str:
        """The name of the teacher that serves ``task`` (default: the teacher named like the task)."""
        return task

    def step_weight(self, steps: Tensor) -> Tensor:
        """Loss weight of each pair's step ``[M]`` (1 on ODE steps, whose loss is mean matching already); on
        stochastic steps: 1 (``distill.step_weighting="kl"``), ``2 std^2`` (``"mean"``) or the step length
        ``sigma_t - sigma_s`` (``"kl_dt"``). Override for any other weighting over time."""
        stds = torch.tensor(self.step_stds, device=steps.device)[steps]
        if self.distill.step_weighting == "kl":
            weight = torch.ones_like(stds)
        elif self.distill.step_weighting == "mean":
            weight = 2 * stds**2
        else:
            weight = torch.tensor(self.step_lengths, device=steps.device, dtype=stds.dtype)[steps]
        return torch.where(stds > 0, weight, torch.ones_like(stds))

    def check_tasks(self, tasks: Sequence[str]) -> None:
        """Raise before any compute if a task has no teacher."""
        unknown = sorted({t for t in tasks if self.route(t) not in self.teachers})
        if unknown:
            raise ValueError(f"tasks {unknown} are served by no teacher (teachers: {sorted(self.teachers)}); "
                             "add them to `teachers`, override `route`, or filter the prompt set's `tasks`")

    # -- training -------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        for teacher in self.teachers.values():
            teacher.to(self.device)
        if isinstance(self.trainer.datamodule, PromptSource):
            self.check_tasks(self.trainer.datamodule.tasks_present)

    def denoisers(self) -> list[DiffusionModel]:
        return super().denoisers() + list(self.teachers.values())

    def teacher_means(self, traj: Trajectory, rows: Tensor, steps: Tensor, prompts: Sequence[str],
                      tasks: Sequence[str], batch_size: Optional[int] = None) -> Tensor:
        """The routed teachers' kernel means at the pairs (CPU index tensors ``[M]``), each teacher run only on its
        own rows, ``batch_size`` pairs per call (None: all of its rows in one call), on the prompts encoded by its
        own text encoder."""
        out = torch.empty_like(traj.latents[rows.to(self.device), steps.to(self.device)])
        names = [self.route(tasks[r]) for r in rows.tolist()]
        with torch.no_grad():
            for name in sorted(set(names)):
                teacher, scale = self.teachers[name], self.teacher_guidance[name]
                cond = teacher.encode_prompts(list(prompts))
                uncond = teacher.null_cond(len(prompts)) if scale != 1.0 else None
                mine = torch.tensor([i for i, n in enumerate(names) if n == name])
                for sel in mine.split(batch_size or len(mine)):
                    r, s = rows[sel].to(self.device), steps[sel].to(self.device)
                    out[sel.to(self.device)] = self.kernel(teacher, traj, r, s, cond, uncond, scale)[0].float()
        return out

    def training_step(self, batch: dict, batch_idx: int) -> None:
        self.check_tasks(batch["task"])
        repeat = self.sampling.rollouts_per_prompt
        prompts = [p for p in batch["prompt"] for _ in range(repeat)]
        tasks = [t for t in batch["task"] for _ in range(repeat)]
        cond, uncond = self.encode(prompts)
        traj = self.sample_trajectories(self.model, cond, uncond, len(prompts), self.step_generator())
        cpu_gen = self.step_generator("cpu")
        rows, steps = self.training_pairs(traj, self.updates.steps_per_sample, cpu_gen, stochastic_only=False)
        # the teachers are frozen and x_t comes from the rollout: every target is known before the first update, so
        # each teacher runs once over all of its pairs, in calls as large as the rollout's
        targets = self.teacher_means(traj, rows, steps, prompts, tasks, batch_size=len(prompts))
        opt, losses = self.optimizers(), defaultdict(list)
        for chunk in self.minibatches(len(rows), cpu_gen):
            r, s = rows[chunk].to(self.device), steps[chunk].to(self.device)
            mean, std = self.kernel(self.model, traj, r, s, cond, uncond)
            target = targets[chunk.to(self.device)]
            per_pair = per_step_kl(mean, target, std, self.distill.ode_weight) * self.reduction_scale * self.step_weight(s)
            loss = per_pair.mean()
            if not self.apply_update(opt, loss, "per-step KL loss"):
                continue
            losses["all"].append(loss.detach())
            chunk_tasks = [tasks[r] for r in rows[chunk].tolist()]
            for task in set(chunk_tasks):
                mask = torch.tensor([t == task for t in chunk_tasks]).to(self.device)
                losses[f"kl/{task}"].append(per_pair.detach()[mask].mean())
        for name, values in losses.items():
            self.log("train/kl" if name == "all" else f"train/{name}", torch.stack(values).mean(), prog_bar=name == "all")


def check_compatible(student: DiffusionModel, teacher: DiffusionModel, name: str) -> None:
    """Teachers must share the student's schedule and sample space (the per-step KL compares kernels
    of the same step on the same x_t)."""
    s, t = student.schedule, teacher.schedule
    problems = []
    if (s.family, s.prediction_type) != (t.family, t.prediction_type):
        problems.append(f"schedule {t.family}/{t.prediction_type} vs the student's {s.family}/{s.prediction_type}")
    if s.num_train_timesteps != t.num_train_timesteps:
        problems.append(f"num_train_timesteps {t.num_train_timesteps} vs {s.num_train_timesteps}")
    if teacher.sample_shape != student.sample_shape:
        problems.append(f"sample_shape {teacher.sample_shape} vs the student's {student.sample_shape}")
    if problems:
        raise ValueError(f"teachers[{name!r}] does not match the student: {'; '.join(problems)}. "
                         "Distil from teachers fine-tuned from the same base model.")

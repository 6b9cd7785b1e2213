"""DisBack (arXiv 2408.15991): score distillation along the recorded degradation path of the teacher.

Stage 0, *degradation recording*: ``fake_score`` starts as a copy of the teacher and is fine-tuned by DSM on
samples of the initial generator g_0 (the generator is not updated in this stage, so it *is* g_0) until it has
converged on them (:meth:`BacktrackingSchedule.recording_converged`). Every ``stages.degradation_interval`` updates
its weights are kept as a candidate; at convergence ``N = stages.num_checkpoints`` of them become the path
``c_1 .. c_N``, chosen at equal steps of the DSM loss between the teacher's (``c_0``) and the converged score's
(``c_N``) (:meth:`BacktrackingSchedule.path_indices`), so that the targets are spread along the way from the
teacher to the score of g_0 rather than bunched near g_0, where the loss flattens out.

Stages 1..N, *distribution backtracking*: the generator is distilled with the score-distillation gradient
``w (s_fake - s_real) dx_t/dtheta`` where ``s_real`` walks the path back: ``c_{N-1}, ..., c_1`` and finally the
teacher ``c_0``; ``s_fake`` continues from ``c_N`` (it already fits g_0) and is trained online by DSM on the
current generator's samples. :class:`BacktrackingSchedule` decides when a candidate is kept, when the recording
ends and when the generator moves to the next target.

``backtracking=False`` is Diff-Instruct / VSD: no stage 0, ``s_real`` is the teacher throughout and ``s_fake``
starts from the teacher.
"""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from ..diffusion import expand_like, guided_prediction
from ..losses.denoising import denoising_loss
from ..losses.score_distillation import ScoreDistillation, score_distillation_from_predictions
from ..models.diffusion_model import DiffusionModel
from ..utils.checkpoint_files import atomic_save, missing_side_files, side_file, side_file_state
from .base import module_args
from .checkpoints import load_source
from .one_step import OneStepModule, trainable_copy
from .settings import Generator, Noising, OneStepOptim, Runtime, Stages, groups

KEEP, FINISH = "keep", "finish"  # what the recording asks for after a fake-score update


class BacktrackingSchedule:
    """DisBack's stages: which one is running and when to move on. Its rules are the seams (subclass it and return
    it from :meth:`DisBackStudent.build_schedule`): :meth:`recording_converged`, :meth:`path_indices`,
    :meth:`should_advance`.

    Stage 0 records the degradation path: :meth:`fake_score_updated` counts each fake-score update with its DSM loss
    and answers :data:`KEEP` when a candidate checkpoint is due (every ``degradation_interval`` updates) or
    :data:`FINISH` when the recording has converged; :meth:`recording_finished` then starts stage 1 with the path's
    length. Stages 1..N backtrack: :meth:`generator_updated` counts generator updates and their score mismatch and
    says when the generator moves on to the next target (``target_index``). Without backtracking there is one stage,
    1, whose target is the teacher. The state (``state_dict``) goes into the Lightning checkpoint.
    """

    def __init__(self, stages: Stages, backtracking: bool = True):
        self.stages, self.backtracking = stages, backtracking
        self.stage = 0 if backtracking else 1
        self.stage_steps = 0  # updates in this stage: fake-score updates in stage 0, generator updates after
        self.mismatch_history: list[float] = []
        self.recording_losses: list[float] = []  # the DSM loss of every fake-score update of the recording
        self.path_length: Optional[int] = None  # the recorded path's N, once the recording has ended

    @property
    def num_stages(self) -> int:
        """Backtracking stages: one per target ``c_{N-1} .. c_1``, then the teacher (N = the path's length once
        recorded: fewer than ``num_checkpoints`` if the recording converged within fewer candidates); 1 (the
        teacher) without backtracking."""
        if not self.backtracking:
            return 1
        return self.path_length or self.stages.num_checkpoints

    @property
    def recording(self) -> bool:
        return self.stage == 0

    def target_index(self, stage: Optional[int] = None) -> int:
        """Index into the path ``[c_0 = teacher, c_1, .., c_N]`` of the real score of ``stage`` >= 1 (default: the
        current one)."""
        stage = self.stage if stage is None else stage
        return self.num_stages - stage if self.backtracking else 0

    def next_stage(self) -> None:
        self.stage += 1
        self.stage_steps = 0
        self.mismatch_history = []

    # -- stage 0 -------------------------------------------------------------------------------------------
    def fake_score_updated(self, loss: Tensor) -> Optional[str]:
        """Count a fake-score update of the recording with its DSM ``loss``: :data:`FINISH` once the recording has
        converged, :data:`KEEP` when a candidate checkpoint is due, else None (and None outside stage 0)."""
        if not self.recording:
            return None
        self.stage_steps += 1
        self.recording_losses.append(float(loss))  # a host sync per update, during the recording only
        if self.recording_converged(self.recording_losses):
            return FINISH
        return KEEP if self.stage_steps % self.stages.degradation_interval == 0 else None

    def recording_converged(self, losses: list[float]) -> bool:
        """Whether the fake score has converged on g_0's samples: the mean of the last ``recording_patience`` DSM
        losses improves by less than ``recording_tol`` (relative) on the mean of the ``recording_patience`` before;
        or ``max_recording_updates`` is reached."""
        if len(losses) >= self.stages.max_recording_updates:
            return True
        k = self.stages.recording_patience
        if len(losses) < 2 * k:
            return False
        recent, before = sum(losses[-k:]) / k, sum(losses[-2 * k:-k]) / k
        return recent > (1 - self.stages.recording_tol) * before

    def path_indices(self, candidate_updates: list[int], losses: list[float]) -> list[int]:
        """Which candidates become ``c_1 .. c_N`` (indices into the candidates, in order, the last one always
        ``c_N``): those whose smoothed DSM loss is nearest to ``L_0 - k/N (L_0 - L_end)`` for ``k = 1 .. N - 1``,
        where ``L_0`` is the mean loss of the first ``recording_patience`` updates (the teacher's score on g_0) and
        ``L_end`` that of the last (the converged score). Every candidate when there are at most N; equally spaced
        candidates when the loss did not fall."""
        n, count = self.stages.num_checkpoints, len(candidate_updates)
        if count <= n:
            return list(range(count))
        k = self.stages.recording_patience
        smooth = lambda u: sum(losses[max(0, u - k):u]) / len(losses[max(0, u - k):u])  # noqa: E731
        start, end = smooth(min(k, len(losses))), smooth(len(losses))
        levels = [smooth(u) for u in candidate_updates]
        chosen: list[int] = []
        for j in range(1, n):
            # leave room after this pick for the n - 1 - j picks still to come and for c_N
            free = range(chosen[-1] + 1 if chosen else 0, count - 1 - (n - 1 - j))
            if start > end:
                target = start - j / n * (start - end)
                chosen.append(min(free, key=lambda i: abs(levels[i] - target)))
            else:
                chosen.append(max(free[0], min(free[-1], round(j * (count - 1) / n) - 1)))
        return chosen + [count - 1]

    def recording_finished(self, path_length: int) -> None:
        """The path of ``path_length`` checkpoints is recorded: stage 1 (its first target) begins."""
        self.path_length = path_length
        self.next_stage()

    # -- stages 1..N --------------------------------------------------------------------------------------
    def generator_updated(self, mismatch: Tensor) -> bool:
        """Count a generator update (``mismatch``: its mean ``(x0_fake - x0_real)^2``); True when the generator moves
        on to the next target."""
        self.stage_steps += 1
        if self.stages.switch_rule == "plateau":  # a host sync per update: only when the rule reads the history
            k = self.stages.plateau_patience
            self.mismatch_history = (self.mismatch_history + [float(mismatch)])[-2 * k:]
        if self.stage < self.num_stages and self.should_advance(self.stage_steps, self.mismatch_history):
            self.next_stage()
            return True
        return False

    def should_advance(self, stage_steps: int, mismatch_history: list[float]) -> bool:
        """Whether the generator has matched the current target.

        ``stage_steps``: generator updates in this stage; ``mismatch_history``: the per-update mismatch of this
        stage (the last ``2 * plateau_patience`` values). ``"fixed"``: after ``iterations_per_stage`` updates.
        ``"plateau"``: once the mean of the last ``patience`` values improves by less than ``plateau_tol``
        (relative) on the ``patience`` before, or after ``iterations_per_stage``.
        """
        if stage_steps >= self.stages.iterations_per_stage:
            return True
        k = self.stages.plateau_patience
        if self.stages.switch_rule == "fixed" or len(mismatch_history) < 2 * k:
            return False
        recent, before = mismatch_history[-k:], mismatch_history[-2 * k:-k]
        return sum(recent) / k > (1 - self.stages.plateau_tol) * sum(before) / k

    # -- checkpoints ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "stage_steps": self.stage_steps, "mismatch_history": list(self.mismatch_history),
                "recording_losses": list(self.recording_losses)}

    def load_state_dict(self, state: dict[str, Any], path_length: Optional[int]) -> None:
        self.stage, self.stage_steps = int(state["stage"]), int(state["stage_steps"])
        self.mismatch_history = list(state["mismatch_history"])
        self.recording_losses = list(state.get("recording_losses", []))
        self.path_length = path_length


def _cpu_state(module: torch.nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


class DisBackStudent(OneStepModule):
    """One-step student distilled by DisBack (or Diff-Instruct with ``backtracking=False``).

    Args (besides :class:`~lit_distill.methods.one_step.OneStepModule`'s):
        teacher: the teacher's source (``load_source``: ``"embedded:base"``, a directory, a checkpoint, or a
            ``DiffusionModel``); ``teacher_kwargs``: its loader arguments.
        backtracking: record the degradation path and backtrack it (DisBack); False: Diff-Instruct / VSD.
        stages: :class:`~lit_distill.methods.settings.Stages` (the recording and its convergence, path length,
            stage lengths, switch rule).
        checkpoint_dir: keep the path's checkpoints as files there. Default: in memory, and saved once per
            checkpoint directory as side files next to the Lightning checkpoints, which reference them
            (``DurableCheckpoint``; a plain ``torch.save`` of the checkpoint keeps them inside it).
        real_guidance_scale: classifier-free guidance of the real score (1: none).
        normalize: DMD's ``1 / mean|x0 - x0_real|`` normalisation of the gradient (as DisBack's code).

    One training step: an update of the fake score (DSM on the generator's samples), then, outside stage 0 and
    every ``optim.aux_updates_per_generator_update``-th step, an update of the generator; the schedule says what
    follows (a candidate kept, the path chosen, the next target loaded).
    """

    method = "disback"

    def __init__(self, teacher: "str | DiffusionModel" = "embedded:base", teacher_kwargs: Optional[dict] = None, *,
                 backtracking: bool = True, stages: Stages = Stages(), checkpoint_dir: Optional[str] = None,
                 real_guidance_scale: float = 1.0, normalize: bool = True, generator: Generator = Generator(),
                 noising: Noising = Noising(),
                 optim: OneStepOptim = OneStepOptim(lr=3e-5, betas=(0.0, 0.999), max_grad_norm=10.0),
                 runtime: Runtime = Runtime(), eval_prompts: Optional[list[str]] = None):
        stages, generator, noising, optim, runtime = groups(
            DisBackStudent, stages=stages, generator=generator, noising=noising, optim=optim, runtime=runtime)
        teacher_model = load_source(teacher, **(teacher_kwargs or {})).freeze_()
        super().__init__(teacher_model, generator=generator, noising=noising, optim=optim, runtime=runtime,
                         eval_prompts=eval_prompts)
        self.save_settings(ignore=module_args(teacher=teacher))
        self.backtracking, self.checkpoint_dir = backtracking, Path(checkpoint_dir) if checkpoint_dir else None
        self.real_guidance_scale, self.normalize = real_guidance_scale, normalize
        self.teacher = teacher_model
        self.fake_score = trainable_copy(teacher_model, "teacher")
        self.prepare_network(self.fake_score.net)
        # the current backtracking target; None means the teacher itself
        self.real_score = teacher_model.copy_frozen() if backtracking else None
        self.path: list = []  # c_1..c_N: side-file entries (CPU state dicts or their files) or file paths
        self.candidates: list = []  # [update, entry like path's], kept every degradation_interval updates
        self.stage_schedule = self.build_schedule(stages, backtracking)

    def build_schedule(self, stages: Stages, backtracking: bool) -> BacktrackingSchedule:
        """The stage schedule (a seam: return a subclass of :class:`BacktrackingSchedule` for other rules)."""
        return BacktrackingSchedule(stages, backtracking)

    @property
    def recording_updates(self) -> int:
        """Fake-score updates spent on the degradation recording so far."""
        return len(self.stage_schedule.recording_losses)

    # -- the path and the targets -------------------------------------------------------------------------
    def real_score_model(self) -> DiffusionModel:
        return self.teacher if self.real_score is None else self.real_score

    def load_target(self) -> None:
        """Load the current stage's target (a path checkpoint, or the teacher) into ``real_score``."""
        if self.real_score is None:
            return
        index = self.stage_schedule.target_index()
        state = self.teacher.net.state_dict() if index == 0 else side_file_state(self.path[index - 1])
        self.real_score.net.load_state_dict(state)
        self.weights_changed()

    def keep_candidate(self) -> None:
        """Keep the fake score's weights as a candidate of the path: a side file (written once next to each
        checkpoint directory) or a file in ``checkpoint_dir``."""
        state = _cpu_state(self.fake_score.net)
        update = self.recording_updates
        if self.checkpoint_dir is None:  # a name unique to this content: written once next to each checkpoint dir
            name = f"disback_degradation_{update:06d}_{uuid.uuid4().hex[:12]}.pt"
            self.candidates.append([update, side_file(name, state)])
            return
        file = self.checkpoint_dir / f"degradation_{update:06d}.pt"
        if self.trainer.is_global_zero:
            atomic_save(state, file)
        self.trainer.strategy.barrier("disback_checkpoint")
        self.candidates.append([update, str(file)])

    def finish_recording(self) -> None:
        """Keep the candidates the schedule chooses as the path ``c_1 .. c_N``, drop the others, and load the
        first target."""
        if not self.candidates or self.candidates[-1][0] != self.recording_updates:
            self.keep_candidate()  # c_N is the converged score itself
        chosen = self.stage_schedule.path_indices([u for u, _ in self.candidates], self.stage_schedule.recording_losses)
        self.path = [self.candidates[i][1] for i in chosen]
        for i, (_, entry) in enumerate(self.candidates):
            if i not in chosen and isinstance(entry, str) and self.trainer.is_global_zero:
                Path(entry).unlink(missing_ok=True)
        self.candidates = []
        self.stage_schedule.recording_finished(len(self.path))
        self.load_target()

    # -- losses -------------------------------------------------------------------------------------------
    def fake_score_loss(self, cond: Optional[dict], n: int, generator: torch.Generator) -> Tensor:
        """DSM of the fake score on ``n`` fresh (detached) generator samples."""
        with torch.no_grad():
            x0 = self.generate(cond, self.latents(n, generator))
        return denoising_loss(self.fake_score, self.schedule, x0, cond, generator=generator)

    def distillation_loss(self, cond: Optional[dict], n: int, generator: torch.Generator) -> ScoreDistillation:
        """The score-distillation surrogate of ``n`` generator samples against the current target, with the two
        denoised estimates (their mismatch drives the plateau rule)."""
        x0 = self.generate(cond, self.latents(n, generator))
        timesteps = self.sample_timesteps(n, generator)
        x_t, alpha, sigma = self.noised(x0, timesteps, generator)
        with torch.no_grad():
            pred_fake = self.fake_score(x_t.detach(), timesteps, cond)
            uncond = self.model.null_cond(n) if self.real_guidance_scale != 1.0 else None
            pred_real = guided_prediction(self.real_score_model(), x_t.detach(), timesteps, cond, uncond,
                                          self.real_guidance_scale)
        return score_distillation_from_predictions(
            x_t, pred_fake, pred_real, expand_like(alpha, x0), expand_like(sigma, x0), self.schedule.prediction_type,
            weight=self.weight(timesteps, alpha, sigma), normalize=self.normalize, x0=x0.detach())

    def auxiliary_parameters(self):
        return self.fake_score.net.parameters()

    # -- training -----------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> None:
        opt_generator, opt_fake = self.optimizers()
        rng, schedule = self.step_generator(), self.stage_schedule
        prompts = self.prompts_of(batch)
        cond, n = self.encode(prompts), len(prompts)
        recording = schedule.recording  # the generator waits for the whole path, this step included

        # the fake score follows the generator, in every stage
        with self.updating(opt_fake):
            fake_loss = self.fake_score_loss(cond, n, rng)
            fake_updated = self.apply_update(opt_fake, fake_loss, "fake-score loss")
        if fake_updated:
            self.auxiliary_updates += 1
            self.log("train/auxiliary_loss", fake_loss.detach(), prog_bar=True, batch_size=n)
            event = schedule.fake_score_updated(fake_loss.detach())  # stage 0: keep a candidate, or end it
            if event == KEEP:
                self.keep_candidate()
            elif event == FINISH:
                self.finish_recording()

        # backtracking stages: the generator moves towards the current target
        if not recording and self.generator_turn():
            with self.updating(opt_generator):
                out = self.distillation_loss(cond, n, rng)
                generator_updated = self.apply_update(opt_generator, out.loss, "generator loss")
            if generator_updated:
                self.generator_updated()
                mismatch = (out.x0_fake - out.x0_real).pow(2).flatten(1).mean(1).mean()
                self.log("train/generator_surrogate", out.loss.detach(), batch_size=n)
                self.log("disback/score_mismatch", mismatch, batch_size=n)
                if schedule.generator_updated(mismatch):
                    self.load_target()
        self.log_updates(n)
        self.log("disback/stage", float(schedule.stage), batch_size=1)

    # -- checkpoints --------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["disback"] = {**self.stage_schedule.state_dict(), "path": list(self.path),
                                 "candidates": [list(c) for c in self.candidates],
                                 "num_checkpoints": self.stage_schedule.stages.num_checkpoints,
                                 "backtracking": self.backtracking}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("disback")
        if state is None:
            raise ValueError("checkpoint has no 'disback' state: it was not written by DisBackStudent")
        ours = (self.stage_schedule.stages.num_checkpoints, self.backtracking)
        if (state["num_checkpoints"], state["backtracking"]) != ours:
            raise ValueError(f"checkpoint has stages.num_checkpoints={state['num_checkpoints']}, backtracking="
                             f"{state['backtracking']}; this run has {ours[0]}, {ours[1]}: resume with the same settings")
        missing = missing_side_files(state["path"])
        if missing:
            raise FileNotFoundError(f"the recorded degradation path's files {missing} are missing: restore them (they "
                                    "live next to the checkpoint, or in checkpoint_dir) or restart the run")
        self.path = list(state["path"])
        self.candidates = [list(c) for c in state.get("candidates", [])]
        self.stage_schedule.load_state_dict(state, len(self.path) or None)
        # real_score's weights (the current target) come back with the module's state dict

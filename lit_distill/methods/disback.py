"""DisBack (arXiv 2408.15991): score distillation along the recorded degradation path of the teacher.

Stage 0, *degradation recording*: ``fake_score`` starts as a copy of the teacher and is fine-tuned by DSM on
samples of the initial generator g_0 (the generator is not updated in this stage, so it *is* g_0) until it has
converged on them (:meth:`DisBackStudent.recording_converged`). Every ``degradation_interval`` updates its weights
are kept as a candidate; at convergence ``N = num_checkpoints`` of them become the path ``c_1 .. c_N``, chosen at
equal steps of the DSM loss between the teacher's (``c_0``) and the converged score's (``c_N``), so that the
targets are spread along the way from the teacher to the score of g_0 rather than bunched near g_0, where the
loss flattens out.

Stages 1..N, *distribution backtracking*: the generator is distilled with the score-distillation gradient
``w (s_fake - s_real) dx_t/dtheta`` where ``s_real`` walks the path back: ``c_{N-1}, ..., c_1`` and finally the
teacher ``c_0``; ``s_fake`` continues from ``c_N`` (it already fits g_0) and is trained online by DSM on the
current generator's samples. ``should_advance`` decides when to move to the next target.

``backtracking=False`` is Diff-Instruct / VSD: no stage 0, ``s_real`` is the teacher throughout and ``s_fake``
starts from the teacher.
"""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ..diffusion import expand_like, guided_prediction
from ..losses.denoising import denoising_loss
from ..losses.score_distillation import score_distillation_from_predictions
from ..models.diffusion_model import DiffusionModel
from ..utils.checkpoint_files import atomic_save, missing_side_files, side_file, side_file_state
from .one_step import OneStepModule, trainable_copy

SWITCH_RULES = ("fixed", "plateau")


def _cpu_state(module: torch.nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


class DisBackStudent(OneStepModule):
    """One-step student distilled by DisBack (or Diff-Instruct with ``backtracking=False``).

    Args (besides :class:`~lit_distill.methods.one_step.OneStepModule`'s):
        backtracking: record the degradation path and backtrack it (DisBack); False: Diff-Instruct / VSD.
        num_checkpoints: N, checkpoints kept along the degradation path (the backtracking then has N targets).
        degradation_interval: fake-score updates between two candidate checkpoints of the recording.
        recording_patience, recording_tol: the recording has converged once the mean DSM loss of the last
            ``recording_patience`` fake-score updates improves by less than ``recording_tol`` (relative) on the
            mean of the ``recording_patience`` before (see :meth:`recording_converged`).
        max_recording_updates: the recording stops here even if it has not converged.
        switch_rule: ``"fixed"`` (``iterations_per_stage`` generator updates per target) or ``"plateau"`` (move on
            when the score mismatch stops improving, at most ``iterations_per_stage`` updates): see
            :meth:`should_advance`.
        plateau_patience, plateau_tol: the plateau rule compares the mean mismatch of the last ``patience``
            generator updates with that of the ``patience`` before; less than ``tol`` relative improvement advances.
        checkpoint_dir: keep the path's checkpoints as files there. Default: in memory, and saved once per
            checkpoint directory as side files next to the Lightning checkpoints, which reference them
            (``DurableCheckpoint``; a plain ``torch.save`` of the checkpoint keeps them inside it).
        guidance_scale: classifier-free guidance of the real score (1: none).
        normalize: DMD's ``1 / mean|x0 - x0_real|`` normalisation of the gradient (as DisBack's code).
    """

    method = "disback"

    def __init__(self, teacher: str | DiffusionModel = "embedded:base", teacher_kwargs: Optional[dict] = None, *,
                 backtracking: bool = True, num_checkpoints: int = 4, degradation_interval: int = 25,
                 recording_patience: int = 100, recording_tol: float = 0.01, max_recording_updates: int = 2000,
                 iterations_per_stage: int = 100, switch_rule: str = "fixed", plateau_patience: int = 50,
                 plateau_tol: float = 0.01, checkpoint_dir: Optional[str] = None, guidance_scale: float = 1.0,
                 normalize: bool = True, **kwargs):
        super().__init__(teacher, teacher_kwargs, **kwargs)
        if switch_rule not in SWITCH_RULES:
            raise ValueError(f"switch_rule={switch_rule!r}: choose one of {list(SWITCH_RULES)}")
        for name, value in dict(num_checkpoints=num_checkpoints, degradation_interval=degradation_interval,
                                iterations_per_stage=iterations_per_stage, plateau_patience=plateau_patience,
                                recording_patience=recording_patience,
                                max_recording_updates=max_recording_updates).items():
            if int(value) < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        self.backtracking, self.num_checkpoints = backtracking, int(num_checkpoints)
        self.degradation_interval, self.iterations_per_stage = int(degradation_interval), int(iterations_per_stage)
        self.recording_patience, self.recording_tol = int(recording_patience), float(recording_tol)
        self.max_recording_updates = int(max_recording_updates)
        self.switch_rule, self.plateau_patience, self.plateau_tol = switch_rule, int(plateau_patience), plateau_tol
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.guidance_scale, self.normalize = guidance_scale, normalize

        self.teacher = self.take_teacher()
        self.fake_score = trainable_copy(self.teacher, "teacher")
        self.prepare_network(self.fake_score.net)
        # the current backtracking target; None means the teacher itself
        self.real_score = self.teacher.copy_frozen() if backtracking else None
        self.path: list = []  # c_1..c_N: side-file entries (CPU state dicts or their files) or file paths
        self.recording_losses: list[float] = []  # the DSM loss of every fake-score update of the recording
        self.candidates: list = []  # [update, entry like path's] kept every degradation_interval updates
        self.stage = 0 if backtracking else 1
        self.stage_steps = 0  # updates in the current stage (fake-score updates in stage 0, generator updates after)
        self.mismatch_history: list[float] = []
        self._mismatch = torch.zeros(())

    # -- stages ------------------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        """Backtracking stages: one per target ``c_{N-1} .. c_1``, then the teacher (N = the path's length once
        recorded: fewer than ``num_checkpoints`` if the recording converged within fewer candidates); 1 (the
        teacher) without backtracking."""
        if not self.backtracking:
            return 1
        return len(self.path) if self.path else self.num_checkpoints

    @property
    def recording_updates(self) -> int:
        """Fake-score updates spent on the degradation recording so far."""
        return len(self.recording_losses)

    @property
    def recording(self) -> bool:
        return self.stage == 0

    def target_index(self, stage: int) -> int:
        """Index into the path ``[c_0 = teacher, c_1, .., c_N]`` of the real score of ``stage`` >= 1."""
        return self.num_stages - stage if self.backtracking else 0

    def real_score_model(self):
        return self.teacher if self.real_score is None else self.real_score

    def _load_target(self) -> None:
        if self.real_score is None:
            return
        index = self.target_index(self.stage)
        if index == 0:
            state = self.teacher.net.state_dict()
        else:
            state = side_file_state(self.path[index - 1])
        self.real_score.net.load_state_dict(state)
        self.weights_changed()

    def should_advance(self, stage_steps: int, mismatch_history: list[float]) -> bool:
        """Whether the generator has matched the current target (a seam: override for another rule).

        ``stage_steps``: generator updates in this stage; ``mismatch_history``: per-update mean of
        ``(x0_fake - x0_real)^2`` in this stage (the last ``2 * plateau_patience`` values). ``"fixed"``: after
        ``iterations_per_stage`` updates. ``"plateau"``: once the mean of the last ``patience`` values improves by
        less than ``plateau_tol`` (relative) on the ``patience`` before, or after ``iterations_per_stage``.
        """
        if stage_steps >= self.iterations_per_stage:
            return True
        if self.switch_rule == "fixed" or len(mismatch_history) < 2 * self.plateau_patience:
            return False
        k = self.plateau_patience
        recent, before = mismatch_history[-k:], mismatch_history[-2 * k:-k]
        mean_recent, mean_before = sum(recent) / k, sum(before) / k
        return mean_recent > (1 - self.plateau_tol) * mean_before

    def recording_converged(self, losses: list[float]) -> bool:
        """Whether the fake score has converged on g_0's samples (a seam): the mean of the last
        ``recording_patience`` DSM losses improves by less than ``recording_tol`` (relative) on the mean of the
        ``recording_patience`` before; or ``max_recording_updates`` is reached."""
        if len(losses) >= self.max_recording_updates:
            return True
        k = self.recording_patience
        if len(losses) < 2 * k:
            return False
        recent, before = sum(losses[-k:]) / k, sum(losses[-2 * k:-k]) / k
        return recent > (1 - self.recording_tol) * before

    def path_indices(self, candidate_updates: list[int], losses: list[float]) -> list[int]:
        """Which candidates become ``c_1 .. c_N`` (indices into the candidates, in order, the last one always
        ``c_N``): those whose smoothed DSM loss is nearest to ``L_0 - k/N (L_0 - L_end)`` for ``k = 1 .. N - 1``,
        where ``L_0`` is the mean loss of the first ``recording_patience`` updates (the teacher's score on g_0) and
        ``L_end`` that of the last (the converged score). Every candidate when there are at most N; equally spaced
        candidates when the loss did not fall."""
        n, count = self.num_checkpoints, len(candidate_updates)
        if count <= n:
            return list(range(count))
        k = self.recording_patience
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

    def _keep_candidate(self) -> None:
        state = _cpu_state(self.fake_score.net)
        update = len(self.recording_losses)
        if self.checkpoint_dir is None:  # a name unique to this content: written once next to each checkpoint dir
            name = f"disback_degradation_{update:06d}_{uuid.uuid4().hex[:12]}.pt"
            self.candidates.append([update, side_file(name, state)])
            return
        file = self.checkpoint_dir / f"degradation_{update:06d}.pt"
        if self.trainer.is_global_zero:
            atomic_save(state, file)
        self.trainer.strategy.barrier("disback_checkpoint")
        self.candidates.append([update, str(file)])

    def _finish_recording(self) -> None:
        """Keep the chosen candidates as the path ``c_1 .. c_N`` and start backtracking."""
        if not self.candidates or self.candidates[-1][0] != len(self.recording_losses):
            self._keep_candidate()  # c_N is the converged score itself
        chosen = self.path_indices([u for u, _ in self.candidates], self.recording_losses)
        self.path = [self.candidates[i][1] for i in chosen]
        for i, (_, entry) in enumerate(self.candidates):
            if i not in chosen and isinstance(entry, str) and self.trainer.is_global_zero:
                Path(entry).unlink(missing_ok=True)
        self.candidates = []
        self._next_stage()

    def _next_stage(self) -> None:
        self.stage += 1
        self.stage_steps = 0
        self.mismatch_history = []
        self._load_target()

    def after_training_step(self) -> None:
        if self.recording:
            if self.recording_converged(self.recording_losses):
                self._finish_recording()
            elif self.stage_steps > 0 and self.stage_steps % self.degradation_interval == 0:
                self._keep_candidate()
        elif self.stage < self.num_stages and self.should_advance(self.stage_steps, self.mismatch_history):
            self._next_stage()
        self.log("disback/stage", float(self.stage), batch_size=1)

    # -- losses ------------------------------------------------------------------------------------
    def train_generator_now(self) -> bool:
        return not self.recording and super().train_generator_now()

    def auxiliary_parameters(self):
        return self.fake_score.net.parameters()

    def auxiliary_loss(self, batch: dict, captions: list[str], cond) -> Tensor:
        """DSM of the fake score on (detached) generator samples."""
        with torch.no_grad():
            x0 = self.generate(captions, cond=cond)
        return denoising_loss(self.fake_score, self.schedule, x0, cond)

    def on_auxiliary_update(self, loss: Tensor) -> None:
        if self.recording:
            self.stage_steps += 1
            self.recording_losses.append(float(loss))  # a host sync per update, during the recording only

    def on_generator_update(self) -> None:
        self.stage_steps += 1
        if self.switch_rule == "plateau":  # a host sync per update: only when the rule reads the history
            self.mismatch_history = (self.mismatch_history + [float(self._mismatch)])[-2 * self.plateau_patience:]

    def generator_loss(self, batch: dict, captions: list[str], cond) -> Tensor:
        x0 = self.generate(captions, cond=cond)
        timesteps = self.sample_timesteps(x0.shape[0])
        x_t, alpha, sigma = self.noised(x0, timesteps)
        with torch.no_grad():
            pred_fake = self.fake_score(x_t.detach(), timesteps, cond)
            uncond = self.model.null_cond(x0.shape[0]) if self.guidance_scale != 1.0 else None
            pred_real = guided_prediction(self.real_score_model(), x_t.detach(), timesteps, cond, uncond,
                                          self.guidance_scale)
        out = score_distillation_from_predictions(
            x_t, pred_fake, pred_real, expand_like(alpha, x0), expand_like(sigma, x0), self.schedule.prediction_type,
            weight=self.weight(timesteps, alpha, sigma), normalize=self.normalize, x0=x0.detach())
        self._mismatch = (out.x0_fake - out.x0_real).pow(2).flatten(1).mean(1).mean()
        self.log("disback/score_mismatch", self._mismatch, batch_size=x0.shape[0])
        return out.loss

    # -- checkpoints -------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["disback"] = {"stage": self.stage, "stage_steps": self.stage_steps, "path": list(self.path),
                                 "recording_losses": list(self.recording_losses), "candidates": [list(c) for c in self.candidates],
                                 "mismatch_history": list(self.mismatch_history),
                                 "num_checkpoints": self.num_checkpoints, "backtracking": self.backtracking}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("disback")
        if state is None:
            raise ValueError("checkpoint has no 'disback' state: it was not written by DisBackStudent")
        if (state["num_checkpoints"], state["backtracking"]) != (self.num_checkpoints, self.backtracking):
            raise ValueError(f"checkpoint has num_checkpoints={state['num_checkpoints']}, backtracking="
                             f"{state['backtracking']}; this run has {self.num_checkpoints}, {self.backtracking}: "
                             "resume with the same settings")
        missing = missing_side_files(state["path"])
        if missing:
            raise FileNotFoundError(f"the recorded degradation path's files {missing} are missing: restore them (they "
                                    "live next to the checkpoint, or in checkpoint_dir) or restart the run")
        self.stage, self.stage_steps = int(state["stage"]), int(state["stage_steps"])
        self.path, self.mismatch_history = list(state["path"]), list(state["mismatch_history"])
        self.recording_losses = list(state.get("recording_losses", []))
        self.candidates = [list(c) for c in state.get("candidates", [])]
        # real_score's weights (the current target) come back with the module's state dict

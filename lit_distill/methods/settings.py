"""The methods' settings, grouped by concept: frozen dataclasses that LightningCLI reads as nested mappings.

In a config::

    model:
      class_path: lit_distill.methods.TeacherRL
      init_args:
        sampling: {num_steps: 10, noise_level: 0.7, rollouts_per_prompt: 8}
        optim: {lr: 1.0e-4}

and on the command line ``--model.sampling.num_steps 20``. Fields a config leaves out keep the method's
defaults. In Python a group is an instance or a dict of some of its fields (``sampling={"num_steps": 4}``:
the other fields keep the method's defaults; an instance replaces them all). Each field has one name across
the library; :data:`LEGACY_NAMES` maps the flat names of checkpoints written before the groups existed.
"""
from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from typing import Any, Literal, Mapping, Optional, TypeVar

Group = TypeVar("Group")
STEP_WEIGHTINGS = ("kl", "mean", "kl_dt")


def _check(condition: bool, group: object, field: str, rule: str) -> None:
    if not condition:
        raise ValueError(f"{type(group).__name__}.{field}={getattr(group, field)!r}: {rule}")


def _check_counts(group: object, *names: str) -> None:
    """Each field of ``names`` is a count: an integer >= 1."""
    for name in names:
        value = getattr(group, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(group).__name__}.{name}={value!r} must be an integer >= 1")


@dataclass(frozen=True)
class Optim:
    """AdamW (fused on CUDA) and gradient clipping.

    Args:
        lr: learning rate.
        betas: AdamW's (beta1, beta2).
        weight_decay: AdamW's decoupled weight decay.
        max_grad_norm: clip the gradient to this global norm before each step (None: no clipping).
    """
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        _check(self.lr > 0, self, "lr", "must be > 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), self, "betas", "two values in [0, 1)")
        _check(self.max_grad_norm is None or self.max_grad_norm > 0, self, "max_grad_norm", "must be > 0 or None")


@dataclass(frozen=True)
class OneStepOptim(Optim):
    """:class:`Optim` of the one-step methods' two networks, and how often each is updated.

    Args:
        aux_lr: learning rate of the auxiliary network (fake score / classifier); None: ``lr``.
        aux_updates_per_generator_update: auxiliary updates per generator update (DMD2's "dfake_gen_update_ratio").
    """
    aux_lr: Optional[float] = None
    aux_updates_per_generator_update: int = 1

    def __post_init__(self):
        super().__post_init__()
        _check(self.aux_lr is None or self.aux_lr > 0, self, "aux_lr", "must be > 0 or None")
        _check_counts(self, "aux_updates_per_generator_update")


COMPILE_MODES = ("auto", "off", "regional", "full")
NORM_PRECISIONS = ("input", "float32")


@dataclass(frozen=True)
class Runtime:
    """How a run executes, not what it learns.

    Args:
        seed: base seed of every random draw of training (step ``k`` on rank ``r`` draws from
            ``seed + 1009 k + r``), so a resumed run draws what an uninterrupted one would.
        nan_policy: ``"raise"`` stops with the step and the tensor named when a loss or reward is not finite;
            ``"skip"`` skips that update and counts it in the ``nonfinite_skipped`` log.
        compile: ``torch.compile`` of the trained denoiser: ``"regional"`` compiles each repeated diffusers block
            (UNet resnets and transformer blocks, SD3 joint blocks: ``lit_distill.models.compilation``) and
            reuses one compiled graph across blocks of the same shape, so warm-up is far shorter than
            ``"full"`` (the whole network, one graph); ``"off"`` (default) runs eager; ``"auto"`` is
            ``"regional"`` on a CUDA device and ``"off"`` elsewhere. The default stays eager until the GPU
            benchmark of docs/speed.md has measured whether compilation pays. ``True`` / ``False`` read as ``"full"`` /
            ``"off"``. A compiled mode on a CPU run is an error.
        compile_cache: directory of the compiler's caches (inductor's FX graph and kernel caches, AOTAutograd's),
            so that a second run on the same machine skips most of the warm-up. None: ``$TORCHINDUCTOR_CACHE_DIR``
            when set, else ``torch_compile`` in the lit_distill cache directory.
        rollout_cuda_graphs: run the rollout's denoiser calls as CUDA graphs (``torch.compile`` mode
            ``"reduce-overhead"`` of the whole network, used only by the no-grad, fixed-shape rollout; training
            keeps ``compile``'s graphs). CUDA only; the graphs keep a memory pool of their own.
        norm_precision: ``"input"``: GroupNorm and LayerNorm layers under bf16/fp16 autocast take their
            input's dtype (statistics still accumulate in fp32 inside the kernels) instead of autocast's rule,
            which casts them to fp32 and back around every norm; outside autocast, or on fp32 inputs, they are
            unchanged (bitwise). ``"float32"`` (default, until measured): autocast's rule.
        gradient_checkpointing: activation checkpointing in the trained diffusers network (less memory, one more
            forward per backward).
    """
    seed: int = 0
    nan_policy: Literal["raise", "skip"] = "raise"
    compile: Literal["auto", "off", "regional", "full"] = "off"
    compile_cache: Optional[str] = None
    rollout_cuda_graphs: bool = False
    norm_precision: Literal["input", "float32"] = "float32"
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if isinstance(self.compile, bool):  # the boolean of earlier versions
            object.__setattr__(self, "compile", "full" if self.compile else "off")
        _check(self.nan_policy in ("raise", "skip"), self, "nan_policy", "choose 'raise' or 'skip'")
        _check(self.compile in COMPILE_MODES, self, "compile", f"choose one of {list(COMPILE_MODES)}")
        _check(self.norm_precision in NORM_PRECISIONS, self, "norm_precision", f"choose one of {list(NORM_PRECISIONS)}")


WINDOW_MODES = ("random", "sliding")


@dataclass(frozen=True)
class SDEWindow:
    """A window of consecutive stochastic steps, the only steps that train; the steps around it are ODE steps
    (Flow-GRPO-Fast's ``sde_window_size`` / ``sde_window_range``; MixGRPO's sliding window). Only the window's
    steps have log-densities, so the update costs ``size`` steps per rollout instead of all of them.

    Args:
        size: steps in the window.
        mode: ``"random"``: a new position for each rollout batch, uniform over the positions that fit in
            ``range`` (Flow-GRPO-Fast); ``"sliding"``: the window starts at ``range[0]`` and moves ``stride`` steps
            later every ``shift_every`` training steps, back to the start once it would pass the end (MixGRPO's
            progressive window with roll-back). Either way the position is a function of (``runtime.seed``, the
            training step), so a resumed run places it as an uninterrupted one would, and every rank agrees.
        range: ``(first, end)``: the window lies within steps ``first .. end - 1`` (None: every trained step,
            ``0 .. int(num_steps * updates.timestep_fraction) - 1``).
        shift_every: training steps between two moves of a ``"sliding"`` window.
        stride: steps a ``"sliding"`` window moves at a time.
    """
    size: int = 2
    mode: Literal["random", "sliding"] = "random"
    range: Optional[tuple[int, int]] = None
    shift_every: int = 1
    stride: int = 1

    def __post_init__(self):
        _check_counts(self, "size", "shift_every", "stride")
        _check(self.mode in WINDOW_MODES, self, "mode", f"choose one of {list(WINDOW_MODES)}")
        if self.range is not None:
            object.__setattr__(self, "range", tuple(int(i) for i in self.range))
            _check(len(self.range) == 2 and 0 <= self.range[0] < self.range[1], self, "range",
                   "give (first, end) with 0 <= first < end")
            _check(self.range[1] - self.range[0] >= self.size, self, "range", f"must hold size={self.size} steps")


@dataclass(frozen=True)
class Sampling:
    """How TeacherRL and OPDStudent roll out, and how they draw evaluation images.

    Args:
        num_steps: sampling steps of a training rollout.
        noise_level: eta (VP, DDIM) or a (rectified flow) of the stochastic steps.
        sde_steps: indices of the stochastic steps (None: all); the others are ODE steps.
        sde_window: a :class:`SDEWindow` (or a dict of its fields): stochastic and trained steps only in a window
            that moves between rollout batches, ODE steps elsewhere (None: no window). Excludes ``sde_steps``.
        guidance_scale: classifier-free guidance in rollouts, recomputed kernels and evaluation (1: off).
        rollouts_per_prompt: rollouts of each prompt of a batch (GRPO's group size G).
        eval_steps: ODE steps of evaluation images (``generate_eval_samples``).
    """
    num_steps: int = 10
    noise_level: float = 0.7
    sde_steps: Optional[tuple[int, ...]] = None
    sde_window: Optional[SDEWindow] = None
    guidance_scale: float = 1.0
    rollouts_per_prompt: int = 8
    eval_steps: int = 20

    def __post_init__(self):
        if self.sde_steps is not None:
            object.__setattr__(self, "sde_steps", tuple(int(i) for i in self.sde_steps))
        if isinstance(self.sde_window, Mapping):
            object.__setattr__(self, "sde_window", group(self.sde_window, SDEWindow()))
        _check_counts(self, "num_steps", "rollouts_per_prompt", "eval_steps")
        _check(self.noise_level >= 0, self, "noise_level", "must be >= 0")
        _check(self.sde_window is None or self.sde_steps is None, self, "sde_window",
               "give either sde_steps (fixed stochastic steps) or sde_window (a moving window), not both")
        if self.sde_window is not None and self.sde_window.range is not None:
            _check(self.sde_window.range[1] <= self.num_steps, self, "sde_window",
                   f"range must lie within the {self.num_steps} sampling steps")


@dataclass(frozen=True)
class Updates:
    """How one rollout batch of TeacherRL / OPDStudent becomes optimiser updates.

    Args:
        steps_per_sample: random steps of each rollout that enter the loss (None: all of them; Flow-GRPO's
            denoising reduction); TeacherRL draws among the stochastic steps, OPDStudent among all.
        timestep_fraction: train on the first ``int(num_steps * timestep_fraction)`` steps of each rollout only
            (Flow-GRPO's and DiffusionOPD's ``train.timestep_fraction``; their 0.99 with 10 steps leaves out the
            last step, whose kernel std is near zero on a flow grid).
        minibatch_size: (sample, step) pairs per optimiser update.
        inner_epochs: passes over the pairs of one rollout batch.
        reduction: ``"sum"``: a step's log-density and KL are summed over the D elements of a sample (exact);
            ``"mean"``: divided by D (DDPO / Flow-GRPO's per-element scale).
    """
    steps_per_sample: Optional[int] = None
    timestep_fraction: float = 1.0
    minibatch_size: int = 64
    inner_epochs: int = 1
    reduction: Literal["sum", "mean"] = "sum"

    def __post_init__(self):
        if self.steps_per_sample is not None:
            _check_counts(self, "steps_per_sample")
        _check(0 < self.timestep_fraction <= 1, self, "timestep_fraction", "need 0 < timestep_fraction <= 1")
        _check_counts(self, "minibatch_size", "inner_epochs")
        _check(self.reduction in ("sum", "mean"), self, "reduction", "choose 'sum' or 'mean'")


@dataclass(frozen=True)
class Policy:
    """TeacherRL's policy-gradient objective (GRPO / DDPO).

    Args:
        advantage: ``"group"`` (GRPO: rewards standardised within each prompt's rollouts) or ``"running"``
            (DDPO's running normalisation over every reward seen).
        adv_clip: advantages are clipped to ``[-adv_clip, adv_clip]``.
        clip_range: PPO ratio clip.
        kl_weight: beta of the closed-form per-step KL to the reference (0: no reference kept).
        reference: ``"copy"`` (a frozen copy of the initial model) or ``"lora_base"`` (the model with LoRA
            disabled: no copy; needs ``lora_rank > 0``).
        reference_dtype: dtype of the reference copy, e.g. ``"bfloat16"`` (None: the model's).
    """
    advantage: Literal["group", "running"] = "group"
    adv_clip: float = 5.0
    clip_range: float = 0.2
    kl_weight: float = 0.0
    reference: Literal["copy", "lora_base"] = "copy"
    reference_dtype: Optional[str] = None

    def __post_init__(self):
        _check(self.advantage in ("group", "running"), self, "advantage", "choose 'group' (GRPO) or 'running' (DDPO)")
        _check(self.reference in ("copy", "lora_base"), self, "reference", "choose 'copy' or 'lora_base'")
        _check(self.kl_weight >= 0, self, "kl_weight", "must be >= 0")


@dataclass(frozen=True)
class Distillation:
    """OPDStudent's per-step objective.

    Args:
        ode_weight: weight of mean matching ``||mu_s - mu_T||^2`` on deterministic (ODE) steps.
        step_weighting: the default of ``OPDStudent.step_weight`` (default ``"mean"``, DiffusionOPD's): ``"kl"``
            (every step's exact KL: their sum is the KL of the whole path, dominated by the low-noise late steps, where the std is smallest); ``"mean"``
            (each stochastic step's KL times ``2 std^2``: plain mean matching ``||mu_s - mu_T||^2`` on every step,
            what DiffusionOPD trains with its default noise level 0); ``"kl_dt"`` (each KL times the step's length
            ``sigma_t - sigma_s``: ``||mu_s - mu_T||^2 / (2 sigma_t^2)`` with the SDE's noise level ``sigma_t``,
            the per-step loss of DiffusionOPD's training script with noise).
    """
    ode_weight: float = 1.0
    step_weighting: Literal["kl", "mean", "kl_dt"] = "mean"

    def __post_init__(self):
        _check(self.step_weighting in STEP_WEIGHTINGS, self, "step_weighting",
               f"choose one of {list(STEP_WEIGHTINGS)}")


@dataclass(frozen=True)
class Generator:
    """The one-step generator ``x0 = g(z, c)``: the teacher's network run once at ``t_star``.

    Args:
        init: ``"teacher"`` (a copy of the teacher's network) or ``"random"`` (random weights, same architecture).
        t_star: the model timestep it runs at (None: the noisiest training timestep).
        ema_decay: decay of its EMA, which evaluation and export use.
    """
    init: Literal["teacher", "random"] = "teacher"
    t_star: Optional[float] = None
    ema_decay: float = 0.99

    def __post_init__(self):
        _check(self.init in ("teacher", "random"), self, "init", "choose 'teacher' or 'random'")
        _check(0 <= self.ema_decay <= 1, self, "ema_decay", "must be in [0, 1]")


@dataclass(frozen=True)
class Noising:
    """Where the one-step methods noise samples for their losses, and the weight of each time.

    Args:
        t_min, t_max: the fraction of the time range (1 = noise) that training times are drawn from.
        weighting: ``w(t)``, one of ``lit_distill.losses.score_distillation.WEIGHTINGS``.
    """
    t_min: float = 0.02
    t_max: float = 0.98
    weighting: Literal["x0", "eps", "sigma2", "constant"] = "x0"

    def __post_init__(self):
        _check(0.0 <= self.t_min < self.t_max <= 1.0, self, "t_min", f"need 0 <= t_min < t_max <= 1 (t_max={self.t_max})")
        _check(self.weighting in ("x0", "eps", "sigma2", "constant"), self, "weighting",
               "choose one of ['x0', 'eps', 'sigma2', 'constant']")


@dataclass(frozen=True)
class Stages:
    """DisBack's stages (see ``lit_distill.methods.disback.BacktrackingSchedule``).

    Args:
        num_checkpoints: N, checkpoints kept along the degradation path (then N backtracking targets).
        degradation_interval: fake-score updates between two candidate checkpoints of the recording.
        recording_patience, recording_tol: the recording has converged once the mean DSM loss of the last
            ``recording_patience`` fake-score updates improves by less than ``recording_tol`` (relative) on the
            mean of the ``recording_patience`` before.
        max_recording_updates: the recording stops here even if it has not converged.
        iterations_per_stage: generator updates per target (``"fixed"``), or at most (``"plateau"``).
        switch_rule: ``"fixed"`` or ``"plateau"`` (move on when the score mismatch stops improving).
        plateau_patience, plateau_tol: the plateau rule compares the mean mismatch of the last ``patience``
            generator updates with that of the ``patience`` before; less than ``tol`` relative improvement advances.
    """
    num_checkpoints: int = 4
    degradation_interval: int = 25
    recording_patience: int = 100
    recording_tol: float = 0.01
    max_recording_updates: int = 2000
    iterations_per_stage: int = 100
    switch_rule: Literal["fixed", "plateau"] = "fixed"
    plateau_patience: int = 50
    plateau_tol: float = 0.01

    def __post_init__(self):
        _check_counts(self, "num_checkpoints", "degradation_interval", "recording_patience", "max_recording_updates",
                      "iterations_per_stage", "plateau_patience")
        _check(self.switch_rule in ("fixed", "plateau"), self, "switch_rule", "choose one of ['fixed', 'plateau']")


@dataclass(frozen=True)
class Classifier:
    """NoDistillOneStep's density-ratio classifier (``lit_distill.models.DensityRatioClassifier``).

    Args:
        init: its backbone starts from the teacher's weights (``"teacher"``) or from random ones (``"random"``).
        feature_layer: the backbone submodule whose output feeds the head (``"mid_block"``: a UNet's bottleneck).
        head_channels: width of the head.
    """
    init: Literal["teacher", "random"] = "teacher"
    feature_layer: str = "mid_block"
    head_channels: int = 128

    def __post_init__(self):
        _check(self.init in ("teacher", "random"), self, "init", "choose 'teacher' or 'random'")


def group(value: "Group | Mapping[str, Any] | None", default: Group) -> Group:
    """The settings group from ``value``: an instance of ``default``'s class (as is), a mapping of some of its
    fields (the others from ``default``) or None (``default``). Unknown fields are a ValueError naming them."""
    cls = type(default)
    if value is None:
        return default
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown settings {unknown}; its fields are {sorted(known)}")
        return replace(default, **value)
    raise TypeError(f"expected a {cls.__name__} or a dict of its fields, got {type(value).__name__}")


def groups(cls: type, **values: Any) -> list:
    """:func:`group` of each ``name=value``, with the default of parameter ``name`` in ``cls.__init__``'s signature
    (the method's defaults, written once: in its signature)."""
    parameters = inspect.signature(cls.__init__).parameters
    return [group(value, parameters[name].default) for name, value in values.items()]


#: the arguments of the methods that are settings groups (a dataclass of this module)
GROUPS = ("sampling", "updates", "policy", "distill", "optim", "runtime", "generator", "noising", "stages", "classifier")


def flat_settings(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """``hparams`` with each settings group spread into ``group.field`` entries (for comparing two runs)."""
    out: dict[str, Any] = {}
    for name, value in hparams.items():
        if name in GROUPS and isinstance(value, Mapping):
            out.update({f"{name}.{field}": v for field, v in value.items()})
        else:
            out[name] = value
    return out


def plain(value: Any) -> Any:
    """Settings groups as plain dicts (hyper-parameters that any YAML writer and ``torch.load`` read)."""
    return asdict(value) if is_dataclass(value) and not isinstance(value, type) else value


#: Flat names of the hyper-parameters in checkpoints written before the settings were grouped (layout 1):
#: ``{method: {old name: "group.field" or a new top-level name}}``.
_COMMON = {"lr": "optim.lr", "weight_decay": "optim.weight_decay", "betas": "optim.betas",
           "max_grad_norm": "optim.max_grad_norm", "seed": "runtime.seed", "nan_policy": "runtime.nan_policy",
           "compile": "runtime.compile", "gradient_checkpointing": "runtime.gradient_checkpointing"}
_SAMPLING = {k: f"sampling.{k}" for k in ("num_steps", "noise_level", "sde_steps", "guidance_scale", "eval_steps")}
_UPDATES = {"steps_per_sample": "updates.steps_per_sample", "minibatch_size": "updates.minibatch_size",
            "timestep_fraction": "updates.timestep_fraction"}
_ONE_STEP = {"generator_init": "generator.init", "t_star": "generator.t_star", "ema_decay": "generator.ema_decay",
             "aux_lr": "optim.aux_lr", "aux_updates_per_generator_update": "optim.aux_updates_per_generator_update",
             "t_min": "noising.t_min", "t_max": "noising.t_max", "weighting": "noising.weighting",
             "eval_captions": "eval_prompts"}
LEGACY_NAMES: dict[str, dict[str, str]] = {
    "pretrain": {**_COMMON, "caption_dropout": "prompt_dropout"},
    "teacher_rl": {**_COMMON, **_SAMPLING, **_UPDATES, "group_size": "sampling.rollouts_per_prompt",
                   "inner_epochs": "updates.inner_epochs", "logprob_reduction": "updates.reduction",
                   **{k: f"policy.{k}" for k in ("advantage", "adv_clip", "clip_range", "kl_weight", "reference",
                                                 "reference_dtype")}},
    "opd": {**_COMMON, **_SAMPLING, **_UPDATES, "rollouts_per_prompt": "sampling.rollouts_per_prompt",
            "kl_reduction": "updates.reduction", "ode_weight": "distill.ode_weight",
            "step_weighting": "distill.step_weighting"},
    "disback": {**_COMMON, **_ONE_STEP, "guidance_scale": "real_guidance_scale",
                **{k: f"stages.{k}" for k in ("num_checkpoints", "degradation_interval", "recording_patience",
                                              "recording_tol", "max_recording_updates", "iterations_per_stage",
                                              "switch_rule", "plateau_patience", "plateau_tol")}},
    "nodistill": {**_COMMON, **_ONE_STEP, "classifier_init": "classifier.init",
                  "feature_layer": "classifier.feature_layer", "head_channels": "classifier.head_channels"},
}


def migrate_hyperparameters(method: str, hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments of a layout-1 checkpoint's flat ``hparams`` in today's names (groups as dicts of the fields
    that were saved). Names that need no change pass through; a name that no longer exists is a ValueError."""
    names = LEGACY_NAMES.get(method)
    if names is None:
        raise ValueError(f"a checkpoint of method {method!r} written before the settings were grouped: no "
                         f"migration is known for it (known: {sorted(LEGACY_NAMES)})")
    out: dict[str, Any] = {}
    for key, value in hparams.items():
        if key.startswith("_"):  # LightningCLI's bookkeeping (_class_path, _instantiator)
            continue
        target = names.get(key, key)
        if "." in target:
            section, field = target.split(".", 1)
            out.setdefault(section, {})[field] = value
        else:
            out[target] = value
    return out

"""What every lit_distill LightningModule shares: optimiser building, device checks, non-finite
losses, the per-step random generator, evaluation prompts, export, checkpoint identity. Methods subclass
:class:`DistillModule` and stay glue; it implements the protocols of ``lit_distill.protocols`` that callbacks,
strategies and the pipeline read."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import ClassVar, Iterable, Optional, Sequence

import lightning as L
import torch
from torch import Tensor, nn

from ..lightning_internals import (
    attached_trainer, count_checkpoint_steps_per_batch, count_one_step_per_batch, grad_scaler)
from ..models.compilation import compile_network, is_compiled, use_compile_cache
from ..models.diffusion_model import DiffusionModel
from ..models.norms import set_norm_precision
from ..utils.resume import align_batch_count, changed_settings, log_changes, refuse_changes, run_settings
from .settings import Optim, Runtime, flat_settings, migrate_hyperparameters, plain

#: written into every checkpoint; checkpoints without it predate the grouped settings (layout 1)
CHECKPOINT_LAYOUT = 2


class NonFiniteLossError(FloatingPointError):
    """A loss or reward became NaN/inf; the message names the step and the tensor."""


class DistillModule(L.LightningModule):
    """Base of the methods: what every method's settings groups ``optim`` and ``runtime`` control, evaluation
    prompts, checkpoint identity.

    Args:
        optim: :class:`~lit_distill.methods.settings.Optim` (AdamW, gradient clipping).
        runtime: :class:`~lit_distill.methods.settings.Runtime` (seed, nan_policy, compilation, norm precision,
            gradient_checkpointing).
        eval_prompts: prompts cycled by ``generate_eval_samples`` when the caller gives none (None: the empty
            prompt).
    Subclasses call :meth:`save_settings` in their ``__init__`` (hyper-parameters with the groups as dicts), and
    implement the protocols of ``lit_distill.protocols`` that the callbacks they run with need: every lit_distill
    method defines ``exported_model()`` (:class:`Exportable`, with :meth:`export`) and ``images_per_batch(batch)``
    (:class:`ImageCounter`).
    """

    method: ClassVar[str] = "base"
    #: settings that a run resumed from a checkpoint cannot change, and why (any other change takes effect and is
    #: logged; see ``lit_distill.utils.resume``), a field of a settings group as ``group.field``. Names absent from a
    #: method's arguments are ignored.
    fixed_on_resume: ClassVar[dict[str, str]] = {
        **dict.fromkeys(("model", "model_kwargs", "teacher", "teacher_kwargs"),
                        "the trained networks were built from it and now come from the checkpoint, so a change "
                        "would be ignored"),
        **dict.fromkeys(("generator.init", "classifier.init"), "the networks were initialised when the run started"),
        **dict.fromkeys(("lora_rank", "classifier.feature_layer", "classifier.head_channels", "policy.reference",
                         "policy.reference_dtype", "policy.advantage"),
                        "the checkpoint's weights (or its reference copy, or running reward statistics) were "
                        "built for that value"),
        **dict.fromkeys(("backtracking", "stages.num_checkpoints"), "the recorded degradation path depends on it"),
    }
    #: ``lit_distill.protocols.DistributedHints``: True where a backward may leave trained parameters unused.
    ddp_find_unused_parameters: ClassVar[bool] = False

    def __init__(self, *, optim: Optim, runtime: Runtime, eval_prompts: Optional[list[str]] = None):
        super().__init__()
        self.optim, self.runtime = optim, runtime
        self.eval_prompts = list(eval_prompts) if eval_prompts else None
        self.nonfinite_skipped = 0

    @property
    def seed(self) -> int:
        return self.runtime.seed

    def save_settings(self, ignore: Sequence[str] = ()) -> None:
        """``save_hyperparameters`` of the calling ``__init__``'s arguments, minus ``ignore`` (arguments given as
        objects: a model or a reward passed in Python), with the settings groups as plain dicts, so that
        hparams.yaml is readable and checkpoints load without these classes."""
        self.save_hyperparameters(ignore=list(ignore), frame=inspect.currentframe().f_back)
        self.save_hyperparameters({name: plain(value) for name, value in self.hparams.items()})

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Lightning's ``load_from_checkpoint``; a checkpoint written before the settings were grouped (layout 1)
        gets its flat hyper-parameters renamed (``settings.LEGACY_NAMES``), or a ValueError naming those that no
        longer exist."""
        if not Path(checkpoint_path).is_file():  # a URL or a missing file: Lightning's own loading says what failed
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False, mmap=True)
        if checkpoint.get("lit_distill_layout", 1) < CHECKPOINT_LAYOUT:
            method = checkpoint.get("lit_distill_method")
            migrated = migrate_hyperparameters(method, checkpoint.get(cls.CHECKPOINT_HYPER_PARAMS_KEY, {}))
            known = set(inspect.signature(cls.__init__).parameters) - {"self"}
            if set(migrated) - known:
                raise ValueError(f"{checkpoint_path}: written by an older lit_distill with settings "
                                 f"{sorted(set(migrated) - known)} that {cls.__name__} no longer has; rebuild the "
                                 "module with today's settings and load the weights (state_dict) into it")
            kwargs = {**migrated, **kwargs}
        del checkpoint
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    # -- randomness and evaluation ---------------------------------------------------------------
    def step_generator(self, device: Optional[torch.device | str] = None) -> torch.Generator:
        """A generator for this training step's randomness (on ``device``, default the module's): a pure function
        of (seed, global step, rank), so a resumed run draws exactly what an uninterrupted one would."""
        trainer = attached_trainer(self)
        rank = trainer.global_rank if trainer is not None else 0
        return torch.Generator(device or self.device).manual_seed(self.seed + self.global_step * 1009 + rank)

    def eval_prompts_for(self, n: int, prompts: Optional[Sequence[str]] = None) -> list[str]:
        """The prompts of ``n`` evaluation images: ``prompts`` (checked to be ``n``), else ``eval_prompts`` cycled
        to ``n``, else the empty prompt (for a model without text encoder the prompts are not used)."""
        if prompts is not None:
            if isinstance(prompts, str) or len(prompts) != n:
                raise ValueError(f"prompts: give a list of n={n} prompts, one per image (got {prompts!r:.80})")
            return list(prompts)
        pool = list(self.eval_prompts or [""])
        return [pool[i % len(pool)] for i in range(n)]

    # -- building blocks ---------------------------------------------------------------------
    def make_optimizer(self, params: Iterable[nn.Parameter], lr: float | None = None) -> torch.optim.Optimizer:
        """AdamW of ``optim`` over the trainable ``params`` (``lr`` overrides ``optim.lr``)."""
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError(f"{type(self).__name__} has no trainable parameters: check lora/freeze options")
        # fused AdamW on CUDA, unless fp16 loss scaling: Lightning cannot clip before a fused optimiser unscales
        fused = self.device.type == "cuda" and grad_scaler(attached_trainer(self)) is None
        return torch.optim.AdamW(params, lr=lr or self.optim.lr, betas=self.optim.betas,
                                 weight_decay=self.optim.weight_decay, fused=fused)

    def prepare_network(self, net: nn.Module) -> nn.Module:
        """Apply the gradient checkpointing option to the trained diffusers network."""
        if self.runtime.gradient_checkpointing:
            if not hasattr(net, "enable_gradient_checkpointing"):
                raise ValueError(f"runtime.gradient_checkpointing=True but {type(net).__name__} does not support it")
            net.enable_gradient_checkpointing()
        return net

    def compute_device(self) -> torch.device:
        """The device training runs on: the strategy's root device once a trainer is attached (``setup`` runs
        before Lightning moves the module there), else the module's own."""
        trainer = attached_trainer(self)
        return trainer.strategy.root_device if trainer is not None else self.device

    def compile_mode(self) -> str:
        """``runtime.compile`` resolved for this run: ``"auto"`` is ``"regional"`` on CUDA, ``"off"`` elsewhere."""
        mode = self.runtime.compile
        if mode == "auto":
            return "regional" if self.compute_device().type == "cuda" else "off"
        return mode

    def denoisers(self) -> list[DiffusionModel]:
        """Every ``DiffusionModel`` this module runs (trained and frozen); methods that keep models outside their
        submodules (OPD's teachers) add them."""
        return [m for m in self.modules() if isinstance(m, DiffusionModel)]

    def setup(self, stage: str) -> None:
        self.apply_runtime()

    def apply_runtime(self) -> None:
        """Apply ``runtime``'s execution settings to every network of :meth:`denoisers` (called from ``setup``, before
        Lightning moves the module to its device): the norm precision, and compilation in place (see
        ``lit_distill.models.compilation``; frozen networks too: OPD's teachers, TeacherRL's reference, DisBack's
        scores). A compiled mode or CUDA graphs on a run that is not on CUDA are a ValueError saying what to set."""
        for model in self.denoisers():
            set_norm_precision(model.net, self.runtime.norm_precision)
        mode, device = self.compile_mode(), self.compute_device()
        if device.type != "cuda":
            for name, on in (("compile", mode != "off"), ("rollout_cuda_graphs", self.runtime.rollout_cuda_graphs)):
                if on:
                    raise ValueError(f"runtime.{name}={getattr(self.runtime, name)!r} needs a CUDA device; this run "
                                     f"is on {device.type}. Set --model.runtime.{name} "
                                     f"{'auto' if name == 'compile' else 'false'} for CPU runs.")
        if mode != "off" or self.runtime.rollout_cuda_graphs:
            use_compile_cache(self.runtime.compile_cache)
        if mode != "off":
            for model in self.denoisers():
                if not is_compiled(model.net):
                    compile_network(model.net, mode)

    def check_finite(self, name: str, value: Tensor) -> bool:
        """True if ``value`` is finite. Otherwise raise (``nan_policy='raise'``) naming the step and the
        tensor, or count and log a skip (``'skip'``) and return False so the caller skips the update."""
        finite = finite_here = bool(torch.isfinite(value).all())
        if self.world_size > 1:
            # every rank must take the same branch, or a skipped backward hangs the others' all-reduce
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return True
        if self.runtime.nan_policy == "raise":
            kind = "not finite on another rank" if finite_here else "NaN" if bool(torch.isnan(value).any()) else "inf"
            raise NonFiniteLossError(
                f"{type(self).__name__}: {name} is {kind} at global step {self.global_step}. Lower the learning "
                "rate, check the reward, or set runtime.nan_policy='skip' to skip such updates.")
        self.nonfinite_skipped += 1
        self.log("nonfinite_skipped", float(self.nonfinite_skipped))
        return False

    def apply_update(self, optimizer, loss: Tensor, name: str) -> bool:
        """One manual optimiser step on ``loss``: finite check (see :meth:`check_finite`), backward through
        the strategy, clipping to ``optim.max_grad_norm``, step. Returns False if the update was skipped."""
        max_grad_norm = self.optim.max_grad_norm
        if not self.check_finite(name, loss):
            return False
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if max_grad_norm:
            self.clip_grad_norm(optimizer, max_grad_norm)
        optimizer.step()
        self.weights_changed()
        return True

    @staticmethod
    def weights_changed() -> None:
        """Call after changing trained weights in place inside ``training_step``: drops autocast's cache of
        bf16 weight casts. A cache-enabled autocast region (``torch.autocast``'s default) keeps the cast of every
        fp32 parameter that requires grad until the region ends, with no check of the parameter's version, so
        forwards after an in-place update in the same region would run the old weights. Lightning's
        mixed-precision plugin opens its region with ``cache_enabled=False``; this guards the methods when they
        run under a user's own autocast (a notebook, a custom loop)."""
        torch.clear_autocast_cache()

    def clip_grad_norm(self, optimizer: torch.optim.Optimizer, max_norm: float) -> None:
        """Clip the optimiser's gradients to global norm ``max_norm``. Without fp16 loss scaling this is
        ``torch.nn.utils.clip_grad_norm_`` (what Lightning itself calls; under FSDP2 the gradients are sharded
        ``DTensor`` s and the norm is still global). Lightning's ``clip_gradients`` is not used there because its
        mixed-precision plugin refuses every fused optimiser, even in bf16 where nothing is scaled."""
        if grad_scaler(attached_trainer(self)) is not None:  # fp16: Lightning unscales the gradients first
            self.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, max_norm)

    @property
    def world_size(self) -> int:
        """Processes training together (1 without a trainer)."""
        trainer = attached_trainer(self)
        return trainer.world_size if trainer is not None else 1

    # -- export ------------------------------------------------------------------------------
    def export(self, path: str | Path) -> Path:
        """Write the subclass's ``exported_model()`` as a diffusers-style directory (``load_model(path)`` reads it
        back): ``lit_distill.protocols.Exportable``, with the ``DiffusionModel`` to write (EMA weights swapped in,
        LoRA merged...) valid inside the ``with`` block. A subclass without ``exported_model`` is not Exportable,
        and ``ExportCallback`` says so when the run starts."""
        path = Path(path)
        with self.exported_model() as model:
            model.save_pretrained(path)
        return path

    # -- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lit_distill_method"] = self.method
        checkpoint["lit_distill_layout"] = CHECKPOINT_LAYOUT
        checkpoint["nonfinite_skipped"] = self.nonfinite_skipped
        if attached_trainer(self) is not None:
            checkpoint["run_settings"] = run_settings(self.trainer)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if checkpoint.get("lit_distill_layout", 1) < CHECKPOINT_LAYOUT and not self.automatic_optimization:
            count_checkpoint_steps_per_batch(checkpoint)  # layout 1 counted every optimiser step
        found = checkpoint.get("lit_distill_method")
        if found != self.method:
            raise ValueError(
                f"checkpoint was written by method {found!r} but this run is {self.method!r} "
                f"({type(self).__name__}); pass a checkpoint of the same method to --ckpt_path, or load "
                "its weights into a new run explicitly (e.g. the model path of the new method).")
        self.check_resumed_settings(checkpoint)
        self.nonfinite_skipped = checkpoint.get("nonfinite_skipped", 0)

    def check_resumed_settings(self, checkpoint: dict) -> None:
        """Compare this run's settings (``hparams``, the trainer's ``run_settings``) with the checkpoint's: refuse a
        change listed in ``fixed_on_resume`` or one that changes the networks' structure, log every other change."""
        what = f"{type(self).__name__} from global step {checkpoint.get('global_step')}"
        saved = checkpoint.get("hyper_parameters", {})
        if checkpoint.get("lit_distill_layout", 1) < CHECKPOINT_LAYOUT:  # flat names of older versions
            saved = migrate_hyperparameters(self.method, saved)
        changes = changed_settings(flat_settings(saved), flat_settings(dict(self.hparams)))
        refuse_changes(changes, self.fixed_on_resume, what)
        saved_keys, keys = set(checkpoint.get("state_dict", {})), set(self.state_dict())
        if saved_keys and saved_keys != keys:  # (a sharded checkpoint loads its weights in place: no "state_dict")
            listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()) or "none"
            raise ValueError(
                f"cannot resume {what}: the checkpoint's weights do not fit this run's networks (missing "
                f"{sorted(keys - saved_keys)[:3]}, unexpected {sorted(saved_keys - keys)[:3]}; changed settings: "
                f"{listed}). Fix: resume with the checkpoint's settings, or start a new run without --ckpt_path.")
        if attached_trainer(self) is not None and "run_settings" in checkpoint:
            changes.update(changed_settings(checkpoint["run_settings"], run_settings(self.trainer)))
        log_changes(changes, what)

    def on_train_start(self) -> None:
        """On a resumed run, the configured optimiser settings (lr, betas, weight decay, eps: compared and logged by
        :meth:`check_resumed_settings`) replace those restored with the optimiser state, unless a scheduler owns
        them; and Lightning's count of batches follows the data position (``align_batch_count``). Under manual
        optimisation a training step is one batch, whatever its number of optimiser updates
        (``count_one_step_per_batch``)."""
        if not self.automatic_optimization:
            count_one_step_per_batch(self.trainer)
        if self.trainer.ckpt_path is None:
            return
        if not self.trainer.lr_scheduler_configs:
            for optimizer in self.trainer.optimizers:
                for group in optimizer.param_groups:
                    group.update({k: optimizer.defaults[k] for k in ("lr", "betas", "weight_decay", "eps")
                                  if k in group and k in optimizer.defaults})
        align_batch_count(self.trainer)


def module_args(**kwargs) -> list[str]:
    """Names of the arguments given as ``nn.Module`` objects (a model or reward passed in Python rather
    than by name): they are kept out of ``hparams`` and checkpoints' hyper-parameters."""
    return [name for name, value in kwargs.items() if isinstance(value, nn.Module)]

"""Multi-GPU training of the lit_distill methods: DDP and FSDP strategies for Lightning 2.6.

Two strategies, usable from Python or as ``--trainer.strategy`` in a LightningCLI config
(``configs/strategies/ddp.yaml``, ``configs/strategies/fsdp.yaml``; docs/scaling.md):

:class:`DiffusionDDPStrategy` (``ddp_strategy()``)
    Lightning's DDP with ``find_unused_parameters`` chosen from the method when left ``None``: the
    one-step methods (DisBack, NoDistillOneStep) update two networks in turn, so each backward uses only
    one of them and DDP must look for unused parameters; TeacherRL, OPDStudent and DiffusionPretrain use
    every trained parameter in every backward and run without the search. Manual optimisation is correct
    under DDP: Lightning's ``manual_backward`` calls the DDP reducer's ``prepare_for_backward`` before
    *each* backward, so the gradients of every minibatch update are all-reduced (TeacherRL and OPD run
    several backward/step pairs per ``training_step``; ``tests/test_distributed.py`` checks that both
    ranks hold the same weights afterwards, and that a plain ``loss.backward()`` would not).

:class:`DiffusionFSDPStrategy` (``fsdp_strategy()``)
    Shards the *trained* denoiser of TeacherRL / OPDStudent. Lightning's own ``FSDPStrategy`` wraps the
    whole LightningModule in one root FSDP unit, whose forward is ``training_step``; a manual backward
    inside that forward trips FSDP's state machine (``Expects BACKWARD_PRE or BACKWARD_POST state but got
    HandleTrainingState.FORWARD``), and its precision plugin refuses ``clip_gradients(..., "norm")``.
    This strategy instead makes each trained network (``DiffusionModel.net`` of every ``DiffusionModel``
    submodule with trainable parameters) its own *root* FSDP module, with one FSDP unit per diffusers
    block (:func:`fsdp_block_classes`); the LightningModule itself is not wrapped. Each denoiser call is
    then a complete FSDP forward, each ``manual_backward`` a complete FSDP backward, and
    ``clip_gradients`` calls the root's ``clip_grad_norm_`` (the norm of the sharded gradients, reduced
    over ranks).

The rule for frozen networks (TeacherRL's ``reference`` copy, OPD's teachers, text encoders, VAEs):
they are **replicated**, never sharded, by default: each rank holds a full copy and runs it locally
(no communication in their forwards). OPD's teachers live in a plain dict, not as submodules, and are
always replicated; TeacherRL's reference copy is a submodule, and ``frozen="shard"`` makes it (and any
other frozen ``DiffusionModel`` submodule) a forward-only FSDP root too, for models whose frozen copy does
not fit on one GPU. Frozen copies are never trained, so they need no gradient synchronisation.

What FSDP does not cover, with a clear error at setup: modules that keep an EMA of the trained weights
(DiffusionPretrain, DisBack, NoDistillOneStep: the EMA reads the full parameters after every update,
which FSDP holds sharded) and trainable parameters outside a ``DiffusionModel.net`` (e.g. a classifier
head). Use DDP for those. Exporting a model trained with FSDP: save a Lightning checkpoint (full state
dict by default), load it into a fresh module on one device and call ``export`` there.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Literal, Optional, Sequence, Union

import torch
from lightning.pytorch.plugins.precision.fsdp import FSDPPrecision
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, StrategyRegistry
from torch import nn

log = logging.getLogger(__name__)

#: Class names of the diffusers blocks that become one FSDP unit each (and, with
#: ``activation_checkpointing=True``, one checkpointed region each), in every trained network that has them.
DEFAULT_BLOCK_CLASS_NAMES: tuple[str, ...] = (
    "BasicTransformerBlock",       # UNet2DConditionModel (SD 1.x/2.x/XL) cross-attention blocks, PixArt, DiT
    "ResnetBlock2D",               # UNet2DModel / UNet2DConditionModel resnets
    "JointTransformerBlock",       # SD3 / SD3.5 MMDiT blocks
    "FluxTransformerBlock",        # FLUX double-stream blocks
    "FluxSingleTransformerBlock",  # FLUX single-stream blocks
)

#: Methods whose backward passes use only part of the trained parameters (two networks updated in turn).
PARTIAL_BACKWARD_METHODS = ("disback", "nodistill", "one_step")

FrozenRule = Literal["replicate", "shard"]


# -- discovery ---------------------------------------------------------------------------------------
def _diffusion_models(module: nn.Module) -> list[tuple[str, nn.Module]]:
    from .models.diffusion_model import DiffusionModel

    return [(name, m) for name, m in module.named_modules() if isinstance(m, DiffusionModel)]


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def trained_networks(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, DiffusionModel)`` for every ``DiffusionModel`` submodule of ``module`` whose ``net`` has a
    trainable parameter (TeacherRL / OPDStudent: ``[("model", ...)]``)."""
    return [(name, m) for name, m in _diffusion_models(module) if _trainable(m.net)]


def frozen_networks(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, DiffusionModel)`` for every ``DiffusionModel`` submodule whose ``net`` is entirely frozen
    (TeacherRL's ``reference`` copy). OPD's teachers are not submodules and are not listed."""
    return [(name, m) for name, m in _diffusion_models(module) if not _trainable(m.net)]


def fsdp_block_classes(net: nn.Module, block_classes: Optional[Iterable[Union[str, type]]] = None) -> set[type]:
    """The module classes of ``net`` that become one FSDP unit each.

    ``block_classes``: class names (``"JointTransformerBlock"``) or classes; default
    :data:`DEFAULT_BLOCK_CLASS_NAMES`. Only classes that occur in ``net`` are returned. Raises a ValueError
    naming ``net``'s class when none occurs (FSDP would then put the whole network in one unit and save
    no memory), with the classes it does contain, so the caller can pass ``block_classes``.
    """
    wanted = list(DEFAULT_BLOCK_CLASS_NAMES if block_classes is None else block_classes)
    names = {c if isinstance(c, str) else c.__name__ for c in wanted}
    found = {type(m) for m in net.modules() if type(m).__name__ in names and m is not net}
    if not found:
        children = sorted({type(m).__name__ for m in net.modules() if m is not net and any(True for _ in m.parameters())})
        raise ValueError(
            f"FSDP: no block class of {sorted(names)} occurs in {type(net).__name__}, so nothing would be sharded "
            f"block by block. Pass the class names of its repeated blocks as block_classes (e.g. "
            f"DiffusionFSDPStrategy(block_classes=[...]) or --trainer.strategy.init_args.block_classes); "
            f"module classes in {type(net).__name__}: {children[:20]}")
    return found


def needs_find_unused_parameters(module: nn.Module) -> bool:
    """True for the one-step methods (each backward uses one of the two trained networks)."""
    return getattr(module, "method", None) in PARTIAL_BACKWARD_METHODS


# -- DDP --------------------------------------------------------------------------------------------
class DiffusionDDPStrategy(DDPStrategy):
    """Lightning's ``DDPStrategy`` with ``find_unused_parameters=None`` meaning *choose from the method*
    (:func:`needs_find_unused_parameters`); ``True``/``False`` force it. Other arguments: ``DDPStrategy``'s
    (``gradient_as_bucket_view``, ``static_graph``, ``process_group_backend``...)."""

    strategy_name = "ddp_diffusion"

    def __init__(self, find_unused_parameters: Optional[bool] = None, **kwargs: Any):
        super().__init__(**kwargs)
        self._find_unused = find_unused_parameters

    def _setup_model(self, model: nn.Module):
        fup = self._find_unused
        if fup is None:
            fup = needs_find_unused_parameters(self.lightning_module)
            log.info("DiffusionDDPStrategy: find_unused_parameters=%s for method %r", fup,
                     getattr(self.lightning_module, "method", "?"))
        self._ddp_kwargs["find_unused_parameters"] = fup
        return super()._setup_model(model)


def ddp_strategy(find_unused_parameters: Optional[bool] = None, **kwargs: Any) -> DiffusionDDPStrategy:
    """``Trainer(strategy=ddp_strategy())``: see :class:`DiffusionDDPStrategy`."""
    return DiffusionDDPStrategy(find_unused_parameters=find_unused_parameters, **kwargs)


# -- FSDP -------------------------------------------------------------------------------------------
class _RootClipFSDPPrecision(FSDPPrecision):
    """Lightning's FSDP precision plugin, with gradient clipping by norm through the FSDP root that holds
    the optimizer's parameters (``FullyShardedDataParallel.clip_grad_norm_``: the global norm of the
    sharded gradients, all-reduced over ranks)."""

    _fsdp_roots: Sequence[nn.Module] = ()

    def clip_grad_by_norm(self, optimizer, clip_val: Union[int, float]) -> None:
        params = {id(p) for group in optimizer.param_groups for p in group["params"]}
        owners = [root for root in self._fsdp_roots if params & {id(p) for p in root.parameters()}]
        if len(owners) != 1 or not params <= {id(p) for p in owners[0].parameters()}:
            raise ValueError(
                f"gradient clipping by norm under DiffusionFSDPStrategy needs all of an optimizer's parameters in "
                f"one FSDP-wrapped network; this optimizer's span {len(owners)} of them. Clip by value, or use DDP.")
        owners[0].clip_grad_norm_(clip_val)


class DiffusionFSDPStrategy(FSDPStrategy):
    """FSDP for TeacherRL / OPDStudent: each trained ``DiffusionModel.net`` becomes a root FSDP module with
    one unit per diffusers block (see the module docstring for why not the whole LightningModule).

    Args:
        block_classes: class names (or classes) of the blocks to shard one by one; default
            :data:`DEFAULT_BLOCK_CLASS_NAMES` (those found in the net). None found: ValueError.
        frozen: ``"replicate"`` (default: frozen ``DiffusionModel`` submodules such as TeacherRL's reference
            copy stay whole on every rank) or ``"shard"`` (they become forward-only FSDP roots too).
        activation_checkpointing: checkpoint every block (``torch.distributed`` checkpoint wrapper,
            non-reentrant). Do not combine with the methods' own ``gradient_checkpointing=True``.
        sharding_strategy: ``"FULL_SHARD"``, ``"SHARD_GRAD_OP"``, ``"NO_SHARD"``, ``"HYBRID_SHARD"``.
        **kwargs: Lightning ``FSDPStrategy`` arguments (``mixed_precision``, ``cpu_offload``,
            ``state_dict_type``, ``process_group_backend``...) and FSDP keyword arguments.

    On a CPU accelerator it runs FSDP over gloo (``device_id=cpu``): for tests only.
    """

    strategy_name = "fsdp_diffusion"

    def __init__(self, block_classes: Optional[list[str]] = None, frozen: FrozenRule = "replicate",
                 activation_checkpointing: bool = False, sharding_strategy: str = "FULL_SHARD", **kwargs: Any):
        if frozen not in ("replicate", "shard"):
            raise ValueError(f"frozen={frozen!r}: choose 'replicate' (frozen copies whole on every rank) or 'shard'")
        for key in ("auto_wrap_policy", "activation_checkpointing_policy"):
            if kwargs.get(key) is not None:
                raise ValueError(f"{key}: DiffusionFSDPStrategy builds it from block_classes (the diffusers block "
                                 "classes of each trained network); pass block_classes instead")
        super().__init__(sharding_strategy=sharding_strategy, **kwargs)
        self.block_classes = None if block_classes is None else list(block_classes)
        self.frozen, self.activation_checkpointing_blocks = frozen, bool(activation_checkpointing)
        self.fsdp_roots: list[nn.Module] = []

    # the precision plugin is chosen by the Trainer; give it the root-aware norm clipping
    @property
    def precision_plugin(self):
        return super().precision_plugin

    @precision_plugin.setter
    def precision_plugin(self, plugin) -> None:
        if isinstance(plugin, FSDPPrecision) and not isinstance(plugin, _RootClipFSDPPrecision):
            plugin.__class__ = _RootClipFSDPPrecision  # same state, one method more
        self._precision_plugin = plugin

    def _wrap(self, net: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        classes = fsdp_block_classes(net, self.block_classes)
        device_id = self.root_device if self.root_device.type == "cpu" else self.root_device.index
        wrapped = FullyShardedDataParallel(
            net, auto_wrap_policy=ModuleWrapPolicy(classes), cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config, sharding_strategy=self.sharding_strategy,
            device_id=device_id, **self.kwargs)
        if self.activation_checkpointing_blocks:
            import functools

            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
                CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)

            apply_activation_checkpointing(
                wrapped, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
                check_fn=lambda m: isinstance(m, tuple(classes)))
        return wrapped

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            raise ValueError("the module already contains FSDP-wrapped parts: DiffusionFSDPStrategy wraps the "
                             "trained networks itself (pass an unwrapped module)")
        targets = check_fsdp_supported(model, self.frozen, self.activation_checkpointing_blocks)
        if self.root_device.type == "cpu":
            log.info("DiffusionFSDPStrategy on CPU (gloo): for tests only")
        self.fsdp_roots = []
        for name, diffusion_model in targets:
            diffusion_model.net = self._wrap(diffusion_model.net)
            self.fsdp_roots.append(diffusion_model.net)
            log.info("DiffusionFSDPStrategy: sharded %s.net (%s)", name, type(diffusion_model.net.module).__name__)
        model.to(self.root_device)  # the rest (frozen copies, text encoders, buffers) is replicated
        if isinstance(self.precision_plugin, _RootClipFSDPPrecision):
            self.precision_plugin._fsdp_roots = self.fsdp_roots
        return model


def check_fsdp_supported(module: nn.Module, frozen: FrozenRule = "replicate",
                         activation_checkpointing: bool = False) -> list[tuple[str, nn.Module]]:
    """The ``(name, DiffusionModel)`` whose nets :class:`DiffusionFSDPStrategy` shards (the trained ones, plus
    the frozen ones when ``frozen="shard"``), or a ValueError saying why ``module`` cannot be sharded: an EMA
    of the trained weights, trainable parameters outside a ``DiffusionModel.net``, nothing trainable, or
    block checkpointing on top of the method's own ``gradient_checkpointing``."""
    from .models.ema import EMA

    name = type(module).__name__
    emas = [n for n, m in module.named_modules() if isinstance(m, EMA)]
    if emas:
        raise ValueError(
            f"{name} keeps an EMA of its trained weights ({emas[0]!r}), which reads the full parameters after "
            "every update; DiffusionFSDPStrategy holds them sharded. Train it with DDP "
            "(configs/strategies/ddp.yaml); FSDP is for TeacherRL and OPDStudent.")
    targets = trained_networks(module)
    if not targets:
        raise ValueError(f"{name} has no DiffusionModel with trainable parameters: nothing for FSDP to shard")
    covered = {id(p) for _, m in targets for p in m.net.parameters()}
    loose = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in covered]
    if loose:
        raise ValueError(
            f"{name} trains parameters outside any DiffusionModel.net ({loose[:3]}...); DiffusionFSDPStrategy "
            "shards only the denoisers and would leave their gradients unsynchronised. Use DDP.")
    if activation_checkpointing and getattr(module, "gradient_checkpointing", False):
        raise ValueError("activation_checkpointing=True and the method's gradient_checkpointing=True would "
                         "checkpoint every block twice: keep one of them")
    if frozen not in ("replicate", "shard"):
        raise ValueError(f"frozen={frozen!r}: choose 'replicate' or 'shard'")
    return targets + (frozen_networks(module) if frozen == "shard" else [])


def fsdp_strategy(block_classes: Optional[Sequence[Union[str, type]]] = None, frozen: FrozenRule = "replicate",
                  activation_checkpointing: bool = False, sharding_strategy: str = "FULL_SHARD",
                  **kwargs: Any) -> DiffusionFSDPStrategy:
    """``Trainer(strategy=fsdp_strategy(), precision="bf16-mixed")``: see :class:`DiffusionFSDPStrategy`.

    ``block_classes`` may be classes or class names. The wrap policy is a ``ModuleWrapPolicy`` of the block
    classes found in each trained network (:func:`fsdp_block_classes`); with ``activation_checkpointing``
    the same classes are checkpointed."""
    names = None if block_classes is None else [c if isinstance(c, str) else c.__name__ for c in block_classes]
    return DiffusionFSDPStrategy(block_classes=names, frozen=frozen, activation_checkpointing=activation_checkpointing,
                                 sharding_strategy=sharding_strategy, **kwargs)


def _register() -> None:
    for name, cls, description in (
            ("ddp_diffusion", DiffusionDDPStrategy, "DDP; find_unused_parameters chosen from the lit_distill method"),
            ("fsdp_diffusion", DiffusionFSDPStrategy, "FSDP of the trained diffusers denoisers, block by block")):
        if name not in StrategyRegistry:
            StrategyRegistry.register(name, cls, description=description)


_register()

__all__ = ["DEFAULT_BLOCK_CLASS_NAMES", "DiffusionDDPStrategy", "DiffusionFSDPStrategy", "check_fsdp_supported",
           "ddp_strategy", "fsdp_strategy",
           "fsdp_block_classes", "frozen_networks", "needs_find_unused_parameters", "trained_networks"]

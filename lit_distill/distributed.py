"""Multi-GPU training of the lit_distill methods: DDP and FSDP strategies for Lightning 2.6.

Two strategies, usable from Python or as ``--trainer.strategy`` in a LightningCLI config
(``configs/strategies/ddp.yaml``, ``configs/strategies/fsdp.yaml``; docs/scaling.md):

:class:`DiffusionDDPStrategy` (``ddp_strategy()``)
    Lightning's DDP with ``find_unused_parameters`` chosen from the method's class hint when left ``None``
    (``lit_distill.protocols.DistributedHints``): the one-step methods (DisBack, NoDistillOneStep) update two
    networks in turn, so each backward uses only
    one of them and DDP must look for unused parameters; TeacherRL, OPDStudent and DiffusionPretrain use
    every trained parameter in every backward and run without the search. Manual optimisation is correct
    under DDP: Lightning's ``manual_backward`` calls the DDP reducer's ``prepare_for_backward`` before
    *each* backward, so the gradients of every minibatch update are all-reduced (TeacherRL and OPD run
    several backward/step pairs per ``training_step``; ``tests/test_distributed.py`` checks that both
    ranks hold the same weights afterwards, and that a plain ``loss.backward()`` would not).

:class:`DiffusionFSDPStrategy` (``fsdp_strategy()``)
    Shards the *trained* denoiser of TeacherRL / OPDStudent with FSDP2 (``torch.distributed.fsdp.fully_shard``)
    on top of Lightning's ``ModelParallelStrategy``. Not Lightning's ``FSDPStrategy`` (FSDP1): it wraps the
    whole LightningModule in one root FSDP unit whose forward is ``training_step``, and a manual backward
    inside that forward trips FSDP1's state machine (docs/scaling.md says what else failed). With FSDP2 each
    trained network
    (``DiffusionModel.net`` of every ``DiffusionModel`` submodule with trainable parameters) is sharded in
    place, one group per diffusers block (:func:`fsdp_block_classes`) plus one for the net: each denoiser
    call gathers what it needs, each ``manual_backward`` reduce-scatters the gradients into sharded
    ``DTensor`` gradients, ``clip_gradients`` is the plain ``clip_grad_norm_`` (the norm of a ``DTensor``
    gradient is global), and checkpoints hold named full states (``torch.distributed.checkpoint``).

The rule for frozen networks (TeacherRL's ``reference`` copy, OPD's teachers, text encoders, VAEs):
they are **replicated**, never sharded, by default: each rank holds a full copy and runs it locally
(no communication in their forwards). OPD's teachers live in a plain dict, not as submodules, and are
always replicated; TeacherRL's reference copy is a submodule, and ``frozen="shard"`` shards it (and any
other frozen ``DiffusionModel`` submodule's net) too, for models whose frozen copy does not fit on one GPU.
Frozen copies are never trained, so they need no gradient synchronisation.

What FSDP does not cover, with a clear error at setup: modules that keep an EMA of the trained weights
(DiffusionPretrain, DisBack, NoDistillOneStep: the EMA reads the full parameters after every update,
which FSDP holds sharded) and trainable parameters outside a ``DiffusionModel.net`` (e.g. a classifier
head, whose gradients nothing would synchronise). Use DDP for those. After ``fit`` the trained nets stay
sharded: export from a checkpoint (one file with the full state by default), loaded on one device.
"""
from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, Iterable, Literal, Optional, Sequence, Union

import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, StrategyRegistry
from torch import nn
from torch.distributed.constants import default_pg_timeout

from .lightning_internals import model_parallel_setup, set_ddp_find_unused_parameters, set_model_parallel_sizes
from .models.compilation import REPEATED_BLOCK_CLASS_NAMES, drop_compiled, is_compiled
from .protocols import DistributedHints

log = logging.getLogger(__name__)

#: Class names of the diffusers blocks that become one FSDP unit each (and, with
#: ``activation_checkpointing=True``, one checkpointed region each), in every trained network that has them: the
#: repeated blocks that regional compilation compiles one by one too.
DEFAULT_BLOCK_CLASS_NAMES: tuple[str, ...] = REPEATED_BLOCK_CLASS_NAMES

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
    """The module class's ``ddp_find_unused_parameters`` hint (``lit_distill.protocols.DistributedHints``): True for the
    one-step methods, whose backward passes each use one of the two trained networks; False without a hint."""
    return isinstance(module, DistributedHints) and bool(type(module).ddp_find_unused_parameters)


# -- DDP --------------------------------------------------------------------------------------------
class DiffusionDDPStrategy(DDPStrategy):
    """Lightning's ``DDPStrategy`` with ``find_unused_parameters=None`` meaning *choose from the method*
    (:func:`needs_find_unused_parameters`); ``True``/``False`` force it. Other arguments: ``DDPStrategy``'s
    (``gradient_as_bucket_view``, ``static_graph``, ``process_group_backend``...)."""

    strategy_name = "ddp_diffusion"

    def __init__(self, find_unused_parameters: Optional[bool] = None, **kwargs: Any):
        super().__init__(**kwargs)
        self._find_unused = find_unused_parameters

    def setup(self, trainer) -> None:
        fup = self._find_unused
        if fup is None:
            fup = needs_find_unused_parameters(self.lightning_module)
            log.info("DiffusionDDPStrategy: find_unused_parameters=%s for %s", fup, type(self.lightning_module).__name__)
        set_ddp_find_unused_parameters(self, fup)  # read when the module is wrapped, in super().setup
        super().setup(trainer)


def ddp_strategy(find_unused_parameters: Optional[bool] = None, **kwargs: Any) -> DiffusionDDPStrategy:
    """``Trainer(strategy=ddp_strategy())``: see :class:`DiffusionDDPStrategy`."""
    return DiffusionDDPStrategy(find_unused_parameters=find_unused_parameters, **kwargs)


# -- FSDP -------------------------------------------------------------------------------------------
def _broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (``fully_shard`` does not; DDP does)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=src)


class DiffusionFSDPStrategy(ModelParallelStrategy):
    """FSDP (``torch.distributed.fsdp.fully_shard``, FSDP2) of the trained denoisers of TeacherRL / OPDStudent.

    Each trained ``DiffusionModel.net`` is sharded with one ``fully_shard`` group per diffusers block
    (:func:`fsdp_block_classes`) plus one for the rest of the net; the LightningModule itself is not
    wrapped (see the module docstring for why). Frozen copies are replicated unless ``frozen="shard"``.

    Args:
        block_classes: class names (or classes) of the blocks to shard one by one; default
            :data:`DEFAULT_BLOCK_CLASS_NAMES` (those found in the net). None found: ValueError.
        frozen: ``"replicate"`` (default: frozen ``DiffusionModel`` submodules such as TeacherRL's reference
            copy stay whole on every rank) or ``"shard"`` (they are sharded too and gathered per forward).
        activation_checkpointing: checkpoint every block (``torch.distributed`` checkpoint wrapper,
            non-reentrant). Do not combine with the methods' own ``gradient_checkpointing=True``.
        reshard_after_forward: free the gathered parameters of a block after its forward (ZeRO-3, default)
            or keep them until the backward (ZeRO-2: more memory, less communication).
        save_distributed_checkpoint: ``False`` (default): checkpoints are one file with the full state,
            written by rank 0, loadable on any number of devices (``TeacherRL.load_from_checkpoint`` on one
            GPU included). ``True``: a directory with each rank's shards (torch.distributed.checkpoint).
        process_group_backend, timeout: as in Lightning's ``ModelParallelStrategy``.

    With ``precision="bf16-mixed"`` the parameters are gathered in bf16 and the gradients reduced in float32
    (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``); inputs are not cast (Lightning's autocast
    casts op by op, as on one GPU; a cast would round the float timesteps of flow models).
    Every rank must call the sharded networks together: evaluation code that samples on rank 0 only hangs.
    """

    strategy_name = "fsdp_diffusion"

    def __init__(self, block_classes: Optional[list[str]] = None, frozen: FrozenRule = "replicate",
                 activation_checkpointing: bool = False, reshard_after_forward: bool = True,
                 save_distributed_checkpoint: bool = False, process_group_backend: Optional[str] = None,
                 timeout: Optional[timedelta] = default_pg_timeout):
        if frozen not in ("replicate", "shard"):
            raise ValueError(f"frozen={frozen!r}: choose 'replicate' (frozen copies whole on every rank) or 'shard'")
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        self.block_classes = None if block_classes is None else [c if isinstance(c, str) else c.__name__
                                                                  for c in block_classes]
        self.frozen, self.activation_checkpointing_blocks = frozen, bool(activation_checkpointing)
        self.reshard_after_forward = bool(reshard_after_forward)
        self.sharded: list[str] = []

    def setup_environment(self) -> None:
        # FSDP only: every process is one data-parallel rank
        set_model_parallel_sizes(self, data_parallel=self.num_nodes * self.num_processes, tensor_parallel=1)
        super().setup_environment()

    def _mixed_precision_policy(self):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if getattr(self.precision_plugin, "precision", "32-true") == "bf16-mixed":
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                        cast_forward_inputs=False)
        return MixedPrecisionPolicy(cast_forward_inputs=False)

    def _shard(self, net: nn.Module) -> None:
        from torch.distributed.fsdp import fully_shard

        if is_compiled(net):  # compiled blocks under FSDP2's hooks have not been measured: run them eager
            log.warning("DiffusionFSDPStrategy: the method's runtime.compile is not applied to the sharded %s "
                        "(runs eager)", type(net).__name__)
            drop_compiled(net)
        classes = tuple(fsdp_block_classes(net, self.block_classes))
        if self.activation_checkpointing_blocks:
            import functools

            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
                CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)

            apply_activation_checkpointing(
                net, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
                check_fn=lambda m: isinstance(m, classes))
        kwargs = dict(mesh=self.device_mesh["data_parallel"], mp_policy=self._mixed_precision_policy(),
                      reshard_after_forward=self.reshard_after_forward)
        # bottom-up: descendants before ancestors (reverse pre-order), the whole net last
        for module in reversed(list(net.modules())):
            if module is not net and isinstance(module, classes):
                fully_shard(module, **kwargs)
        fully_shard(net, **kwargs)

    def setup(self, trainer) -> None:
        assert self.model is not None and self.accelerator is not None
        targets = check_fsdp_supported(self.model, self.frozen, self.activation_checkpointing_blocks)

        def shard_trained_networks() -> None:
            _broadcast_module(self.model)  # the same starting weights everywhere, as DDP guarantees
            if self.root_device.type == "cpu":
                log.info("DiffusionFSDPStrategy on CPU (gloo): for tests only")
            self.sharded = []
            for name, diffusion_model in targets:
                self._shard(diffusion_model.net)
                self.sharded.append(f"{name}.net" if name else "net")
            log.info("DiffusionFSDPStrategy: sharded %s", ", ".join(self.sharded))

        model_parallel_setup(self, trainer, shard_trained_networks)


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
    if activation_checkpointing and any(getattr(m.net, "is_gradient_checkpointing", False) for _, m in targets):
        raise ValueError("activation_checkpointing=True and the method's gradient_checkpointing=True would "
                         "checkpoint every block twice: keep one of them")
    if frozen not in ("replicate", "shard"):
        raise ValueError(f"frozen={frozen!r}: choose 'replicate' or 'shard'")
    return targets + (frozen_networks(module) if frozen == "shard" else [])


def fsdp_strategy(block_classes: Optional[Sequence[Union[str, type]]] = None, frozen: FrozenRule = "replicate",
                  activation_checkpointing: bool = False, **kwargs: Any) -> DiffusionFSDPStrategy:
    """``Trainer(strategy=fsdp_strategy(), precision="bf16-mixed")``: see :class:`DiffusionFSDPStrategy`
    (``block_classes`` may be classes or class names; ``kwargs``: its other arguments)."""
    return DiffusionFSDPStrategy(block_classes=block_classes, frozen=frozen,
                                 activation_checkpointing=activation_checkpointing, **kwargs)


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

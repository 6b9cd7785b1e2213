"""``torch.compile`` of diffusers denoisers: regional (each repeated block), whole-network, and CUDA graphs.

Regional compilation compiles each block of :data:`REPEATED_BLOCK_CLASS_NAMES` in place (``nn.Module.compile``:
parameters, state-dict keys and hooks unchanged). Blocks of one class share their compiled code, so a UNet's
two dozen resnets cost a handful of graphs (one per distinct configuration and shape family) instead of one
graph of the whole network, which is what makes the warm-up short. The same list names FSDP's sharding units
(``lit_distill.distributed``): a block is the unit of both.

The compiler's caches (inductor's FX graphs and kernels, AOTAutograd's) live in one directory
(:func:`use_compile_cache`), so a second process on the same machine loads compiled code instead of compiling.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import nn

#: Class names of the repeated diffusers blocks: regional compilation units and FSDP sharding units.
REPEATED_BLOCK_CLASS_NAMES: tuple[str, ...] = (
    "BasicTransformerBlock",       # UNet2DConditionModel (SD 1.x/2.x/XL) cross-attention blocks, PixArt, DiT
    "ResnetBlock2D",               # UNet2DModel / UNet2DConditionModel resnets
    "JointTransformerBlock",       # SD3 / SD3.5 MMDiT blocks
    "FluxTransformerBlock",        # FLUX double-stream blocks
    "FluxSingleTransformerBlock",  # FLUX single-stream blocks
)
COMPILED_MODES = ("regional", "full")
#: compiled graphs kept per code object before dynamo falls back to eager: blocks of one class share their code,
#: and training, no-grad rollouts and eval mode each need graphs of their own
RECOMPILE_LIMIT = 64


def repeated_blocks(net: nn.Module, class_names: Optional[Iterable[str]] = None) -> list[nn.Module]:
    """The submodules of ``net`` whose class name is one of ``class_names`` (default
    :data:`REPEATED_BLOCK_CLASS_NAMES`), outermost first; a block inside another one is not listed."""
    wanted = set(REPEATED_BLOCK_CLASS_NAMES if class_names is None else class_names)
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in net.modules():
        if id(module) in inside:
            continue
        if type(module).__name__ in wanted:
            found.append(module)
            inside.update(id(m) for m in module.modules())
    return found


def compile_network(net: nn.Module, mode: str, class_names: Optional[Iterable[str]] = None, **compile_kwargs) -> int:
    """Compile ``net`` in place: ``mode="regional"`` each of its :func:`repeated_blocks`, ``"full"`` the whole
    network. Returns the number of compiled regions; a network without any repeated block is a ValueError naming
    the classes it has (pass ``class_names``, or use ``"full"``). ``compile_kwargs`` go to ``torch.compile``."""
    if mode == "full":
        net.compile(**compile_kwargs)
        return 1
    if mode != "regional":
        raise ValueError(f"compile mode {mode!r}: choose one of {list(COMPILED_MODES)}")
    blocks = repeated_blocks(net, class_names)
    if not blocks:
        classes = sorted({type(m).__name__ for m in net.modules()})
        raise ValueError(f"regional compilation: no block of {sorted(class_names or REPEATED_BLOCK_CLASS_NAMES)} "
                         f"in {type(net).__name__} (its module classes: {classes[:20]}); use compile='full'")
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


def is_compiled(net: nn.Module) -> bool:
    """True if ``net`` or any submodule was compiled in place."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in net.modules())


def drop_compiled(module: nn.Module) -> nn.Module:
    """Remove in-place compilation from ``module`` and its submodules (returns it). A deep copy of a compiled module
    keeps a compiled function bound to the *original* module, so a copy must drop it before it runs."""
    for m in module.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    return module


def compile_cache_dir(directory: Optional[str | os.PathLike] = None) -> Path:
    """The compile cache directory :func:`use_compile_cache` uses for ``directory``: itself, else
    ``$TORCHINDUCTOR_CACHE_DIR`` when set, else ``torch_compile`` in the lit_distill cache directory."""
    from ..utils import default_cache_dir

    if directory is None:
        directory = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir() / "torch_compile"
    return Path(directory).expanduser().resolve()


def use_compile_cache(directory: Optional[str | os.PathLike] = None) -> Path:
    """Point the compiler's on-disk caches at :func:`compile_cache_dir` of ``directory`` and make sure the FX-graph
    and AOTAutograd caches are on, for the compilations started afterwards in this process. Returns the directory."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    path = compile_cache_dir(directory)
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return path


def cuda_graph_denoiser(denoiser: Callable) -> Callable:
    """``denoiser`` compiled with ``mode="reduce-overhead"`` (CUDA graphs) for no-grad calls of fixed shapes, e.g.
    the steps of a rollout; it shares the denoiser's parameters, so in-place optimiser updates are seen by the next
    replay. Call :func:`new_graph_step` before each call whose earlier outputs are no longer needed."""
    return torch.compile(denoiser, mode="reduce-overhead", dynamic=False)


def new_graph_step() -> None:
    """Tell CUDA-graph trees that a new call begins (outputs of the previous replay may be overwritten)."""
    torch.compiler.cudagraph_mark_step_begin()

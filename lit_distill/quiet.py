"""Silence the third-party messages that every ``lit-distill`` run would otherwise repeat at every stage.

Called by the command line (``fit`` and the other subcommands, ``quickstart``), never on import, so code that
imports lit_distill keeps every warning. Each filter matches one message; where the cause was ours it was fixed
instead: ``RewardCallback`` passes ``weights_only`` when it saves, and ``PromptDataModule`` offers no
``val_dataloader`` that no method would run.
"""
from __future__ import annotations

import logging
import warnings


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_third_party() -> None:
    """Install the filters (idempotent)."""
    # Lightning advertises its cloud logger and checkpoint registry on every Trainer that uses neither.
    tip = _DropMessages("💡 Tip: For seamless cloud")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(tip)
    # Lightning's own pytree helper builds torch's deprecated LeafSpec (torch >= 2.10); nothing to change on our side.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")
    # Frozen teachers, reference copies, rewards and text encoders are in eval mode on purpose (dropout and
    # the like stay off in networks that are not trained); Lightning counts them at the start of every fit.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training",
                            module=r"lightning\.pytorch\.loops\.fit_loop")
    # ImageDataModule holds out a validation split for DiffusionPretrain's validation_step; the one-step methods
    # train on the same data module and have no validation step, so Lightning skips that loop (as it should).
    warnings.filterwarnings("ignore", message=r"You passed in a `val_dataloader` but have no `validation_step`",
                            module=r"lightning\.pytorch\.trainer\.configuration_validator")
    # diffusers and transformers draw a progress bar for every model they save or load (a few ms each here).
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()

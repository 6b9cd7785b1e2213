"""What ``lit-distill fit`` prints when a run ends: its last evaluation, and where its metrics, checkpoints,
grids and exported model went."""
from __future__ import annotations

from pathlib import Path

import lightning as L

from .callbacks import DurableCheckpoint, ExportCallback, FIDCallback, RewardCallback


def evaluation_lines(trainer: L.Trainer) -> list[tuple[str, str]]:
    """``("evaluation", result)`` for the last result of each evaluation callback, else ``("last metrics", ...)``."""
    lines = []
    for callback in trainer.callbacks:
        if isinstance(callback, RewardCallback) and callback.history:
            last = callback.history[-1]
            tasks = ", ".join(f"{k} {v:.3f}" for k, v in last.items() if k not in ("step", "reward"))
            lines.append(("evaluation", f"reward {last['reward']:.3f} (mean over tasks: {tasks}) at step {last['step']}"))
        elif isinstance(callback, FIDCallback) and callback.history:
            last = callback.history[-1]
            lines.append(("evaluation", f"{callback.name} {last[callback.name]:.3f} (lower is better) after "
                                        f"{last['generator_updates']} generator updates, step {last['step']}"))
    if not lines:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        if metrics:
            lines = [("last metrics", ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())))]
    return lines


def output_lines(trainer: L.Trainer) -> list[tuple[str, str]]:
    """``(what, where)`` for every output of the run: logs, checkpoints, grids, exported models."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    out = []
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            out.append(("metrics (CSV)", str(Path(logger.log_dir) / "metrics.csv")))
        elif isinstance(logger, TensorBoardLogger):
            out.append(("TensorBoard", f"{logger.log_dir}  (tensorboard --logdir {logger.save_dir})"))
        else:
            out.append((type(logger).__name__, str(getattr(logger, "log_dir", None) or logger.save_dir)))
    for checkpoint in trainer.checkpoint_callbacks:
        path = checkpoint.last_model_path or checkpoint.best_model_path
        if path:
            resume = "last" if isinstance(checkpoint, DurableCheckpoint) else path
            out.append(("checkpoint", f"{path}  (resume with --ckpt_path {resume})"))
    for callback in trainer.callbacks:
        if isinstance(callback, RewardCallback) and callback.history:
            root = callback.output_dir or Path(trainer.log_dir or trainer.default_root_dir) / "reward_eval"
            out.append(("grids", f"{root}/step_*.png"))
            if callback.save_best:
                out.append(("best checkpoint", str(root / "best.ckpt")))
        elif isinstance(callback, ExportCallback):
            out.append(("exported model", f"{callback.dirpath}  (a model: source for the next stage)"))
    return out


def fit_report(trainer: L.Trainer, seconds: float) -> str:
    """The lines printed after ``fit``."""
    lines = [f"[lit-distill] fit ended at step {trainer.global_step} after {seconds / 60:.1f} min"]
    lines += [f"  {what + ':':<16} {where}" for what, where in evaluation_lines(trainer) + output_lines(trainer)]
    return "\n".join(lines)

"""Lightning callbacks: evaluation, export, durable checkpoints and the progress bar during training."""
from .checkpoint import AtomicCheckpointIO, DurableCheckpoint
from .export import ExportCallback
from .fid import ClassifierFeatures, FIDCallback, InceptionFeatures
from .progress import StepProgressBar
from .reward import RewardCallback

__all__ = ["AtomicCheckpointIO", "ClassifierFeatures", "DurableCheckpoint", "ExportCallback", "FIDCallback",
           "InceptionFeatures", "RewardCallback", "StepProgressBar"]

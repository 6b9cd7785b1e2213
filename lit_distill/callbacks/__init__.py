"""Lightning callbacks: evaluation, export, durable checkpoints, the progress bar and the training clock."""
from .checkpoint import AtomicCheckpointIO, DurableCheckpoint
from .export import ExportCallback
from .fid import ClassifierFeatures, FIDCallback, InceptionFeatures
from .progress import StepProgressBar
from .reward import RewardCallback
from .timing import TrainingClock

__all__ = ["AtomicCheckpointIO", "ClassifierFeatures", "DurableCheckpoint", "ExportCallback", "FIDCallback",
           "InceptionFeatures", "RewardCallback", "StepProgressBar", "TrainingClock"]

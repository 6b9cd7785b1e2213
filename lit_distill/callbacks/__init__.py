"""Lightning callbacks: evaluation, export and durable checkpoints during training."""
from .checkpoint import AtomicCheckpointIO, DurableCheckpoint
from .export import ExportCallback
from .fid import ClassifierFeatures, FIDCallback, InceptionFeatures
from .reward import RewardCallback

__all__ = ["AtomicCheckpointIO", "ClassifierFeatures", "DurableCheckpoint", "ExportCallback", "FIDCallback",
           "InceptionFeatures", "RewardCallback"]

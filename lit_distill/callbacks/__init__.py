"""Lightning callbacks: evaluation and export during training."""
from .export import ExportCallback
from .fid import ClassifierFeatures, FIDCallback, InceptionFeatures
from .reward import RewardCallback

__all__ = ["ClassifierFeatures", "ExportCallback", "FIDCallback", "InceptionFeatures", "RewardCallback"]

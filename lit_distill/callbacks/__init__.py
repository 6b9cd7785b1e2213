"""Lightning callbacks: evaluation during training."""
from .fid import ClassifierFeatures, FIDCallback, InceptionFeatures

__all__ = ["ClassifierFeatures", "FIDCallback", "InceptionFeatures"]

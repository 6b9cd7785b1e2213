"""Evaluation metrics: the Fréchet distance and its feature-statistics accumulator."""
from .frechet import FeatureStats, frechet_distance

__all__ = ["FeatureStats", "frechet_distance"]

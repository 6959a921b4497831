"""Built-in datasets (registered in ``super_trainer.registry.DATASETS``); all work offline."""
from .digits import Digits
from .synthetic import SyntheticClassification, synthetic_loaders

__all__ = ["Digits", "SyntheticClassification", "synthetic_loaders"]

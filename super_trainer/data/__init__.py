"""Built-in datasets (registered in ``super_trainer.registry.DATASETS``); all work offline."""
from .synthetic import SyntheticClassification, synthetic_loaders

__all__ = ["SyntheticClassification", "synthetic_loaders"]

"""Built-in models (registered in ``super_trainer.registry.MODELS``)."""
from .mlp import MLP

__all__ = ["MLP"]

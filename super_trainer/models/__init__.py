"""Built-in models (registered in ``super_trainer.registry.MODELS``)."""
from .cnn import SmallCNN, SmallResNet
from .mlp import MLP

__all__ = ["MLP", "SmallCNN", "SmallResNet"]

"""leantrain: train and fine-tune neural networks within a memory budget."""
from __future__ import annotations

from .config import TrainConfig

__version__ = "0.1.0"
__all__ = ["TrainConfig", "train", "__version__"]


def train(cfg: TrainConfig):
    """Run a training job (the same function ``leantrain train`` calls). Returns the final metrics dict."""
    from .train import train as _train

    return _train(cfg)

"""leantrain: train and fine-tune neural networks within a memory budget."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import TrainConfig

from .quiet import quiet_library_logs

quiet_library_logs()

__version__ = "0.1.0"
__all__ = ["TrainConfig", "__version__", "train"]


def __getattr__(name: str) -> Any:
    """``TrainConfig`` resolves on first use, so ``import leantrain.optim`` (or any other layer) does not load the
    run config."""
    if name == "TrainConfig":
        from .config import TrainConfig

        return TrainConfig
    raise AttributeError(f"module 'leantrain' has no attribute {name!r}")


def train(cfg: TrainConfig, verbose: bool = True):
    """Run a training job (the same function ``leantrain train`` calls): prints the data line and the summary the
    CLI prints (``verbose=False``: nothing) and returns the final metrics dict."""
    from .train import train as _train

    return _train(cfg, verbose=verbose)

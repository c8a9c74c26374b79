"""Import-time chatter of optional peers that is not the user's business: torchao's "Failed to load ..._C_mxfp8"
lines for CUDA kernels a CPU build lacks, and torch's pytree deprecation warnings that torchao's import triggers
(transformers imports torchao when it is installed, e.g. with the ``bench`` extra).

Applied when leantrain is imported (the CLI and the Python API alike). Only loggers the user has not configured
(level NOTSET) are raised to ERROR; ``LEANTRAIN_VERBOSE=1`` keeps everything.
"""
from __future__ import annotations

import logging
import os

QUIET_LOGGERS = ("torchao", "torchao.kernel.intmm", "torch.utils._pytree")


def quiet_library_logs() -> None:
    if os.environ.get("LEANTRAIN_VERBOSE"):
        return
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.ERROR)

"""``python -m leantrain.experiments SPEC RESULT``: one isolated run of the experiment engine."""
from __future__ import annotations

import sys

from .engine import child_main

if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))

"""Byte sizes as users write them (``8GiB``, ``22G``, ``500MiB``, ``8GB``): bottom layer, no imports."""
from __future__ import annotations

import re

UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
         "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}


def parse_size(text: str, option: str = "--memory-budget") -> int:
    """``8GiB``, ``8G`` (binary), ``8GB`` (decimal), ``512MiB``, ``1e9`` or plain bytes -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not match or match.group(2) not in UNITS:
        raise ValueError(f"{option} {text!r}: give a size like 8GiB, 22G, 500MiB, or 'auto'")
    return int(float(match.group(1)) * UNITS[match.group(2)])

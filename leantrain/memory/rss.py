"""The process's own peak resident set size, the figure ``metrics.json`` reports as ``peak_rss_bytes``.

``getrusage(RUSAGE_SELF).ru_maxrss`` is not it on Linux: the kernel carries the parent's high-water mark into a
child across fork and exec, so a run started from a 1 GiB process (a test session, a notebook) reports at least
1 GiB however little it used. ``VmHWM`` in ``/proc/self/status`` belongs to the address space created by exec, so
it counts this program only. Elsewhere ``ru_maxrss`` is used (kilobytes, but bytes on macOS).
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path

STATUS = Path("/proc/self/status")


def peak_rss_bytes() -> int:
    """Peak RSS of this process since it started (exec), in bytes."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _status_kib(field: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None

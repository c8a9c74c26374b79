"""``peak_rss_bytes`` is the process's own peak: a child started from a large parent does not inherit the parent's
high-water mark (Linux's ``ru_maxrss`` does), and memory the process itself touches is counted."""
from __future__ import annotations

import subprocess
import sys

import pytest

from leantrain.memory.rss import peak_rss_bytes

MIB = 2**20
CHILD = """
import sys
from leantrain.memory.rss import peak_rss_bytes
touched = bytearray(int(sys.argv[1]) * 2**20)
for i in range(0, len(touched), 4096):
    touched[i] = 1
print(peak_rss_bytes())
"""


def _child_peak(touch_mib: int) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, str(touch_mib)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def _touch(nbytes: int) -> bytearray:
    block = bytearray(nbytes)
    for i in range(0, nbytes, 4096):
        block[i] = 1
    return block


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the inherited high-water mark is Linux's")
def test_a_child_of_a_large_process_reports_its_own_peak():
    held = _touch(peak_rss_bytes() + 768 * MIB)  # the parent is now well above anything a small child touches
    try:
        small = _child_peak(1)
    finally:
        del held
    assert small < 256 * MIB, small / MIB


def test_memory_the_process_touches_is_counted():
    small, large = _child_peak(1), _child_peak(300)
    assert large - small >= 290 * MIB, (small / MIB, large / MIB)

"""``--return-freed-memory``: freed tensor memory leaves the process at once (glibc), and the run applies it."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt thresholds are glibc's")

# Free every other 1 MiB tensor of 200: glibc's default keeps the holes resident (its mmap threshold has risen
# to 16 MiB after the first free), with the thresholds fixed each block was mapped on its own and goes back.
HOLES = textwrap.dedent("""
    import json, sys, torch
    from leantrain import allocator
    if sys.argv[1] == "on":
        assert allocator.return_freed_memory()
    def rss():
        return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) * 1024
    big = torch.ones(4 * 2**20)  # a 16 MiB block, mapped and freed: raises glibc's dynamic threshold
    del big
    blocks = [torch.ones(2**18) for _ in range(200)]  # 1 MiB each, touched
    before = rss()
    del blocks[::2]
    print(json.dumps({"released": before - rss()}))
""")


def _released(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", HOLES, mode], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["released"]


def test_freed_blocks_leave_the_process_only_with_the_thresholds_fixed():
    on, off = _released("on"), _released("off")
    assert on >= 90 * 2**20, f"with return_freed_memory only {on / 2**20:.1f} MiB of 100 freed left the process"
    assert off <= 20 * 2**20, f"glibc's default released {off / 2**20:.1f} MiB: the test no longer shows a difference"


def test_the_run_applies_it_only_when_asked():
    script = textwrap.dedent("""
        import sys
        from leantrain import allocator
        from leantrain.config import TrainConfig
        from leantrain.run import build_run
        cfg = TrainConfig(task="causal-lm", init_weights="scratch", preset="nano", train_size=8, val_size=4,
                          max_length=32, batch_size=2, steps=1, out=sys.argv[2], progress=False,
                          return_freed_memory=sys.argv[1] == "on")
        build_run(cfg)
        print(allocator.applied())
    """)
    for mode, expected in (("on", "True"), ("off", "False")):
        out = subprocess.run([sys.executable, "-c", script, mode, "/tmp/unused"], check=True, capture_output=True,
                             text=True).stdout
        assert out.strip().splitlines()[-1] == expected, mode

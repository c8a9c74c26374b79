"""benchmarks/distributed.py: its traceback reader (fast) and a 2-configuration smoke run (slow, torchrun)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "distributed.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_distributed", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_failure_reason_names_innermost_error_and_leantrain_frame():
    stderr = "\n".join([  # noqa: FLY002
        "W1123 launcher noise",
        "[rank1]: Traceback (most recent call last):",
        '[rank1]:   File "<frozen runpy>", line 198, in _run_module_as_main',
        '[rank1]:   File "/work/main/leantrain/train.py", line 210, in _train',
        '[rank1]:   File "/work/main/leantrain/optim/adam.py", line 172, in _finite',
        "[rank1]:     quick = torch.isfinite(sums).tolist()",
        '[rank1]:   File "/x/site-packages/torch/distributed/tensor/_api.py", line 9, in __torch_dispatch__',
        "[rank1]: RuntimeError: .tolist() is not supported for tensor subclasses, got DTensor",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:",
    ])
    reason = load_bench().failure_reason(stderr)
    assert reason.startswith("RuntimeError: .tolist() is not supported")
    assert "leantrain/optim/adam.py:172 (_finite)" in reason


def test_judge_uses_both_tolerances():
    bench = load_bench()
    assert bench.judge({"max_loss_diff": 1e-7, "max_weight_diff": 1e-5})
    assert not bench.judge({"max_loss_diff": 1e-3, "max_weight_diff": 0.0})
    assert not bench.judge({"max_loss_diff": 0.0, "max_weight_diff": 1e-3})
    assert not bench.judge({"max_loss_diff": None, "max_weight_diff": None})


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process runs on Linux")
def test_quick_matrix_runs(tmp_path):
    bench = load_bench()
    rows = bench.matrix([("lora", "adamw")], ("ddp",), jobs=1)
    assert len(rows) == 1 and rows[0]["works"], rows


AVERAGE_SCRIPT = """
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, {root!r})
from leantrain.dist_utils import average_gradients, local_bytes

dist.init_process_group("gloo")
rank = dist.get_rank()
a = torch.nn.Parameter(torch.zeros(3, 2))
b = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
c = torch.nn.Parameter(torch.zeros(5))  # no gradient: skipped on every rank
a.grad = torch.full((3, 2), float(rank + 1))
b.grad = torch.arange(4, dtype=torch.float64) * (rank + 1)
average_gradients([a, b, c], dist.get_world_size())
assert torch.equal(a.grad, torch.full((3, 2), 1.5)), a.grad
assert torch.equal(b.grad, torch.arange(4, dtype=torch.float64) * 1.5), b.grad
assert c.grad is None
assert local_bytes([a, b, "not a tensor"]) == 6 * 4 + 4 * 8
dist.destroy_process_group()
print("OK", rank)
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process runs on Linux")
def test_average_gradients_two_processes(tmp_path):
    import os
    import subprocess

    script = tmp_path / "avg.py"
    script.write_text(AVERAGE_SCRIPT.format(root=str(BENCH.parents[1])))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], capture_output=True, text=True, check=False, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OK 0" in proc.stdout and "OK 1" in proc.stdout


def test_failure_reason_reads_the_cli_error_line():
    stderr = "W launcher\n[rank0]:W1123 noise\nleantrain: error: --strategy fsdp: no\nChildFailedError:\n"
    assert load_bench().failure_reason(stderr) == "leantrain: error: --strategy fsdp: no"

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


def test_every_row_states_its_tolerance_and_lion_allows_one_sign_flip():
    bench = load_bench()
    assert bench.tolerances("full", "adamw8bit") == (bench.LOSS_TOL, bench.WEIGHT_TOL)
    loss, weight = bench.tolerances("full", "lion8bit")
    assert loss == bench.LOSS_TOL and weight == 2 * bench.LR + bench.WEIGHT_TOL
    assert bench.judge({"max_loss_diff": 0.0, "max_weight_diff": 1.5e-3, "loss_tol": loss, "weight_tol": weight})
    assert not bench.judge({"max_loss_diff": 0.0, "max_weight_diff": 1.5e-3})  # default tolerance: 1e-4


def test_only_items_may_name_their_strategy():
    bench = load_bench()
    configs = bench.parse_configs("full:adamw8bit:fsdp,lora:adamw", ("ddp", "fsdp"))
    assert configs == [("full", "adamw8bit", ("fsdp",)), ("lora", "adamw", ("ddp", "fsdp"))]
    with pytest.raises(SystemExit, match="unknown strategy"):
        bench.parse_configs("full:adamw:zero3", ("ddp",))
    with pytest.raises(SystemExit, match="not method:optim"):
        bench.parse_configs("full", ("ddp",))


def test_table_from_reads_rows_saved_before_nprocs_as_two_process_rows(tmp_path, capsys):
    import json

    old = {"matrix": [{"method": "full", "optim": "adamw", "strategy": "ddp", "works": True, "max_loss_diff": 0.0,
                       "max_weight_diff": 1e-7, "reason": ""}]}
    new = {"matrix": [{"method": "full", "optim": "lion8bit", "strategy": "fsdp", "nproc": 4, "works": False,
                       "max_loss_diff": 0.0, "max_weight_diff": 1.5e-3, "loss_tol": 1e-5, "weight_tol": 2.1e-3,
                       "reason": ""}],
           "state_bytes": [{"method": "full", "optim": "adamw", "model": "m", "nproc": n,
                            "ranks": [{"optimizer_state_bytes_local": 8e6 / n, "param_bytes_local": 4e6 / n,
                                       "sharded_dense": 8e6 / n, "replicated_lowrank_moments": 0,
                                       "replicated_lowrank_bases": 0}] * n} for n in (1, 4)]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    assert load_bench().main(["--table-from", f"{tmp_path / 'old.json'},{tmp_path / 'new.json'}"]) == 0
    out = capsys.readouterr().out
    assert "| full | adamw | ddp | 2 | yes |" in out
    assert "| full | lion8bit | fsdp | 4 | yes | 0.0e+00 | 1.5e-03 | 1.0e-05 / 2.1e-03 |" in out  # re-judged
    assert "| full | adamw | 4 | 2.00 / 2.00 / 2.00 / 2.00 | 0.250 |" in out


def test_state_split_separates_replicated_lowrank_state_from_sharded_state():
    from types import SimpleNamespace

    import torch

    opt = SimpleNamespace(state={
        "dense": {"step": torch.zeros((), dtype=torch.float32), "exp_avg_codes": torch.zeros(100, dtype=torch.int8)},
        "projected": {"proj_basis": torch.zeros(4, 2), "proj_side": 0, "exp_avg": torch.zeros(2, 3)},
    })
    split = load_bench()._state_split(opt)
    assert split == {"sharded_dense": 104, "replicated_lowrank_bases": 32, "replicated_lowrank_moments": 24}


@pytest.mark.slow
def test_state_bytes_worker_assembles_the_run_with_the_trainers_code(capsys):
    """One process, tiny model: the worker imports and uses leantrain.run.build_run / leantrain.loop.Closure."""
    import json

    load_bench().state_bytes_worker("full", "galore-adamw8bit", "tiny")
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("STATE-BYTES "))
    (row,) = json.loads(line.split(" ", 1)[1])
    assert row["world"] == 1 and row["optimizer_state_bytes_local"] > 0
    parts = row["sharded_dense"] + row["replicated_lowrank_moments"] + row["replicated_lowrank_bases"]
    assert parts == row["optimizer_state_bytes_local"]

"""Estimator = trainer at LLaMA-350m / 1b: the estimate of each run beside its measured tensor peak and RSS.

    .venv/bin/python benchmarks/estimator_matrix.py [--sizes 350m,1b] [--dtypes fp32,bf16] [--optim galore-adamw8bit] [--json PATH]
        [--return-freed-memory]

For every size x ``--dtype fp32|bf16`` x ``--layerwise`` on/off x ``--activation-checkpointing`` on/off, one
child process assembles exactly the run ``leantrain train --task causal-lm --init-weights scratch --preset SIZE
--data bible --batch-size 1 --max-length 256 --optim OPTIM --rank R`` would (R: the GaLore paper's rank for the
size) and measures its first two training steps -- the larger peak is the run's: optimizer states are created and
GaLore computes its first bases in step 1, but under ``--layerwise`` all states sit beside all activations only
from step 2 on -- with the CPU profiler's allocation events (``leantrain.memory.measuring.measure_run``: the
exact tensor bytes), and, in a second child without the profiler, the same two steps' peak RSS (``VmHWM``,
building included). Beside them: the estimator's
tensor peak for the same config (``estimate_config`` with the corpus vocabulary) and the pre-flight's process
estimate (that + ``preflight.RUNTIME_BYTES``). Goal (issue 19 item 6): both within +-10 %. ``--return-freed-memory``
runs each child with that flag (glibc hands freed blocks back at once, so RSS follows the tensors).
Run one at a time on a quiet machine: the 1b fp32 rows need ~13 GiB.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GALORE_RANK = {"60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}  # the GaLore paper's ranks
GIB = 2**30


def configs(sizes: list[str], dtypes: tuple[str, ...] = ("fp32", "bf16")) -> list[dict]:
    """Every (size, dtype, layerwise, checkpointing) combination, smallest first."""
    return [{"preset": size, "dtype": dtype, "layerwise": lw, "activation_checkpointing": ckpt}
            for size, dtype, lw, ckpt in itertools.product(sizes, dtypes, (False, True), (False, True))]


def train_config(row: dict, optim: str, out: str, return_freed: bool = False):
    from leantrain.config import TrainConfig

    return TrainConfig(task="causal-lm", init_weights="scratch", method="full", data="bible", batch_size=1,
                       max_length=256, train_size=8, val_size=4, steps=2, optim=optim,
                       rank=GALORE_RANK.get(row["preset"], 128), out=out, progress=False, overwrite=True,
                       return_freed_memory=return_freed, **row)


def child(row: dict, optim: str, out: str, return_freed: bool = False, mode: str = "tensors") -> dict:
    """Measure one config in this process (called in a fresh child). ``tensors``: the profiled tensor peak of the
    first two steps and the estimates. ``rss``: the same two steps without the profiler (whose event records are
    themselves hundreds of MB at 350m), for the process's peak RSS."""
    from leantrain.memory import estimate_config
    from leantrain.memory.measuring import assembled_step, measure_run
    from leantrain.memory.rss import peak_rss_bytes
    from leantrain.preflight import RUNTIME_BYTES

    cfg = train_config(row, optim, out, return_freed)
    if mode == "rss":
        step, _ = assembled_step(cfg)
        step()
        step()
        return {"rss_peak": peak_rss_bytes()}
    measured, run = measure_run(cfg, steps=2)
    report = estimate_config(cfg, vocab_size=int(run.model.config.vocab_size))
    return {**row, "optim": optim, "return_freed_memory": return_freed, "tensor_peak": measured.peak,
            "tensor_estimate": report.total, "rss_estimate": report.total + RUNTIME_BYTES,
            "estimate_terms": {"weights": report.weights, "gradients": report.gradients,
                               "optimizer_states": report.optimizer_states, "activations": report.activations,
                               "workspace": report.optimizer_workspace}}


def _spawn(row: dict, optim: str, tmp: str, return_freed: bool, mode: str) -> dict | str:
    """One child; its result dict, or the last line of its error."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    flag = ["--return-freed-memory"] if return_freed else []
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(row), "--mode", mode, "--optim", optim,
                           "--out", tmp, *flag], check=False, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return f"failed ({mode}): {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_child(row: dict, optim: str, tmp: str, return_freed: bool = False) -> dict:
    """The tensor child, then the RSS child, of one config."""
    result = _spawn(row, optim, tmp, return_freed, "tensors")
    rss = _spawn(row, optim, tmp, return_freed, "rss") if isinstance(result, dict) else None
    for failed in (result, rss):
        if isinstance(failed, str):
            return {**row, "optim": optim, "note": failed}
    result.update(rss)
    result["tensor_ratio"] = round(result["tensor_estimate"] / result["tensor_peak"], 3)
    result["rss_ratio"] = round(result["rss_estimate"] / result["rss_peak"], 3)
    return result


def table(rows: list[dict]) -> str:
    lines = [("| size | dtype | layerwise | ckpt | tensor peak GiB | estimate GiB | est/meas | RSS GiB | "
             "estimate GiB | est/meas |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "note" in r:
            lines.append(f"| {r['preset']} | {r['dtype']} | {r['layerwise']} | {r['activation_checkpointing']} | "
                         f"{r['note']} ||||||")
            continue
        lines.append(f"| {r['preset']} | {r['dtype']} | {'on' if r['layerwise'] else 'off'} | "
                     f"{'on' if r['activation_checkpointing'] else 'off'} | {r['tensor_peak'] / GIB:.2f} | "
                     f"{r['tensor_estimate'] / GIB:.2f} | {r['tensor_ratio']:.3f} | {r['rss_peak'] / GIB:.2f} | "
                     f"{r['rss_estimate'] / GIB:.2f} | {r['rss_ratio']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="350m,1b")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma list (e.g. one dtype per process)")
    ap.add_argument("--optim", default="galore-adamw8bit")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--return-freed-memory", action="store_true", help="run each child with that training flag")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=("tensors", "rss"), default="tensors", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child), args.optim, args.out, args.return_freed_memory, args.mode)))
        return
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for row in configs(args.sizes.split(","), tuple(args.dtypes.split(","))):
            rows.append(run_child(row, args.optim, str(Path(tmp) / "run"), args.return_freed_memory))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "estimate_terms"}), flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()

"""Language-model benchmark: (a) SmolLM2-135M fine-tuning with LoRA / MiSS / SHiRA / GaLore on KJV verses,
(b) tiny-LLaMA pre-training from scratch with full Adam, GaLore, 8-bit GaLore, GradNormLoRP, DLRT and the
factorised low-rank baseline -- the GaLore paper's (https://arxiv.org/abs/2403.03507, Table 2) comparison in
miniature.

Every run is ``leantrain.train`` in its own process (so peak RSS is per run), on the same data, seed and init.

    .venv/bin/python benchmarks/lm.py [--quick] [--part finetune|pretrain|both] [--json PATH]

Writes docs/img/lm_finetune.png and docs/img/lm_pretrain.png, prints both tables with ratios.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (label, method, optimizer, lr, extra config)
FINETUNE = [
    ("LoRA r=8", "lora", "adamw", 1e-3, {}),
    ("MiSS r=8", "miss", "adamw", 1e-3, {}),
    ("SHiRA r=8", "shira", "adamw", 1e-3, {}),
    ("GaLore r=8", "full", "galore-adamw", 1e-4, {}),
]
PRETRAIN = [
    ("full Adam", "full", "adamw", 3e-3, {}),
    ("GaLore", "full", "galore-adamw", 1e-2, {}),
    ("8-bit GaLore", "full", "galore-adamw8bit", 1e-2, {}),
    ("GradNormLoRP", "gradnormlorp", "adamw", 1e-2, {}),
    ("DLRT", "dlrt", "adamw", 3e-3, {}),
    ("low-rank (W=BA)", "lowrank", "adamw", 3e-3, {}),
]
PROJECTED_GROUPS = ("linear", "lowrank", "gradnormlorp")


def finetune_config(method: str, optim: str, lr: float, steps: int, out: str) -> dict:
    return {"task": "causal-lm", "model": "smollm2", "data": "bible", "method": method, "optim": optim, "lr": lr, "steps": steps,
                "batch_size": 4, "max_length": 64, "rank": 8, "alpha": 16.0, "train_size": None, "val_size": 16, "warmup_ratio": 0.1,
                "weight_decay": 0.0, "out": out, "overwrite": True, "progress": False, "extra": {"eval_before": True}}


def pretrain_config(method: str, optim: str, lr: float, steps: int, out: str, preset: str) -> dict:
    return {"task": "causal-lm", "model": "minilm", "data": "bible", "init_weights": "scratch", "arch": "llama", "preset": preset,
                "method": method, "optim": optim, "lr": lr, "steps": steps, "batch_size": 16, "max_length": 64, "rank": 32, "gap": 50,
                "proj_scale": 0.25, "tau": 0.1, "train_size": None, "val_size": 64, "warmup_ratio": 0.1, "weight_decay": 0.0,
                "eval_every": max(1, steps // 5), "out": out, "overwrite": True, "progress": False,
                "extra": {"eval_before": True}}


# --- one run (child process) ----------------------------------------------------------------------------------

def run_one(spec_path: str, result_path: str) -> None:
    """Train one config, then add the optimizer-state split (projected matrices vs the rest) to its metrics."""
    import importlib

    import torch

    from leantrain import methods
    from leantrain.config import TrainConfig
    from leantrain.dist_utils import local_bytes, optimizer_state_bytes_local

    train_module = importlib.import_module("leantrain.train")  # the module (leantrain.train is also a function)
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec.pop("threads"))
    methods.METHODS.setdefault("lowrank", "leantrain.lm.lowrank:LOWRANK")  # until the registry line lands
    captured = {}
    build = train_module.build_optimizer

    def capture(*args, **kwargs):
        captured["opt"] = opt = build(*args, **kwargs)
        return opt

    train_module.build_optimizer = capture
    metrics = train_module.train(TrainConfig.from_dict(spec))
    opt = captured["opt"]
    projected = other = 0
    for group in opt.param_groups:
        size = sum(local_bytes(opt.state[p].values()) for p in group["params"] if p in opt.state)
        if group.get("name") in PROJECTED_GROUPS:
            projected += size
        else:
            other += size
    metrics.update(state_bytes_matrices=projected, state_bytes_other=other,
                   inner_optimizer_state_bytes=optimizer_state_bytes_local(opt))
    Path(result_path).write_text(json.dumps(metrics))


def launch(cfg: dict, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps({**cfg, "threads": threads}))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run([sys.executable, __file__, "--one", str(spec), str(result)], env=env,
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not result.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"error": " | ".join(tail)}
        return json.loads(result.read_text())


# --- tables and plots -------------------------------------------------------------------------------------------

def _curves(run_dir: str) -> tuple[list, list]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return [], []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    return train, val


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from leantrain.report import smooth

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, r in enumerate(results):
        if "error" in r:
            continue
        train, val = _curves(r["out"])
        color = f"C{i}"
        if train:
            steps, losses = zip(*train)
            ax.plot(steps, smooth(list(losses), max(1, len(losses) // 15)), color=color,
                    label=f"{r['label']} (train, smoothed)")
        points = ([(0, r["val_loss_before"])] if "val_loss_before" in r else []) + val
        if points:
            s, v = zip(*points)
            ax.plot(s, v, "o--", color=color, ms=4, lw=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token); dashed = validation")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finetune_table(results: list[dict]) -> str:
    ref = next((r for r in results if "error" not in r), None)
    lines = [("| method | optimizer | lr | trainable params | val ppl before | val ppl after | s/step | "
              "step time vs LoRA | peak RSS (MiB) | optimizer state (MiB) |"), "|" + "---|" * 10]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['optim']} | | | | | | | | failed: {r['error'][:80]} |")
            continue
        lines.append(f"| {r['label']} | {r['optim']} | {r['lr']:g} | {r['trainable_params']:,} | "
                     f"{r['val_perplexity_before']:.2f} | {r['val_perplexity']:.2f} | {r['sec_per_step']:.2f} | "
                     f"{r['sec_per_step'] / ref['sec_per_step']:.2f}x | {r['peak_rss_bytes'] / 2**20:.0f} | "
                     f"{r['optimizer_state_bytes'] / 2**20:.2f} |")
    return "\n".join(lines)


def pretrain_table(results: list[dict]) -> str:
    full = next((r for r in results if "error" not in r and r["label"] == "full Adam"), None)
    lines = [("| method | optimizer | lr | params | val ppl (init) | final val ppl | ppl vs full | "
              "opt. state, matrices (KiB) | opt. state, other (KiB) | total state vs full | s/step |"),
             "|" + "---|" * 11]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['optim']} | | | | | | | | failed: {r['error'][:80]} | |")
            continue
        total = r["state_bytes_matrices"] + r["state_bytes_other"]
        full_total = (full["state_bytes_matrices"] + full["state_bytes_other"]) if full else None
        lines.append(
            f"| {r['label']} | {r['optim']} | {r['lr']:g} | {r['total_params']:,} | {r['val_perplexity_before']:.0f} | "
            f"{r['val_perplexity']:.1f} | {r['val_perplexity'] / full['val_perplexity']:.2f}x | "
            f"{r['state_bytes_matrices'] / 1024:.0f} | {r['state_bytes_other'] / 1024:.0f} | "
            f"{total / full_total:.2f}x | {r['sec_per_step']:.3f} |" if full else "| ? |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps each (smoke test)")
    parser.add_argument("--part", choices=["finetune", "pretrain", "both"], default="both")
    parser.add_argument("--finetune-steps", type=int, default=40)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("LM_BENCH_THREADS", "1")),
                        help="torch threads per run (1 is fastest when the 2 cores are shared)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_lm"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(*args.one)
        return 0
    ft_steps, pt_steps = (3, 10) if args.quick else (args.finetune_steps, args.pretrain_steps)
    load = os.getloadavg()[0]
    report: dict = {"load_average_1min_at_start": load, "threads": args.threads}
    print(f"load average at start: {load:.1f} (2 shared cores); torch threads per run: {args.threads}")
    if args.part in ("finetune", "both"):
        results = []
        for label, method, optim, lr, extra in FINETUNE:
            out = f"{args.out}/finetune_{method}_{optim}"
            t = time.time()
            r = launch({**finetune_config(method, optim, lr, ft_steps, out), **extra}, args.threads)
            r.update(label=label, optim=optim, lr=lr, out=out)
            print(f"  finetune {label}: {'error ' + r['error'] if 'error' in r else 'ok'} ({time.time() - t:.0f} s)")
            results.append(r)
        report["finetune"] = results
        print(f"\n(a) SmolLM2-135M fine-tuning, {ft_steps} steps of 4x64 tokens\n" + finetune_table(results))
        plot(results, ROOT / "docs/img/lm_finetune.png", f"SmolLM2-135M on KJV verses ({ft_steps} steps, 4x64 tokens)")
    if args.part in ("pretrain", "both"):
        results = []
        for label, method, optim, lr, extra in PRETRAIN:
            out = f"{args.out}/pretrain_{method}_{optim}"
            t = time.time()
            r = launch({**pretrain_config(method, optim, lr, pt_steps, out, args.preset), **extra}, args.threads)
            r.update(label=label, optim=optim, lr=lr, out=out)
            print(f"  pretrain {label}: {'error ' + r['error'] if 'error' in r else 'ok'} ({time.time() - t:.0f} s)")
            results.append(r)
        report["pretrain"] = results
        print(f"\n(b) LLaMA-{args.preset} pre-training from scratch, {pt_steps} steps of 16x64 tokens\n"
              + pretrain_table(results))
        plot(results, ROOT / "docs/img/lm_pretrain.png",
             f"LLaMA-{args.preset} from scratch on KJV ({pt_steps} steps, 16x64 tokens)")
    report["load_average_1min_at_end"] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

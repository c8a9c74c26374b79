"""Rapid switching + training memory: SHiRA (fused scatter/restore) vs LoRA merge/unmerge, leantrain vs PEFT.

Part 1 (one process): on a stack of 24 Linear(2048, 2048) and on the embedded MiniLM classifier, time
  * adapter creation (ours: SHiRA masks for every layer; PEFT: get_peft_model with ShiraConfig / LoraConfig),
  * one switch = fused apply + remove: leantrain SHiRA merge+unmerge (K-entry scatter + bit-exact restore; the
    originals are gathered on the first switch and cached for the later ones, reported as "first switch"),
    leantrain LoRA merge+unmerge, PEFT LoRA merge_adapter+unmerge_adapter, PEFT SHiRA merge+unmerge.
  SHiRA and LoRA have the same trainable size: K = r(out+in) entries vs r(out+in) LoRA parameters.
Part 2 (one subprocess per method, so peak RSS belongs to that method alone): training peak memory of
  SHiRA vs LoRA at equal trainable parameter count on the Linear stack (AdamW, a few steps), reported as
  peak RSS minus the RSS after building the model (= adapter + optimizer + activations + transients).

    .venv/bin/python benchmarks/switching.py [--quick] [--json PATH] [--threads N] [--skip-memory]

Timings on a shared CPU are noisy: the four switchers of a model run interleaved (repetition i of each before
repetition i+1 of any), medians of ``--reps`` repetitions; ratios matter more than absolute numbers.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from leantrain import adapters
from leantrain.adapters.shira import ShiraConfig
from leantrain.commands.switch import build_stack
from leantrain.memory.rss import peak_rss_bytes

BERT_LINEARS = ["query", "key", "value", "dense"]  # every encoder Linear of MiniLM (= our "all-linear")


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1e3, out


def build(kind: str, layers: int, dim: int) -> tuple[nn.Module, list[str]]:
    if kind == "stack":
        return build_stack(layers, dim), [str(i) for i in range(layers)]
    from leantrain.models import build_classifier

    return build_classifier("minilm", 3), BERT_LINEARS


def _randomise_lora(model: nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)


def _switchers(kind: str, layers: int, dim: int, rank: int) -> list[dict]:
    """The four adapted copies of one base model: method, create time, the switch callable, trainable count."""
    import peft

    base, peft_targets = build(kind, layers, dim)
    out = []
    m = copy.deepcopy(base)
    create, _ = _timed(lambda: adapters.inject(m, ShiraConfig(r=rank, init_weights=False)))
    out.append({"method": "leantrain SHiRA", "create_ms": create, "model": m,
                "switch": lambda m=m: (adapters.merge(m), adapters.unmerge(m)), "prefix": "shira_weight"})
    m = copy.deepcopy(base)
    create, _ = _timed(lambda: adapters.inject(m, adapters.LoraConfig(r=rank, alpha=2 * rank)))
    _randomise_lora(m)
    out.append({"method": "leantrain LoRA", "create_ms": create, "model": m,
                "switch": lambda m=m: (adapters.merge(m), adapters.unmerge(m)), "prefix": "lora_"})
    m = copy.deepcopy(base)
    create, pm = _timed(lambda: peft.get_peft_model(m, peft.LoraConfig(r=rank, lora_alpha=2 * rank,
                                                                       target_modules=peft_targets)))
    _randomise_lora(pm)
    out.append({"method": "PEFT LoRA", "create_ms": create, "model": pm,
                "switch": lambda pm=pm: (pm.merge_adapter(), pm.unmerge_adapter()), "prefix": "lora_"})
    m = copy.deepcopy(base)
    create, pm = _timed(lambda: peft.get_peft_model(m, peft.ShiraConfig(r=rank, target_modules=peft_targets,
                                                                        init_weights=False)))
    out.append({"method": "PEFT SHiRA", "create_ms": create, "model": pm,
                "switch": lambda pm=pm: (pm.merge_adapter(), pm.unmerge_adapter()), "prefix": "shira_weight"})
    return out


@torch.no_grad()
def switching(kind: str, layers: int, dim: int, rank: int, reps: int) -> list[dict]:
    """Interleaved: repetition i of every method before repetition i+1 of any, so load from other jobs hits all
    alike; median per method. leantrain SHiRA's first switch (it gathers the originals, then cached) is reported
    on its own and is not in the median."""
    runs = _switchers(kind, layers, dim, rank)
    shira = runs[0]["model"]
    weights0 = {n: p.clone() for n, p in shira.named_parameters()}
    first, _ = _timed(runs[0]["switch"])
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(reps):
        for run, ts in zip(runs, times):
            ts.append(_timed(run["switch"])[0])
    exact = all(torch.equal(p, weights0[n]) for n, p in shira.named_parameters())
    rows = []
    for run, ts in zip(runs, times):
        n_train = sum(p.numel() for n, p in run["model"].named_parameters() if run["prefix"] in n)
        rows.append({"model": kind, "method": run["method"], "create_ms": run["create_ms"],
                     "switch_ms": statistics.median(ts), "params": n_train})
    rows[0].update(bit_exact=exact, first_switch_ms=first)
    ours = rows[0]["switch_ms"]
    for r in rows:
        r["switch_vs_ours"] = r["switch_ms"] / ours
    return rows


# ---- part 2: training memory in a child process ---------------------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak() -> None:
    """Reset the kernel's high-water mark (VmHWM) so start-up/import peaks are not counted (Linux >= 4.0; elsewhere
    the peak is the whole process's)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def child_memory(method: str, layers: int, dim: int, rank: int, tokens: int, steps: int) -> dict:
    """Run in a fresh process: build, adapt, train ``steps`` AdamW steps; report peak RSS over the model RSS."""
    if method.startswith("peft"):
        import peft

    def adapt(model: nn.Module, layers: int, rank: int) -> nn.Module:
        targets = [str(i) for i in range(layers)]
        if method == "shira":
            adapters.inject(model, ShiraConfig(r=rank))
        elif method == "lora":
            adapters.inject(model, adapters.LoraConfig(r=rank, alpha=2 * rank))
        elif method == "lora-dropout":  # dropout keeps a dropped-out copy of x per layer for backward
            adapters.inject(model, adapters.LoraConfig(r=rank, alpha=2 * rank, dropout=0.05))
        elif method == "peft-lora":
            model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
        elif method == "peft-shira":
            model = peft.get_peft_model(model, peft.ShiraConfig(r=rank, target_modules=targets))
        return model

    def train(model: nn.Module, x: torch.Tensor, target: torch.Tensor, steps: int) -> tuple[list[float], int]:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            loss = nn.functional.mse_loss(model(x), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append((time.perf_counter() - t0) * 1e3)
        return times, sum(p.numel() for p in params)

    # Warm-up on a tiny model: loads every lazily imported module / kernel of this code path, so the
    # measurement below counts tensors, not one-off library loading (which differs between the stacks).
    torch.manual_seed(0)
    train(adapt(build_stack(2, 64), 2, 2), torch.randn(8, 64), torch.randn(8, 64), 2)
    model = build_stack(layers, dim)
    x = torch.randn(tokens, dim)
    target = torch.randn(tokens, dim)
    before = _rss_mb()
    _reset_peak()  # where it works, the peak below counts training only
    times, trainable = train(adapt(model, layers, rank), x, target, steps)
    peak = peak_rss_bytes() / 2**20
    return {"method": method, "trainable": trainable, "model_rss_mb": before,
                "peak_rss_mb": peak, "training_overhead_mb": peak - before, "step_ms": statistics.median(times[1:] or times)}


def memory(layers: int, dim: int, rank: int, tokens: int, steps: int, threads: int | None) -> list[dict]:
    rows = []
    for method in ("lora", "shira", "lora-dropout", "peft-lora", "peft-shira"):
        cmd = [sys.executable, __file__, "--child", method, "--layers", str(layers), "--dim", str(dim),
               "--rank", str(rank), "--tokens", str(tokens), "--steps", str(steps)]
        if threads:
            cmd += ["--threads", str(threads)]
        # Large allocations via mmap (returned to the OS on free) and no MKL buffer cache: RSS then follows live
        # tensors instead of allocator caches, which is what "peak memory of training" should mean.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MKL_DISABLE_FAST_MM="1")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    lora = rows[0]["training_overhead_mb"]
    for r in rows:
        r["overhead_vs_lora"] = r["training_overhead_mb"] / lora
    return rows


def plot(switch_rows: list[dict], mem_rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    kinds = list(dict.fromkeys(r["model"] for r in switch_rows))
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(5.5 * max(1, len(kinds)), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rs = [r for r in switch_rows if r["model"] == kind]
        ax.barh([r["method"] for r in rs], [r["switch_ms"] for r in rs],
                color=["tab:green" if "leantrain SHiRA" == r["method"] else "tab:gray" for r in rs])
        ax.set_xscale("log")
        ax.set_xlim(left=1.0)  # bars start at 1 ms so their lengths compare on the log axis
        ax.set_xlabel("apply + remove one adapter (ms, log scale from 1 ms)")
        ax.set_title(f"switching: {kind}")
        for i, r in enumerate(rs):
            ax.text(r["switch_ms"], i, f" {r['switch_ms']:.1f}", va="center", fontsize=8)
    fig.tight_layout()
    if kinds:
        paths.append(out_dir / "shira_switching.png")
        fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    if mem_rows:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.barh([r["method"] for r in mem_rows], [r["training_overhead_mb"] for r in mem_rows],
                color=["tab:green" if r["method"] == "shira" else "tab:gray" for r in mem_rows])
        ax.set_xlabel("training peak RSS above the model (MiB)")
        ax.set_title("SHiRA vs LoRA at equal trainable size")
        for i, r in enumerate(mem_rows):
            ax.text(r["training_overhead_mb"], i, f" {r['training_overhead_mb']:.0f}", va="center", fontsize=8)
        fig.tight_layout()
        paths.append(out_dir / "shira_memory.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 layers of 512, no MiniLM, 3 reps")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-switching", action="store_true")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=512, help="batch rows of the memory run")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--plot-dir", default=str(ROOT / "docs" / "img"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child_memory(args.child, args.layers, args.dim, args.rank, args.tokens, args.steps)))
        return 0
    if args.quick:
        args.layers, args.dim, args.reps, args.tokens, args.steps = 4, 512, 3, 128, 3
    kinds = [] if args.skip_switching else ["stack"] if args.quick else ["stack", "minilm"]
    switch_rows = []
    for kind in kinds:
        switch_rows += switching(kind, args.layers, args.dim, args.rank, args.reps)
    print(f"\nSwitching (r={args.rank}; stack = {args.layers} x Linear({args.dim}, {args.dim}); median of "
          f"{args.reps}; torch threads {torch.get_num_threads()})")
    print(f"{'model':8} {'method':17} {'params':>10} {'create ms':>10} {'switch ms':>10} {'x ours':>8}")
    for r in switch_rows:
        print(f"{r['model']:8} {r['method']:17} {r['params']:>10,} {r['create_ms']:>10.1f} {r['switch_ms']:>10.2f} "
              f"{r['switch_vs_ours']:>8.1f}" + ("  bit-exact restore" if r.get("bit_exact") else "")
              + (f"; first switch {r['first_switch_ms']:.1f} ms" if "first_switch_ms" in r else ""))
    mem_rows = []
    if not args.skip_memory:
        mem_rows = memory(args.layers, args.dim, args.rank, args.tokens, args.steps, args.threads)
        print(f"\nTraining memory ({args.layers} x Linear({args.dim}), {args.tokens} rows, AdamW, {args.steps} steps;"
              " peak RSS of a child process minus its RSS after building the model)")
        print(f"{'method':12} {'trainable':>10} {'overhead MiB':>13} {'x LoRA':>7} {'step ms':>9}")
        for r in mem_rows:
            print(f"{r['method']:12} {r['trainable']:>10,} {r['training_overhead_mb']:>13.1f} "
                  f"{r['overhead_vs_lora']:>7.2f} {r['step_ms']:>9.1f}")
    if not args.quick:
        for p in plot(switch_rows, mem_rows, Path(args.plot_dir)):
            print(f"plot: {p}")
    if args.json:
        Path(args.json).write_text(json.dumps({"switching": switch_rows, "memory": mem_rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

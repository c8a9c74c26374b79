"""LoRA-family speed: leantrain vs PEFT on the embedded MiniLM classifier, one process, same model and batch.

Measures (median of --reps, the two implementations interleaved rep by rep so CPU contention hits both alike):
  * training step (forward + cross-entropy + backward + AdamW step) of LoRA, DoRA, VeRA, leantrain vs PEFT;
    goal: leantrain LoRA <= 1.0x PEFT LoRA;
  * DoRA overhead over LoRA (each library against itself);
  * merge + unmerge of all adapted layers (leantrain merge/unmerge vs PEFT merge_adapter/unmerge_adapter).
Adapters: r=8, alpha=16 on every encoder Linear (query, key, value, dense); the head is trained in both.

    .venv/bin/python benchmarks/adapters.py [--quick] [--json PATH] [--plot PNG] [--reps N] [--threads N]

Default: batch 16 x 64 tokens. --quick: batch 8 x 32 and fewer repetitions (a smoke run, not a measurement).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from leantrain import adapters  # noqa: E402
from leantrain.models import build_classifier  # noqa: E402

TARGETS = ["query", "key", "value", "dense"]  # every encoder Linear of MiniLM


def ours(base: nn.Module, kind: str) -> nn.Module:
    model = copy.deepcopy(base)
    if kind == "vera":
        adapters.inject(model, adapters.VeraConfig(r=256, target_modules=TARGETS))
    else:
        adapters.inject(
            model, adapters.LoraConfig(r=8, alpha=16, target_modules=TARGETS, use_dora=kind == "dora")
        )
    model.classifier.requires_grad_(True)
    return model


def theirs(base: nn.Module, kind: str) -> nn.Module:
    import peft

    if kind == "vera":
        config = peft.VeraConfig(r=256, target_modules=TARGETS, modules_to_save=None)
    else:
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, use_dora=kind == "dora")
    model = peft.get_peft_model(copy.deepcopy(base), config)
    model.base_model.model.classifier.requires_grad_(True)
    return model


class Stepper:
    """One optimizer step on a fixed batch; returns wall milliseconds."""

    def __init__(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        self.model, self.batch = model.train(), batch
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def __call__(self) -> float:
        ids, mask, labels = self.batch
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(self.model(input_ids=ids, attention_mask=mask), labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return (time.perf_counter() - t0) * 1e3


def interleaved(fns: dict[str, callable], reps: int, warmup: int, bar: tqdm) -> dict[str, float]:
    """Median ms per function, calling them round-robin so slow phases of a shared CPU hit all of them."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            times[key].append(fn())
        bar.update(1)
    return {k: statistics.median(v) for k, v in times.items()}


def merge_cycle_ours(model: nn.Module) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        adapters.merge(model)
        adapters.unmerge(model)
    return (time.perf_counter() - t0) * 1e3


def merge_cycle_peft(model: nn.Module) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        model.merge_adapter()
        model.unmerge_adapter()
    return (time.perf_counter() - t0) * 1e3


def plot(result: dict, path: Path) -> None:
    """Grouped bars: leantrain vs PEFT ms per measurement (log scale: steps and merges differ 10x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.bar([x - 0.2 for x in xs], [r["leantrain_ms"] for r in rows], 0.4, label="leantrain")
    ax.bar([x + 0.2 for x in xs], [r["peft_ms"] for r in rows], 0.4, label="PEFT")
    for x, r in zip(xs, rows):
        ax.text(x, max(r["leantrain_ms"], r["peft_ms"]) * 1.15, f"{r['ratio']:.2f}x", ha="center", fontsize=8)
    ax.set_xticks(list(xs), [r["what"].replace(" (", "\n(") for r in rows], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("median ms")
    b, s = result["batch"]
    threads = result["torch_threads"]
    ax.set_title(f"MiniLM-L6, batch {b}x{s}, {threads} thread(s): leantrain / PEFT", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batch, few repetitions (smoke run)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    parser.add_argument("--plot", type=Path, default=None, help="also save a bar chart PNG (docs/img/...)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 = least sensitive to other processes on a shared CPU)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    batch_size, seq = (8, 32) if args.quick else (16, 64)
    reps = args.reps or (3 if args.quick else 15)
    warmup = 1 if args.quick else 3

    torch.manual_seed(0)
    base = build_classifier("minilm", 3)
    vocab = base.encoder.config.vocab_size
    batch = (
        torch.randint(0, vocab, (batch_size, seq)),
        torch.ones(batch_size, seq, dtype=torch.long),
        torch.randint(0, 3, (batch_size,)),
    )
    kinds = ["lora", "dora", "vera"]
    bar = tqdm(total=reps * (len(kinds) + 1), desc="adapters bench", unit="rep")
    steps: dict[str, float] = {}
    for kind in kinds:
        fns = {
            f"leantrain {kind}": Stepper(ours(base, kind), batch),
            f"peft {kind}": Stepper(theirs(base, kind), batch),
        }
        steps.update(interleaved(fns, reps, warmup, bar))
    lt, pm = ours(base, "lora").eval(), theirs(base, "lora").eval()
    merges = interleaved(
        {
            "leantrain merge+unmerge": lambda: merge_cycle_ours(lt),
            "peft merge+unmerge": lambda: merge_cycle_peft(pm),
        },
        reps,
        warmup,
        bar,
    )
    bar.close()

    rows = [
        ("train step LoRA", steps["leantrain lora"], steps["peft lora"]),
        ("train step DoRA", steps["leantrain dora"], steps["peft dora"]),
        ("train step VeRA (r=256)", steps["leantrain vera"], steps["peft vera"]),
        (
            "merge + unmerge (LoRA, 36 layers)",
            merges["leantrain merge+unmerge"],
            merges["peft merge+unmerge"],
        ),
    ]
    result = {
        "batch": [batch_size, seq],
        "reps": reps,
        "torch_threads": torch.get_num_threads(),
        "rows": [{"what": w, "leantrain_ms": a, "peft_ms": b, "ratio": a / b} for w, a, b in rows],
        "dora_over_lora": {
            "leantrain": steps["leantrain dora"] / steps["leantrain lora"],
            "peft": steps["peft dora"] / steps["peft lora"],
        },
    }
    print(
        f"\nMiniLM-L6 classifier, batch {batch_size} x {seq} tokens, median of {reps} reps, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"| {'measurement':34} | leantrain ms | PEFT ms | leantrain/PEFT |")
    print(f"|{'-' * 36}|-------------:|--------:|---------------:|")
    for w, a, b in rows:
        print(f"| {w:34} | {a:12.1f} | {b:7.1f} | {a / b:13.2f}x |")
    d = result["dora_over_lora"]
    print(f"\nDoRA / LoRA step time: leantrain {d['leantrain']:.2f}x, PEFT {d['peft']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.plot:
        plot(result, args.plot)
    return result


if __name__ == "__main__":
    main()

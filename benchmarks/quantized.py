"""Quantized frozen base: bytes and speed of NF4 / int8 QuantLinear vs dense fp32 vs bitsandbytes Linear4bit.

Run:  .venv/bin/python benchmarks/quantized.py [--quick] [--json PATH] [--plot docs/img/quant_bytes.png]

1. Bytes of the embedded MiniLM classifier (``build_classifier("minilm", 3)``) with every encoder Linear
   quantized: whole model and the quantized matrices alone (bits per weight, ratio to fp32).
2. Layer timing (one process, same inputs): forward and forward+backward (grad w.r.t. the input, frozen base)
   of MiniLM-sized layers 384->1536 and 1536->384, batch 16 x 64 tokens: nn.Linear, QuantLinear int8/NF4,
   bitsandbytes ``Linear4bit`` (nf4, double quant, CPU backend).
3. LoftQ: relative weight error of plain quantization vs LoftQ's Q + BA on MiniLM's weights.
4. Model timing: forward+backward of the MiniLM classifier with LoRA r=8 on all linear layers, dense vs NF4
   vs int8 base (QLoRA setting).
Timings are CPU time (``time.process_time``, best of repeated runs, 1 thread by default): the machine is shared,
so wall time is dominated by other processes; ratios are more meaningful than absolutes.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from leantrain.quant import QuantLinear, model_nbytes, quantize, quantized_layers


def _best_time(fn, repeats: int, warmup: int = 1) -> float:
    """Best of ``repeats`` runs, in *process CPU time*: on a shared, overloaded CPU wall time mostly measures
    the scheduler (we saw 10x swings), while CPU time of a single-threaded run measures the work."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def bytes_table(quick: bool) -> list[dict]:
    from leantrain.models import build_classifier

    base = build_classifier("minilm", 3)
    rows = []
    dense_matrices = sum(m.weight.numel() * 4 for n, m in base.encoder.named_modules() if isinstance(m, nn.Linear))
    variants = [("fp32 (dense)", None, None), ("int8", 8, False), ("int8 + DQ", 8, True), ("NF4", 4, False),
                ("NF4 + DQ", 4, True)]
    for label, bits, dq in tqdm(variants, desc="bytes", leave=False):
        model = copy.deepcopy(base)
        if bits is None:
            matrices, numel = dense_matrices, dense_matrices // 4
        else:
            quantize(model.encoder, bits=bits, double_quant=dq)
            layers = quantized_layers(model).values()
            matrices = sum(m.quant_nbytes() for m in layers)
            numel = sum(m.in_features * m.out_features for m in layers)
        rows.append({"variant": label, "model_MB": model_nbytes(model) / 2**20, "matrices_MB": matrices / 2**20,
                     "bits_per_weight": 8 * matrices / numel, "matrices_vs_fp32": matrices / dense_matrices,
                     "model_vs_fp32": model_nbytes(model) / model_nbytes(base)})
    return rows


def _bnb_linear4bit(lin: nn.Linear) -> nn.Module | None:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=True, compute_dtype=torch.float32,
                              quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     blocksize=64, compress_statistics=True)
    layer.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")  # quantizes on the move


def layer_table(quick: bool) -> list[dict]:
    repeats = 5 if quick else 30
    tokens = 16 * (16 if quick else 64)
    rows = []
    for n_in, n_out in [(384, 1536), (1536, 384)]:
        torch.manual_seed(0)
        dense = nn.Linear(n_in, n_out).requires_grad_(False)
        layers = {"nn.Linear fp32": dense,
                  "QuantLinear int8": QuantLinear.from_linear(dense, bits=8, double_quant=False),
                  "QuantLinear NF4+DQ": QuantLinear.from_linear(dense, bits=4, double_quant=True),
                  "bnb Linear4bit NF4+DQ": _bnb_linear4bit(dense)}
        x = torch.randn(tokens, n_in)
        base_fwd = base_both = None
        for name, layer in tqdm(layers.items(), desc=f"layer {n_in}->{n_out}", leave=False):
            if layer is None:
                continue

            def forward(layer=layer, x=x):
                with torch.no_grad():
                    layer(x)

            def forward_backward(layer=layer, x=x):
                xg = x.detach().requires_grad_()
                layer(xg).sum().backward()

            fwd, both = _best_time(forward, repeats), _best_time(forward_backward, repeats)
            base_fwd, base_both = base_fwd or fwd, base_both or both
            rows.append({"layer": f"{n_in}->{n_out}", "impl": name, "fwd_ms": 1e3 * fwd, "fwd_bwd_ms": 1e3 * both,
                         "fwd_vs_dense": fwd / base_fwd, "fwd_bwd_vs_dense": both / base_both})
    return rows


def model_table(quick: bool) -> list[dict]:
    from leantrain import adapters
    from leantrain.models import build_classifier

    repeats = 1 if quick else 5
    batch, length = (4, 16) if quick else (16, 64)
    base = build_classifier("minilm", 3)
    ids = torch.randint(1000, 20000, (batch, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    rows, ref = [], None
    for label, bits in tqdm([("dense fp32 + LoRA", None), ("int8 + LoRA", 8), ("NF4+DQ + LoRA", 4)],
                            desc="model", leave=False):
        model = copy.deepcopy(base)
        if bits is not None:
            quantize(model.encoder, bits=bits)
        adapters.inject(model, adapters.LoraConfig(r=8))
        model.train()

        def step(model=model):
            model.zero_grad(set_to_none=True)
            model(ids, mask).sum().backward()

        t = _best_time(step, repeats, warmup=0 if quick else 1)
        ref = ref or t
        rows.append({"variant": label, "fwd_bwd_ms": 1e3 * t, "vs_dense": t / ref})
    return rows


def loftq_table(quick: bool) -> list[dict]:
    """Relative weight error ||W - W_hat||_F / ||W||_F over MiniLM's encoder Linear layers (mean, max)."""
    from leantrain.models import build_classifier
    from leantrain.quant.loftq import reconstruction_errors

    weights = [m.weight.detach() for m in build_classifier("minilm", 3).encoder.modules() if isinstance(m, nn.Linear)]
    if quick:
        weights = weights[:6]
    settings = [(4, 8, 1), (4, 8, 5), (4, 32, 5), (8, 8, 5)]
    rows = []
    for bits, r, iters in tqdm(settings, desc="loftq", leave=False):
        errs = [reconstruction_errors(w, r, bits=bits, iters=iters) for w in weights]
        quant = [e["quant"] for e in errs]
        loftq = [e["loftq"] for e in errs]
        rows.append({"format": "NF4+DQ" if bits == 4 else "int8+DQ", "rank": r, "iters": iters,
                     "layers": len(weights), "quant_err_mean": statistics.fmean(quant),
                     "loftq_err_mean": statistics.fmean(loftq), "loftq_err_max": max(loftq),
                     "reduction": 1 - statistics.fmean(loftq) / statistics.fmean(quant)})
    return rows


def _print(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")


def _plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    labels = [r["variant"] for r in rows]
    ax.bar(labels, [r["matrices_MB"] for r in rows], label="quantized matrices")
    ax.bar(labels, [r["model_MB"] - r["matrices_MB"] for r in rows], bottom=[r["matrices_MB"] for r in rows],
           label="rest (embeddings, norms, head)")
    for i, r in enumerate(rows):
        ax.text(i, r["model_MB"] + 1, f"{r['bits_per_weight']:.2f} b/w", ha="center", fontsize=8)
    ax.set_ylabel("MiB")
    ax.set_title("MiniLM-L6 classifier: bytes with the encoder's Linear weights quantized", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller batches (smoke run)")
    parser.add_argument("--json", type=Path, help="write the tables as JSON here")
    parser.add_argument("--plot", type=Path, help="write a bytes bar chart (PNG) here")
    parser.add_argument("--skip-model", action="store_true", help="skip the whole-model timing")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (default 1: on a shared CPU more threads mostly add barrier noise)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {"bytes": bytes_table(args.quick), "layers": layer_table(args.quick)}
    results["loftq"] = loftq_table(args.quick)
    if not args.skip_model:
        results["model"] = model_table(args.quick)
    _print("Bytes (MiniLM-L6 classifier, encoder Linear layers quantized, block 64)", results["bytes"])
    _print("Layer timing (tokens x in -> out, CPU)", results["layers"])
    _print("LoftQ init: relative weight error of Q alone vs Q + BA (MiniLM encoder Linear weights)",
           results["loftq"])
    if "model" in results:
        _print("MiniLM + LoRA r=8 forward+backward", results["model"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.plot:
        _plot(args.plot, results["bytes"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

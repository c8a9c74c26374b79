"""Projected optimizers: optimizer-state bytes and step time of GaLore / 8-bit GaLore / GradNormLoRP (32/8-bit)
against torch AdamW and galore-torch, plus projector refresh cost (full SVD vs seeded randomized range finder)
and the quality of the randomized subspace. One process; the optimizers step round-robin (step i of every
optimizer before step i+1 of any) so CPU contention from other jobs hits them alike.

    .venv/bin/python benchmarks/projected.py [--quick] [--json PATH] [--no-model] [--png PATH]

Default: a 4096x4096 layer (r=128, T=200, 200 steps = one refresh period, refresh included in the mean) and the
embedded MiniLM classifier (every encoder Linear projected, r=128, T=200). Only ``optimizer.step()`` is timed,
on fixed gradients (the forward/backward is the same for every optimizer). --quick: 1024x1024, r=32, T=20
and the random 2-layer "tiny" BERT with r=8 (a smoke run, not a measurement). Goals (checked in the output): state == the spec's formula; randomized refresh
>= 20x faster than full SVD with captured energy within 2 % of exact; mean step (refresh included) <= 1.3x torch
AdamW and <= 0.5x galore-torch.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

print = functools.partial(print, flush=True)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from leantrain.config import TrainConfig
from leantrain.optim import projector as pj
from leantrain.optim.codecs import get_codec
from leantrain.optim.galore import GaLoreAdamW, GaLoreAdamW8bit
from leantrain.optim.gradnorm import GRADNORMLORP
from leantrain.optim.registry import build_optimizer, galore_groups


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def layer_gradient(m: int, n: int, tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    """A linear layer's gradient ``dY^T X / T`` for ``tokens`` tokens whose activations and output gradients have
    power-law covariance spectra (as in trained networks): full rank up to ``tokens``, slowly decaying spectrum."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g) * torch.arange(1, n + 1).float().pow(-0.5)
    d = torch.randn(tokens, m, generator=g) * torch.arange(1, m + 1).float().pow(-0.5)[torch.randperm(m, generator=g)]
    return (d.T @ x) / tokens


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer state (galore-torch's projector object included)."""
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
            elif hasattr(v, "ortho_matrix") and v.ortho_matrix is not None:  # galore_torch.GaLoreProjector
                mats = v.ortho_matrix if isinstance(v.ortho_matrix, list) else [v.ortho_matrix]
                total += sum(t.numel() * t.element_size() for t in mats)
    return total


def formula_bytes(opt: torch.optim.Optimizer, bits: int) -> int:
    """The spec's formula: per projected m x n matrix (m >= n) 2 moments of m*r values + an r*n fp32 basis
    (paper: mr + 2nr for m <= n); every other tensor 2 moments of its size; moments stored by the codec
    (8-bit: 1 byte + 4/256 per value, fp32 under 4096 values); plus one 4-byte step counter per tensor."""
    total = 0
    for group in opt.param_groups:
        for p in group["params"]:
            projected = group.get("rank") is not None and p.ndim == 2
            rows, cols = pj.low_rank_shape(p.shape, group) if projected else (p.numel(), 1)
            numel = rows * cols
            codec = "8bit" if bits == 8 and numel >= group.get("min_8bit_size", 4096) else "fp32"
            total += sum(get_codec(codec, signed, 256).nbytes(numel) for signed in (True, False)) + 4
            if projected:
                total += 4 * pj.projector_numel(p.shape, group)
    return total


def round_robin(optimizers: dict[str, torch.optim.Optimizer], grads: dict[str, list[tuple]], steps: int,
                desc: str) -> dict[str, list[float]]:
    """Per-step wall times; ``grads[name]`` = [(param, grad)] re-attached before every step (not timed)."""
    times: dict[str, list[float]] = {k: [] for k in optimizers}
    for _ in tqdm(range(steps), desc=desc, unit="step", dynamic_ncols=True):
        for name, opt in optimizers.items():
            for p, g in grads[name]:
                p.grad = g
            sync()
            t0 = time.perf_counter()
            opt.step()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def refresh_study(m: int, n: int, r: int, grad: torch.Tensor | None = None) -> dict:
    """Full SVD vs our randomized range finder vs torch.svd_lowrank on one gradient; captured-energy ratios."""
    grad = layer_gradient(m, n) if grad is None else grad
    side = pj.projection_side(grad.shape, "std")
    out: dict = {"shape": [m, n], "rank": r}
    t0 = time.perf_counter()
    exact, _ = pj.compute_basis(grad, r, side, svd="full")
    out["full_svd_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rand, _ = pj.compute_basis(grad, r, side, svd="randomized", seed=0)
    out["randomized_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    torch.svd_lowrank(grad, q=r, niter=2)
    out["svd_lowrank_s"] = time.perf_counter() - t0
    out["energy_exact"] = pj.captured_energy(grad, exact, side)
    out["energy_randomized"] = pj.captured_energy(grad, rand, side)
    out["energy_ratio"] = out["energy_randomized"] / out["energy_exact"]
    out["speedup"] = out["full_svd_s"] / out["randomized_s"]
    return out


def _galore_torch():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import galore_torch
        return galore_torch
    except ImportError:
        print("galore-torch not installed: its rows are skipped")
        return None


def bench_layer(n: int, r: int, gap: int, steps: int, gt) -> dict:
    """One n x n Linear weight; every optimizer on its own copy of the same weight and gradient."""
    torch.manual_seed(0)
    w0 = torch.randn(n, n) / n**0.5
    grad = layer_gradient(n, n)
    cfg = TrainConfig(rank=r, gap=gap, proj_scale=0.25, svd="randomized", weight_decay=0.0)
    keys = {"rank": r, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"}
    opts, grads, bits = {}, {}, {}

    def param():
        return nn.Parameter(w0.clone())

    p = param()
    opts["torch AdamW"], grads["torch AdamW"], bits["torch AdamW"] = (
        torch.optim.AdamW([p], lr=1e-3, weight_decay=0.0, foreach=True), [(p, grad)], 32)
    for name, cls, b in (("GaLoreAdamW", GaLoreAdamW, 32), ("GaLoreAdamW8bit", GaLoreAdamW8bit, 8)):
        p = param()
        opts[name], grads[name], bits[name] = cls([{"params": [p], **keys}], lr=1e-3, weight_decay=0.0), [(p, grad)], b
    for name, optim, b in (("GradNormLoRP", "adamw", 32), ("GradNormLoRP 8-bit", "adamw8bit", 8)):
        layer = nn.Sequential(nn.Linear(n, n, bias=False))
        with torch.no_grad():
            layer[0].weight.copy_(w0)
        groups = GRADNORMLORP.apply(layer, cfg)
        v, g = layer[0].weight_v, layer[0].weight_g
        opts[name], grads[name], bits[name] = build_optimizer(optim, groups, cfg, 1e-3), [(v, grad), (g, grad[:, 0])], b
    if gt is not None:
        p = param()
        opts["galore-torch"] = gt.GaLoreAdamW([{"params": [p], **keys}], lr=1e-3, weight_decay=0.0,
                                              no_deprecation_warning=True)
        grads["galore-torch"], bits["galore-torch"] = [(p, grad)], 32
    times = round_robin(opts, grads, steps, f"{n}x{n} layer")
    return _rows(opts, times, bits, baseline="torch AdamW", gap=gap)


def bench_model(r: int, gap: int, steps: int, gt, name: str = "minilm", batch: int = 16, length: int = 64) -> dict:
    """The embedded MiniLM classifier: full fine-tuning with each optimizer (GaLore on every encoder Linear)."""
    from leantrain.methods import FULL
    from leantrain.models import build_classifier

    cfg = TrainConfig(rank=r, gap=gap, proj_scale=0.25, svd="randomized", weight_decay=0.0)
    ids = torch.randint(1000, 20000, (batch, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    labels = torch.arange(batch) % 3

    def model_and_grads(method):
        model = build_classifier(name, 3)
        groups = method.apply(model, cfg)
        groups.append({"params": list(model.classifier.parameters()), "name": "head"})
        nn.functional.cross_entropy(model(ids, mask), labels).backward()
        pairs = [(p, p.grad.detach().clone()) for p in model.parameters() if p.grad is not None]
        return model, groups, pairs

    opts, grads, bits, keep = {}, {}, {}, []
    for label, kind, b in (("torch AdamW", "torch", 32), ("GaLoreAdamW", GaLoreAdamW, 32),
                           ("GaLoreAdamW8bit", GaLoreAdamW8bit, 8), ("galore-torch", "gt", 32)):
        if kind == "gt" and gt is None:
            continue
        model, groups, pairs = model_and_grads(FULL)
        keep.append(model)
        if kind == "torch":
            opt = torch.optim.AdamW(groups, lr=1e-4, weight_decay=0.0, foreach=True)
        elif kind == "gt":
            tagged = [{k: v for k, v in g.items() if k != "svd"} for g in galore_groups(groups, cfg)]
            opt = gt.GaLoreAdamW(tagged, lr=1e-4, weight_decay=0.0, no_deprecation_warning=True)
        else:
            opt = kind([{**g, "rank": g.get("rank")} for g in galore_groups(groups, cfg)], lr=1e-4, weight_decay=0.0)
        opts[label], grads[label], bits[label] = opt, pairs, b
    for label, optim, b in (("GradNormLoRP", "adamw", 32), ("GradNormLoRP 8-bit", "adamw8bit", 8)):
        model, groups, pairs = model_and_grads(GRADNORMLORP)
        keep.append(model)
        opts[label], grads[label], bits[label] = build_optimizer(optim, groups, cfg, 1e-4), pairs, b
    times = round_robin(opts, grads, steps, f"{name} model")
    # Randomized-subspace quality on the model's real gradients (every projected matrix).
    ratios = []
    for p, g in grads["GaLoreAdamW"]:
        if p.ndim == 2 and min(p.shape) > r and max(p.shape) < 5000:
            side = pj.projection_side(g.shape, "std")
            exact, _ = pj.compute_basis(g, r, side, svd="full")
            rand, _ = pj.compute_basis(g, r, side, svd="randomized")
            ratios.append(pj.captured_energy(g, rand, side) / max(pj.captured_energy(g, exact, side), 1e-30))
    rows = _rows(opts, times, bits, baseline="torch AdamW", gap=gap)
    rows["energy_ratio_min"] = min(ratios) if ratios else None
    rows["energy_ratio_mean"] = statistics.fmean(ratios) if ratios else None
    return rows


def _rows(opts, times, bits, baseline, gap: int) -> dict:
    """Mean step over one refresh period of ``gap`` steps: measured when ``gap`` steps ran, else estimated as
    (first step, which refreshes, + (gap - 1) x mean of the ordinary steps) / gap."""
    rows = {}
    for name, opt in opts.items():
        t = times[name]
        mean = statistics.fmean(t) if len(t) >= gap else (t[0] + (gap - 1) * statistics.fmean(t[1:])) / gap
        rows[name] = {"state_bytes": state_bytes(opt), "mean_step_ms": 1e3 * mean,
                      "median_step_ms": 1e3 * statistics.median(t[1:] or t), "first_step_ms": 1e3 * t[0],
                      "timed_steps": len(t), "mean_is_estimate": len(t) < gap}
        if name not in ("torch AdamW", "galore-torch"):
            rows[name]["formula_bytes"] = formula_bytes(opt, bits[name])
    base = rows[baseline]["mean_step_ms"]
    ref = rows.get("galore-torch", {}).get("mean_step_ms")
    for row in rows.values():
        row["x_torch_adamw"] = row["mean_step_ms"] / base
        row["x_galore_torch"] = row["mean_step_ms"] / ref if ref else None
    return {"rows": rows}


def print_table(title: str, result: dict) -> None:
    print(f"\n{title}")
    print(f"{'optimizer':<20}{'state MB':>10}{'formula MB':>12}{'mean ms':>10}{'median ms':>11}{'1st ms':>10}"
          f"{'x AdamW':>9}{'x galore-torch':>16}")
    for name, r in result["rows"].items():
        f = r.get("formula_bytes")
        gt = r["x_galore_torch"]
        print(f"{name:<20}{r['state_bytes'] / 2**20:>10.2f}{(f / 2**20 if f else float('nan')):>12.2f}"
              f"{r['mean_step_ms']:>10.1f}{r['median_step_ms']:>11.1f}{r['first_step_ms']:>10.1f}"
              f"{r['x_torch_adamw']:>9.2f}{(gt if gt else float('nan')):>16.2f}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("layer", "model") if k in results]
    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 3.6 * len(panels)), squeeze=False)
    for row, key in zip(axes, panels):
        names = list(results[key]["rows"])
        vals = results[key]["rows"]
        row[0].barh(names, [vals[n]["state_bytes"] / 2**20 for n in names], color="tab:blue")
        row[0].set_xscale("log")
        row[0].set_xlabel("optimizer state (MiB, log)")
        row[0].set_title(f"{results[key]['label']}: state")
        row[1].barh(names, [vals[n]["mean_step_ms"] for n in names], color="tab:orange")
        row[1].set_xlabel("mean optimizer.step() over one refresh period (ms)")
        row[1].set_title(f"{results[key]['label']}: step time (refresh included)")
        for ax in row:
            ax.invert_yaxis()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"\nplot: {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1024x1024, r=32, T=20: a smoke run")
    ap.add_argument("--no-model", action="store_true", help="skip the MiniLM part")
    ap.add_argument("--no-layer", action="store_true", help="skip the refresh study and the single-layer part")
    ap.add_argument("--model-gap", type=int, help="T (= timed steps) for the model part (default: as the layer)")
    ap.add_argument("--steps", type=int, help="timed steps per optimizer (default T; fewer -> the mean over T is "
                    "estimated from the refresh step and the ordinary steps)")
    ap.add_argument("--json", type=Path, help="write the results as JSON here")
    ap.add_argument("--png", type=Path, default=ROOT / "docs" / "img" / "projected.png")
    args = ap.parse_args(argv)
    n, r, gap = (1024, 32, 20) if args.quick else (4096, 128, 200)
    mr, mgap = (8, 20) if args.quick else (128, 200)
    mgap = args.model_gap or mgap
    gt = _galore_torch()
    results: dict = {"config": {"n": n, "rank": r, "gap": gap, "steps": args.steps or gap, "quick": args.quick,
                                "threads": torch.get_num_threads(), "torch": torch.__version__}}
    goals: dict[str, bool] = {}
    if not args.no_layer:
        refresh = refresh_study(n, n, r)
        results["refresh"] = refresh
        print(f"\nrefresh of a {n}x{n} gradient, r={r}: full SVD {refresh['full_svd_s']:.2f} s, randomized "
              f"{refresh['randomized_s']:.3f} s ({refresh['speedup']:.0f}x faster), torch.svd_lowrank(q={r}, "
              f"niter=2) {refresh['svd_lowrank_s']:.3f} s; energy captured: exact top-r "
              f"{refresh['energy_exact']:.4f}, randomized {refresh['energy_randomized']:.4f} "
              f"(ratio {refresh['energy_ratio']:.4f})")
        results["layer"] = {"label": f"{n}x{n} layer, r={r}, T={gap}",
                            **bench_layer(n, r, gap, args.steps or gap, gt)}
        print_table(f"{n}x{n} layer, r={r}, T={gap}: optimizer.step(), {args.steps or gap} timed steps",
                    results["layer"])
        rows = results["layer"]["rows"]
        ours = [k for k in rows if k.startswith(("GaLore", "GradNorm"))]
        goals["state == formula (layer)"] = all(rows[k]["state_bytes"] == rows[k]["formula_bytes"] for k in ours)
        goals["randomized refresh >= 20x faster"] = refresh["speedup"] >= 20
        goals["randomized energy within 2 % of exact"] = refresh["energy_ratio"] >= 0.98
        goals["GaLoreAdamW mean step <= 1.3x torch AdamW"] = rows["GaLoreAdamW"]["x_torch_adamw"] <= 1.3
        if "galore-torch" in rows:
            goals["GaLoreAdamW mean step <= 0.5x galore-torch"] = rows["GaLoreAdamW"]["x_galore_torch"] <= 0.5
    if not args.no_model:
        model = "tiny" if args.quick else "minilm"
        results["model"] = {"label": f"{model} classifier, r={mr}, T={mgap}",
                            **bench_model(mr, mgap, min(args.steps or mgap, mgap), gt, name=model)}
        print_table(f"{model} classifier (full fine-tuning), r={mr}, T={mgap}: optimizer.step(), "
                    f"{min(args.steps or mgap, mgap)} timed steps", results["model"])
        print(f"randomized/exact captured energy over the model's matrices: min "
              f"{results['model']['energy_ratio_min']:.4f}, mean {results['model']['energy_ratio_mean']:.4f}")
        mrows = results["model"]["rows"]
        goals["state == formula (model)"] = all(mrows[k]["state_bytes"] == mrows[k]["formula_bytes"]
                                                for k in mrows if "formula_bytes" in mrows[k])
    results["goals"] = goals
    print("\ngoals:")
    for k, ok in goals.items():
        print(f"  [{'met' if ok else 'NOT met'}] {k}")
    plot(results, args.png)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

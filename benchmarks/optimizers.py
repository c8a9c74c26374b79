"""Step time and state memory of 8-/4-bit optimizers vs torch AdamW, bitsandbytes and torchao, in one process.

    .venv/bin/python benchmarks/optimizers.py [--quick] [--json PATH] [--png PATH] [--threads N] [--no-peers]
        [--no-compiled] [--fresh-compile-cache]

Workloads: one 4096x4096 fp32 parameter with a fixed random gradient ("matrix"), and the parameters of
``leantrain.models.build_classifier("minilm", 3)`` with random gradients ("minilm"). Each optimizer starts from the
same weights and gradients, runs ``--warmup`` steps, then ``--steps`` timed steps; we report the median.
State bytes count every tensor in ``optimizer.state`` (codes, absmax, fp32 moments of small tensors, step).
The "(compiled)" rows use ``compile=True`` (one fused torch.compile kernel, leantrain/optim/compiled.py); their
first step includes compilation, reported separately ("first step"); ``--fresh-compile-cache`` points inductor at
an empty cache directory so that number is a cold compile.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leantrain.optim import AdamW4bit, AdamW8bit


def state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if not isinstance(v, torch.Tensor):
                continue
            inner = [getattr(v, a) for a in ("codes", "scale", "qmap") if isinstance(getattr(v, a, None), torch.Tensor)]
            if inner:  # torchao keeps its state in tensor subclasses (codes + scale [+ a shared qmap])
                total += sum(t.numel() * t.element_size() for t in inner[:2])
            else:
                total += v.numel() * v.element_size()
    return total


def peers() -> dict[str, Callable]:
    out: dict[str, Callable] = {}
    try:
        import bitsandbytes as bnb

        out["bitsandbytes AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3)
    except Exception as exc:  # noqa: BLE001 - a missing/broken peer is reported, not fatal
        print(f"(bitsandbytes unavailable: {exc})")
    try:
        from torchao.optim import AdamW8bit as AoAdamW8bit

        out["torchao AdamW8bit"] = lambda ps: AoAdamW8bit(ps, lr=1e-3)
    except Exception as exc:  # noqa: BLE001
        print(f"(torchao unavailable: {exc})")
    return out


def _warm(make: Callable, params0: list[torch.Tensor], grads: list[torch.Tensor],
          warmup: int) -> tuple[torch.optim.Optimizer, float]:
    """A fresh optimizer on copies of the parameters, stepped ``warmup`` times; returns it and its first step (s)."""
    params = [torch.nn.Parameter(p.clone()) for p in params0]
    for p, g in zip(params, grads):
        p.grad = g
    opt = make(params)
    first = first_step(opt)  # includes compilation for the compiled rows
    for _ in range(max(0, warmup - 1)):
        opt.step()
    return opt, first


def time_opt(make: Callable, params0: list[torch.Tensor], grads: list[torch.Tensor], warmup: int,
             steps: int) -> tuple[float, int, float]:
    opt, first = _warm(make, params0, grads, warmup)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, state_bytes(opt), first


def time_interleaved(makers: dict[str, Callable], params0: list[torch.Tensor], grads: list[torch.Tensor],
                     warmup: int, steps: int) -> dict[str, tuple[float, int, float] | Exception]:
    """All optimizers built first, then timed round-robin (one step each per round): on a shared machine whose
    load drifts, every optimizer sees the same mix of quiet and busy moments, so the ratios stay meaningful."""
    live, out = {}, {}
    for name, make in makers.items():
        try:
            opt, first = _warm(make, params0, grads, warmup)
            live[name] = (opt, first, [])
        except Exception as exc:  # noqa: BLE001 - e.g. a peer without a CPU kernel
            out[name] = exc
    for _ in range(steps):
        for opt, _, times in live.values():
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
    for name, (opt, first, times) in live.items():
        out[name] = (statistics.median(times) * 1e3, state_bytes(opt), first)
    return {name: out[name] for name in makers}


def first_step(opt: torch.optim.Optimizer) -> float:
    t0 = time.perf_counter()
    opt.step()
    return time.perf_counter() - t0


def workloads(quick: bool, wanted: set[str]) -> dict[str, list[torch.Tensor]]:
    n = 1024 if quick else 4096
    out = {}
    if "matrix" in wanted:
        out[f"matrix {n}x{n}"] = [torch.randn(n, n, generator=torch.Generator().manual_seed(0))]
    if not quick and "minilm" in wanted:
        try:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from leantrain.models import build_classifier

            out["minilm"] = [p.detach().clone() for p in build_classifier("minilm", 3).parameters()]
        except Exception as exc:  # noqa: BLE001
            print(f"(minilm workload skipped: {exc})")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1024x1024 matrix only, few steps (smoke test)")
    ap.add_argument("--json", type=Path, help="write the results as JSON here")
    ap.add_argument("--png", type=Path, help="write a bar chart here (e.g. docs/img/optimizers.png)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per optimizer (default 10, quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3, quick 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--no-peers", action="store_true", help="skip bitsandbytes and torchao")
    ap.add_argument("--no-compiled", action="store_true", help="skip the compile=True rows")
    ap.add_argument("--interleave", action="store_true",
                    help="build all optimizers, then time them round-robin (robust ratios under drifting load)")
    ap.add_argument("--fresh-compile-cache", action="store_true",
                    help="empty inductor cache dir, so the compiled rows' first step is a cold compile")
    ap.add_argument("--workloads", default="matrix,minilm", help="comma-separated subset of: matrix, minilm")
    ap.add_argument("--peer-workloads", default="matrix,minilm",
                    help="workloads on which the peers run (torchao compiles once per shape: slow on minilm)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fresh_compile_cache:
        import tempfile

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-bench-")
    steps = args.steps or (3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    makers: dict[str, Callable] = {
        "torch AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "torch AdamW (fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "leantrain AdamW8bit": lambda ps: AdamW8bit(ps, lr=1e-3),
        "leantrain AdamW4bit": lambda ps: AdamW4bit(ps, lr=1e-3),
    }
    if not args.no_compiled:
        makers["leantrain AdamW8bit (compiled)"] = lambda ps: AdamW8bit(ps, lr=1e-3, compile=True)
        makers["leantrain AdamW4bit (compiled)"] = lambda ps: AdamW4bit(ps, lr=1e-3, compile=True)
    if not args.no_peers:
        makers.update(peers())
    rows = []
    load_before = os.getloadavg()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    wanted = set(args.workloads.split(","))
    peer_ok = set(args.peer_workloads.split(","))
    for wname, params0 in workloads(args.quick, wanted).items():
        g = torch.Generator().manual_seed(1)
        grads = [torch.randn(p.shape, generator=g) * 1e-2 for p in params0]
        numel = sum(p.numel() for p in params0)
        kind = wname.split()[0]
        todo = [(k, v) for k, v in makers.items() if k.startswith(("torch ", "leantrain ")) or kind in peer_ok]
        if args.interleave:
            results = time_interleaved(dict(todo), params0, grads, warmup, steps)
        else:
            results = {}
            for oname, make in (todo if tqdm is None else tqdm(todo, desc=wname, leave=False)):
                try:
                    results[oname] = time_opt(make, params0, grads, warmup, steps)
                except Exception as exc:  # noqa: BLE001 - e.g. a peer without a CPU kernel
                    results[oname] = exc
        for oname, res in results.items():
            if isinstance(res, Exception):
                print(f"{oname} on {wname} failed: {type(res).__name__}: {res}")
                continue
            ms, nbytes, first = res
            rows.append({"workload": wname, "optimizer": oname, "ms_per_step": ms,
                         "state_bytes_per_param": nbytes / numel, "numel": numel, "first_step_s": first})
    print_table(rows)
    load = {"before": load_before, "after": os.getloadavg()}  # 1/5/15-minute load averages: a shared machine
    print("load average (1, 5, 15 min) before: {:.2f} {:.2f} {:.2f}; after: {:.2f} {:.2f} {:.2f}".format(
        *load["before"], *load["after"]))
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "steps": steps, "warmup": warmup,
            "interleave": args.interleave, "load_average": load,
            "command": " ".join(["benchmarks/optimizers.py", *(argv if argv is not None else sys.argv[1:])])}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        os.replace(tmp, args.json)
    if args.png:
        plot(rows, args.png)
    return 0


def print_table(rows: list[dict]) -> None:
    for w in dict.fromkeys(r["workload"] for r in rows):
        sub = [r for r in rows if r["workload"] == w]
        ref = next((r["ms_per_step"] for r in sub if r["optimizer"] == "torch AdamW (foreach)"), None)
        peer = {r["optimizer"]: r["ms_per_step"] for r in sub if "bitsandbytes" in r["optimizer"]
                or "torchao" in r["optimizer"]}
        print(f"\n{w} ({sub[0]['numel'] / 1e6:.2f} M params)")
        head = f"| {'optimizer':<30} | {'ms/step':>8} | {'x foreach':>9} | {'bytes/param':>11} |"
        for p in peer:
            head += f" {'speedup vs ' + p.split()[0]:>24} |"
        print(head)
        print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
        for r in sub:
            line = (f"| {r['optimizer']:<30} | {r['ms_per_step']:8.1f} | "
                    f"{(r['ms_per_step'] / ref if ref else float('nan')):9.2f} | {r['state_bytes_per_param']:11.3f} |")
            for pms in peer.values():
                line += f" {pms / r['ms_per_step']:24.2f} |"
            print(line)
        firsts = [f"{r['optimizer']} {r['first_step_s']:.1f} s" for r in sub if "compiled" in r["optimizer"]]
        if firsts:
            print("first step incl. compilation: " + "; ".join(firsts))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    works = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(len(works), 2, figsize=(11, 3.2 * len(works)), squeeze=False)
    for i, w in enumerate(works):
        sub = [r for r in rows if r["workload"] == w]
        names = [r["optimizer"] for r in sub]
        axes[i][0].barh(names, [r["ms_per_step"] for r in sub], color="tab:blue")
        axes[i][0].set_xlabel("ms / step (lower is better)")
        axes[i][0].set_title(w)
        axes[i][1].barh(names, [r["state_bytes_per_param"] for r in sub], color="tab:orange")
        axes[i][1].set_xlabel("state bytes / parameter")
        axes[i][1].set_yticklabels([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())

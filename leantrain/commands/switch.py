"""``leantrain switch``: rapid adapter switching demo with SHiRA in fused mode (arXiv 2407.16712).

Builds a model (a stack of ``--layers`` Linear(dim, dim), or ``--model minilm|tiny``), puts N SHiRA adapters on
it (random values, or loaded from ``--adapter DIR`` folders), then cycles through them: each switch restores the
previous adapter's K entries (bit-exact, from the saved originals) and scatters the next one's values into the
base weights. Prints the time of each phase and checks at the end that the base weights are bit-identical to the
originals.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "switch", help="demo: load N SHiRA adapters and switch among them in fused mode, timed",
        description="Load N SHiRA adapters and switch among them by scatter / restore of their entries.")
    parser.add_argument("--model", default="stack", help="'stack' (Linear layers, see --layers/--dim), "
                                                         "'minilm' or 'tiny' (default: stack)")
    parser.add_argument("--layers", type=int, default=24, help="Linear layers of the stack model (default 24)")
    parser.add_argument("--dim", type=int, default=2048, help="width of the stack model (default 2048)")
    parser.add_argument("--num-adapters", type=int, default=3, help="random adapters to create (default 3)")
    parser.add_argument("--adapter", action="append", default=[], metavar="DIR",
                        help="load a saved SHiRA adapter folder instead (repeatable)")
    parser.add_argument("--rank", type=int, default=16, help="SHiRA r: K = r*(out+in) entries per layer")
    parser.add_argument("--fraction", type=float, default=None, help="share of each matrix instead of --rank")
    parser.add_argument("--mask", default="random", choices=["random", "magnitude"],
                        help="mask of the created adapters (default random)")
    parser.add_argument("--rounds", type=int, default=3, help="passes over all adapters (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the timings as JSON")
    parser.set_defaults(func=run)


def build_stack(layers: int, dim: int, seed: int = 0) -> nn.Sequential:
    """The benchmark model: ``layers`` bias-free Linear(dim, dim) (no activation: weights are what we time)."""
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(dim, dim, bias=False) for _ in range(layers)])


def build_model(name: str, layers: int, dim: int, seed: int = 0) -> nn.Module:
    if name == "stack":
        if layers <= 0 or dim <= 0:
            raise ValueError(f"--layers={layers} and --dim={dim} must be > 0")
        return build_stack(layers, dim, seed)
    from ..models import build_classifier

    return build_classifier(name, 3, seed)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith("base_layer.weight")}


def switch_demo(model: nn.Module, names: list[str], rounds: int) -> dict:
    """Cycle through ``names`` in fused mode; return timings (ms) and whether the restore was bit-exact."""
    from .. import adapters

    original = _snapshot(model)
    applies, removes = [], []
    for _ in range(rounds):
        for name in names:
            t0 = time.perf_counter()
            adapters.merge(model, [name])
            t1 = time.perf_counter()
            adapters.unmerge(model)
            t2 = time.perf_counter()
            applies.append((t1 - t0) * 1e3)
            removes.append((t2 - t1) * 1e3)
    t0 = time.perf_counter()
    adapters.merge(model, names)  # multi-adapter fusion: all at once
    fuse = (time.perf_counter() - t0) * 1e3
    adapters.unmerge(model)
    after = _snapshot(model)
    exact = all(torch.equal(original[k], after[k]) for k in original)
    med = lambda xs: sorted(xs)[len(xs) // 2]
    return {"adapters": names, "switches": len(applies), "apply_ms_median": med(applies),
            "remove_ms_median": med(removes), "fuse_all_ms": fuse, "bit_exact_restore": exact}


@torch.no_grad()
def run(args: argparse.Namespace) -> int:
    from .. import adapters
    from ..adapters.shira import ShiraConfig

    if args.num_adapters <= 0 and not args.adapter:
        raise ValueError(f"--num-adapters={args.num_adapters} must be > 0 (or pass --adapter DIR)")
    if args.rounds <= 0:
        raise ValueError(f"--rounds={args.rounds} must be > 0")
    model = build_model(args.model, args.layers, args.dim, args.seed)
    targets = "all-linear"
    t0 = time.perf_counter()
    names = []
    if args.adapter:
        for i, folder in enumerate(args.adapter):
            names.append(f"a{i}")
            adapters.load(model, folder, name=names[-1])
    else:
        for i in range(args.num_adapters):
            names.append(f"a{i}")
            config = ShiraConfig(r=args.rank, fraction=args.fraction, mask=args.mask, target_modules=targets,
                                 seed=args.seed + i, init_weights=False)
            adapters.inject(model, config, name=names[-1])
    create_ms = (time.perf_counter() - t0) * 1e3
    layers = len(list(adapters.adapter_layers(model)))
    result = {"model": args.model, "layers_adapted": layers, "create_ms_total": create_ms,
              **switch_demo(model, names, args.rounds)}
    print(f"{len(names)} SHiRA adapters on {layers} layers of {args.model!r} (created in {create_ms:.0f} ms)")
    print(f"  switch = apply (scatter K entries) + remove (restore them), {result['switches']} switches")
    print(f"  apply  median {result['apply_ms_median']:8.2f} ms")
    print(f"  remove median {result['remove_ms_median']:8.2f} ms")
    print(f"  fuse all {len(names)} at once {result['fuse_all_ms']:8.2f} ms")
    print(f"  base weights bit-exact after all switches: {result['bit_exact_restore']}")
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["bit_exact_restore"] else 1

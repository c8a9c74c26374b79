"""Optimizers II side by side: AdamW, AdamW8bit, GaLore, 8-bit GaLore, Muon, Muon8bit, Adam-mini, APOLLO,
APOLLO-Mini, Fira, Flora -- and the peer implementations (torch.optim.Muon, adam-mini, apollo-torch, fira,
flora-opt) driven by the same trainer on the same batches -- on tiny-LLaMA pre-training and on the main job.

    .venv/bin/python benchmarks/optimizers2.py PHASE [--out runs/bench_optim2] [--quick] [--json PATH]

Phases (each reuses finished runs: the experiment engine caches by config hash, so an interrupted phase resumes):

* ``sweep``: tiny LLaMA from scratch (the must-show command: ``--init-weights scratch --arch llama --preset tiny
  --method full --steps 60``; validation on 200 evenly spaced blocks instead of 817, which leaves training
  unchanged), every optimizer at lr 1e-3, 3e-3, 1e-2, seed 0;
* ``seeds``: each optimizer at its best sweep lr (lowest final training loss) with seeds 1 and 2;
* ``peers``: each peer at the best lr of its leantrain counterpart, seeds 0-2 (``train_with_peer``: the trainer
  with its optimizer replaced by the peer's over the same param groups);
* ``qgalore``: GaLore at its best sweep lr and --gap 10: plain, Q-GaLore's int4 projector, lazy refresh
  (threshold 0.4, k = 2), both;
* ``main``: the main job (``make run``: LoRA on MiniLM, the bundled sentiment data), ``--main-steps`` steps, each
  optimizer at every ``--main-lrs`` learning rate, seed 0;
* ``main-seeds``: each optimizer at its best main-job lr (lowest seed-0 validation loss) with seeds 1 and 2;
* ``main-peers``: each peer on the main job at its counterpart's best main-job lr, seeds 0-2;
* ``table`` (default): print both tables, write docs/img/optimizers2.png and (``--json``) the rows.

Runs share this process (``--isolate``: one process each, which adds ~20 s of imports and data loading per run
on the shared 2-core machine); OMP_NUM_THREADS=1 / ``torch.set_num_threads`` (``--threads``). Optimizer-state bytes count every tensor in
``optimizer.state``, including tensors held inside a peer's state objects (GaLore-style projector objects).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

import torch

from leantrain.atomic import write_text_atomic
from leantrain.experiments import Column, Experiment, Panel, format_table, plot_panels, run_experiments

ROOT = Path(__file__).resolve().parents[1]
RUNNER = f"{Path(__file__).resolve()}:train_with_peer"
OURS = ["adamw", "adamw8bit", "galore-adamw", "galore-adamw8bit", "muon", "muon8bit", "adam-mini", "apollo",
        "apollo-mini", "fira", "flora"]
# peer label -> the leantrain optimizer it is the reference of (its lr and its options)
PEERS = {"torch.optim.Muon": "muon", "adam_mini.Adam_mini": "adam-mini", "apollo_torch (APOLLO)": "apollo",
         "apollo_torch (APOLLO-Mini)": "apollo-mini", "fira.FiraAdamW": "fira", "flora_opt.Flora": "flora"}
LRS = [1e-3, 3e-3, 1e-2]
MAIN_LRS = [5e-4, 2e-3, 8e-3]  # LoRA's default lr, 4x and 16x it (APOLLO's best was 8e-3: docs/optimizers2.md)
# Q-GaLore's options of the GaLore family (--extra), next to plain GaLore at its best lr
# (gap 10, so 60 steps see refreshes at 1, 11, ..., 51 and the lazy rule, k = 2, has something to skip)
QGALORE = {"plain": {}, "int4 projector": {"proj_bits": 4}, "lazy refresh 0.4": {"lazy_refresh_cos": 0.4,
           "lazy_refresh_k": 2}, "int4 + lazy": {"proj_bits": 4, "lazy_refresh_cos": 0.4, "lazy_refresh_k": 2}}
QGALORE_GAP = 10
TINY = {"task": "causal-lm", "init_weights": "scratch", "arch": "llama", "preset": "tiny", "method": "full",
        "steps": 60, "val_size": 200, "progress": False, "save_every": 0}
MAIN = {"progress": False, "save_every": 0}  # the README's `leantrain train`: LoRA, MiniLM, bundled data
QUICK = {"preset": "nano", "steps": 3, "train_size": 64, "val_size": 8, "max_length": 16, "batch_size": 4}
QUICK_MAIN = {"model": "tiny", "train_size": 96, "val_size": 48, "max_length": 24, "batch_size": 8, "steps": 2}
MIB = 2.0**-20


# --- the runner (inside each run's own process) -----------------------------------------------------------------

class Joint(torch.optim.Optimizer):
    """Peer optimizers stepped as one: the closure runs here under ``enable_grad`` (the trainer's contract; some
    peers call it under their own ``no_grad``), then each part steps (torch Muon for the matrices + torch AdamW
    for the rest, or one peer alone)."""

    def __init__(self, *parts: torch.optim.Optimizer) -> None:
        self.parts = parts
        self.param_groups = [g for part in parts for g in part.param_groups]
        self.defaults = parts[0].defaults
        self.state = {}

    def step(self, closure: Any = None) -> Any:
        with torch.enable_grad():
            loss = closure() if closure is not None else None
        for part in self.parts:
            part.step()
        self.state = {k: v for part in self.parts for k, v in part.state.items()}
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)


def _muon_peer(groups: list[dict], cfg: Any, lr: float) -> torch.optim.Optimizer:
    from leantrain.optim.muon import muon_groups

    mats = [{**g, "params": [p for p in g["params"] if p.ndim >= 2]} for g in muon_groups(groups) if g["muon"]]
    rest = [{**g, "params": [p for p in g["params"] if not (g["muon"] and p.ndim >= 2)]} for g in muon_groups(groups)]
    clean = [{k: v for k, v in g.items() if k not in ("muon", "name")} for g in mats if g["params"]]
    other = [{k: v for k, v in g.items() if k not in ("muon", "name")} for g in rest if g["params"]]
    return Joint(torch.optim.Muon(clean, lr=lr, momentum=0.95, nesterov=True, weight_decay=cfg.weight_decay,
                                 adjust_lr_fn="match_rms_adamw"),
                torch.optim.AdamW(other, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay))


def _apollo_peer(groups: list[dict], cfg: Any, lr: float, mini: bool) -> torch.optim.Optimizer:
    from apollo_torch import APOLLOAdamW

    from leantrain.optim.apollo import apollo_groups

    rank, scale, kind = (1, 128.0, "tensor") if mini else (cfg.rank, 1.0, "channel")
    out = []
    for g in apollo_groups(groups, rank, cfg.gap, scale):
        base = {"params": g["params"], "lr": g.get("lr", lr)}
        if g["rank"] is None:
            out.append(base)
            continue
        mats = [p for p in g["params"] if p.ndim == 2]
        out.append({**base, "params": mats, "rank": rank, "proj": "random", "proj_type": "std", "scale_type": kind,
                    "scale": scale, "update_proj_gap": cfg.gap})
        if len(mats) < len(g["params"]):
            out.append({"params": [p for p in g["params"] if p.ndim != 2], "lr": g.get("lr", lr)})
    return APOLLOAdamW(out, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def _fira_peer(groups: list[dict], cfg: Any, lr: float) -> torch.optim.Optimizer:
    from fira import FiraAdamW

    from leantrain.optim.apollo import apollo_groups

    out = []
    for g in apollo_groups(groups, cfg.rank, cfg.gap, 1.0):
        mats = [p for p in g["params"] if p.ndim == 2] if g["rank"] is not None else []
        rest = [p for p in g["params"] if not (g["rank"] is not None and p.ndim == 2)]
        if mats:
            out.append({"params": mats, "lr": g.get("lr", lr), "rank": cfg.rank, "update_proj_gap": cfg.gap,
                        "alpha": 1.0, "proj_type": "std"})
        if rest:
            out.append({"params": rest, "lr": g.get("lr", lr)})
    return FiraAdamW(out, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def peer_optimizer(peer: str, groups: list[dict], cfg: Any, lr: float, model: Any) -> torch.optim.Optimizer:
    """The peer's optimizer over the run's groups, set up as leantrain's builder sets up its counterpart."""
    if peer == "torch.optim.Muon":
        return _muon_peer(groups, cfg, lr)
    if peer.startswith("apollo_torch"):
        return _apollo_peer(groups, cfg, lr, mini="Mini" in peer)
    if peer == "fira.FiraAdamW":
        return _fira_peer(groups, cfg, lr)
    if peer == "flora_opt.Flora":
        from flora_opt.optimizers.torch import Flora

        params = [p for g in groups for p in g["params"]]
        return Flora(params, lr=lr, rank=cfg.rank, kappa=cfg.gap, beta1=0.9, weight_decay=cfg.weight_decay,
                     scale_parameter=False)
    if peer == "adam_mini.Adam_mini":
        from adam_mini import Adam_mini

        from leantrain.run import attention_config

        conf = attention_config(model)
        return Adam_mini(named_parameters=list(model.named_parameters()), lr=lr, betas=cfg.betas,
                         weight_decay=cfg.weight_decay, dim=conf.hidden_size, n_heads=conf.num_attention_heads,
                         n_kv_heads=getattr(conf, "num_key_value_heads", None), verbose=False)
    raise ValueError(f"unknown peer {peer!r}; choose one of {', '.join(PEERS)}")


def deep_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``opt.state``, including tensors held by state objects (a peer's projector)."""
    def size(v: Any) -> int:
        if isinstance(v, torch.Tensor):
            return v.numel() * v.element_size()
        if hasattr(v, "__dict__") and not isinstance(v, type):
            return sum(size(x) for x in vars(v).values())
        return 0

    return sum(size(v) for st in opt.state.values() for v in st.values())


def train_with_peer(cfg: Any) -> dict[str, Any]:
    """``leantrain.train`` -- with the optimizer of ``cfg.extra["peer"]`` when set -- plus the deep state bytes."""
    import importlib

    run_module = importlib.import_module("leantrain.run")
    train_module = importlib.import_module("leantrain.train")
    peer = cfg.extra.get("peer")
    build, captured = run_module.build_optimizer_for, {}

    def patched(cfg_: Any, groups: list[dict], lr: float, method: Any = None, model: Any = None) -> Any:
        opt = Joint(peer_optimizer(peer, groups, cfg_, lr, model)) if peer else build(cfg_, groups, lr, method, model)
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
        captured["opt"] = opt
        return opt

    run_module.build_optimizer_for = patched
    try:
        metrics = train_module.train(cfg)
    finally:
        run_module.build_optimizer_for = build
    states = [st for st in captured["opt"].state.values() if "proj_refreshes" in st]
    refreshes = sum(int(st["proj_refreshes"]) for st in states) / len(states) if states else None
    return {**metrics, "optimizer_state_bytes": deep_state_bytes(captured["opt"]), "projector_refreshes": refreshes}


# --- the grids --------------------------------------------------------------------------------------------------

def _exp(part: str, label: str, optim: str, lr: float | None, seed: int, peer: str | None = None,
         extra: dict | None = None) -> Experiment:
    over: dict[str, Any] = {"optim": optim, "seed": seed, **({} if lr is None else {"lr": lr})}
    if peer or extra:
        over["extra"] = {**({"peer": peer} if peer else {}), **(extra or {})}
    slug = label.replace(" ", "").replace("(", "-").replace(")", "").replace(".", "_")
    lr_tag = "default" if lr is None else f"{lr:g}"
    return Experiment(f"{part}_{slug}_lr{lr_tag}_s{seed}", over, group=f"{label} @ {lr_tag}",
                      tags={"opt": label, "lr_label": lr_tag, "seed": seed, "peer": bool(peer)})


def best_lrs(rows: list[dict]) -> dict[str, float]:
    """Per optimizer, the sweep lr with the lowest seed-0 final training loss (ties: the lower lr)."""
    best: dict[str, tuple[float, float]] = {}
    for r in rows:
        if (r.get("part") != "tiny" or "error" in r or r.get("peer") or r.get("seed") != 0
                or r.get("train_loss_last") is None):
            continue
        key = (r["train_loss_last"], r["lr"])
        if r["opt"] not in best or key < best[r["opt"]]:
            best[r["opt"]] = key
    return {k: v[1] for k, v in best.items()}


def best_main_lrs(rows: list[dict]) -> dict[str, float]:
    """Per optimizer, the main-job lr with the lowest seed-0 validation loss (ties: the lower lr)."""
    best: dict[str, tuple[float, float]] = {}
    for r in rows:
        if r.get("part") != "main" or "error" in r or r.get("seed") != 0 or r.get("val_loss") is None:
            continue
        key = (r["val_loss"], r["lr"])
        if r["opt"] not in best or key < best[r["opt"]]:
            best[r["opt"]] = key
    return {k: v[1] for k, v in best.items()}


def grid(phase: str, rows: list[dict], seeds: list[int], lrs: list[float] = LRS,
         main_lrs: list[float] = MAIN_LRS) -> list[Experiment]:
    if phase == "sweep":
        return [_exp("tiny", o, o, lr, 0) for o in OURS for lr in lrs]
    best = best_lrs(rows)
    if phase == "seeds":
        return [_exp("tiny", o, o, best[o], s) for o in OURS if o in best for s in seeds if s != 0]
    if phase == "peers":
        return [_exp("tiny", p, o, best[o], s, peer=p) for p, o in PEERS.items() if o in best for s in seeds]
    if phase == "qgalore":
        return [Experiment(e.name, {**e.overrides, "gap": QGALORE_GAP}, e.group, e.tags)
                for e in (_exp("qgalore", f"galore-adamw {k}", "galore-adamw", best["galore-adamw"], 0, extra=v)
                          for k, v in QGALORE.items())]
    order = [*OURS[4:], "adamw", "adamw8bit", "galore-adamw", "galore-adamw8bit"]  # the new optimizers first
    if phase == "main":
        return [_exp("main", o, o, lr, 0) for o in order for lr in main_lrs]
    if phase == "main-seeds":
        best_main = best_main_lrs(rows)
        return [_exp("main", o, o, best_main[o], s) for o in order if o in best_main for s in seeds if s != 0]
    if phase == "main-peers":
        best_main = best_main_lrs(rows)
        return [_exp("main", p, o, best_main[o], s, peer=p) for p, o in PEERS.items() if o in best_main
                for s in seeds]
    raise ValueError(f"unknown phase {phase!r}")


# --- tables and plot --------------------------------------------------------------------------------------------

def _ratio(rows: list[dict], key: str, label: str) -> float | None:
    ref = [r[key] for r in rows if r.get("opt") == label and "error" not in r and r.get(key) is not None]
    return statistics.mean(ref) if ref else None


def tiny_table(rows: list[dict]) -> str:
    best = best_lrs(rows)
    chosen = [r for r in rows if r.get("part") == "tiny" and "error" not in r
              and (r.get("lr") == best.get(PEERS.get(r["opt"], r["opt"])))]
    adamw = _ratio(chosen, "train_loss_last", "adamw")
    a8 = _ratio(chosen, "optimizer_state_bytes", "adamw8bit")
    return format_table(chosen, [
        Column("optimizer", "opt"), Column("lr", "lr", "g"), Column("seeds", "seed", combine="each", sep=","),
        Column("final train loss", "train_loss_last", ".3f"),
        Column("vs AdamW", lambda r: r["train_loss_last"] / adamw - 1, "+.1%"),
        Column("val loss", "val_loss", ".3f"),
        Column("state MiB", "optimizer_state_bytes", ".2f", MIB),
        Column("state vs AdamW8bit", lambda r: r["optimizer_state_bytes"] / a8, ".2f", suffix="x"),
        Column("s/step", "sec_per_step", ".3f")])


def sweep_table(rows: list[dict]) -> str:
    sweep = sorted((r for r in rows if r.get("part") == "tiny" and not r.get("peer") and r.get("seed") == 0),
                   key=lambda r: (OURS.index(r["opt"]) if r["opt"] in OURS else 99, r.get("lr") or 0))
    return format_table(sweep, [Column("optimizer", "opt"), Column("lr", "lr", "g"),
                                Column("final train loss (seed 0)", "train_loss_last", ".3f")],
                        group_key="name")


def qgalore_table(rows: list[dict]) -> str:
    """Plain GaLore (sweep, seed 0, best lr) and its Q-GaLore options."""
    best = best_lrs(rows).get("galore-adamw")
    plain = [r for r in rows if r.get("part") == "tiny" and r.get("opt") == "galore-adamw" and not r.get("peer")
             and r.get("seed") == 0 and r.get("lr") == best]
    return format_table(plain + [r for r in rows if r.get("part") == "qgalore"], [
        Column("GaLore (fp32 moments)", "opt"), Column("lr", "lr", "g"), Column("gap", "gap"),
        Column("refreshes per matrix", "projector_refreshes", ".1f"),
        Column("final train loss", "train_loss_last", ".3f"), Column("val loss", "val_loss", ".3f"),
        Column("state bytes (incl. projectors)", "optimizer_state_bytes", ","), Column("s/step", "sec_per_step", ".3f")])


def main_sweep_table(rows: list[dict]) -> str:
    sweep = sorted((r for r in rows if r.get("part") == "main" and r.get("seed") == 0),
                   key=lambda r: (OURS.index(r["opt"]) if r["opt"] in OURS else 99, r.get("lr") or 0))
    return format_table(sweep, [Column("optimizer", "opt"), Column("lr", "lr", "g"),
                                Column("val loss (seed 0)", "val_loss", ".4f"),
                                Column("val acc (seed 0)", "val_accuracy", ".4f")], group_key="name")


def main_table(rows: list[dict]) -> str:
    """The main job at each optimizer's best lr: mean (and sd) over the seeds run."""
    best = best_main_lrs(rows)
    main = [r for r in rows if r.get("part") == "main" and r.get("lr") == best.get(PEERS.get(r["opt"], r["opt"]))]
    return format_table(main, [
        Column("optimizer", "opt"), Column("best lr", "lr", "g"), Column("seeds", "seed", combine="each", sep=","),
        Column("val acc", "val_accuracy", ".4f"), Column("val loss", "val_loss", ".4f"),
        Column("final train loss", "train_loss_last", ".3f"),
        Column("state MiB", "optimizer_state_bytes", ".3f", MIB), Column("s/step", "sec_per_step", ".3f")])


def plot(rows: list[dict], path: Path) -> None:
    """Final loss vs state (a point per optimizer / peer, mean over seeds) and the seed-0 loss curves."""
    best = best_lrs(rows)
    chosen = [r for r in rows if r.get("part") == "tiny" and "error" not in r
              and r.get("lr") == best.get(PEERS.get(r["opt"], r["opt"]))]
    plot_panels(chosen, path, [
        Panel("scatter", "tiny LLaMA, 60 steps: final training loss vs optimizer state (best lr, mean over the seeds run)",
              y=("train_loss_last",), x=("optimizer_state_bytes",), scale=MIB, xlabel="optimizer state (MiB)",
              ylabel="final training loss")], size=(8, 5.5))
    curves = [r for r in chosen if r.get("seed") == 0 and not r.get("peer")]
    plot_panels(curves, path.with_name(path.stem + "_curves.png"), [
        Panel("curve", "tiny LLaMA: training loss (seed 0, best lr)", xlabel="step", ylabel="cross-entropy")],
        size=(8, 5))


# --- main -------------------------------------------------------------------------------------------------------

def load_rows(out: Path) -> list[dict]:
    path = out / "rows.json"
    return json.loads(path.read_text()) if path.is_file() else []


def run_phase(phase: str, args: argparse.Namespace, rows: list[dict]) -> list[dict]:
    seeds = [int(s) for s in args.seeds.split(",")]
    todo = grid(phase, rows, seeds, [float(x) for x in args.lrs.split(",")],
                [float(x) for x in args.main_lrs.split(",")])
    if args.only:
        keep = set(args.only.split(","))
        todo = [e for e in todo if PEERS.get(e.tags["opt"], e.tags["opt"]) in keep or phase == "qgalore"]
    part = {"main": "main", "main-seeds": "main", "main-peers": "main", "qgalore": "qgalore"}.get(phase, "tiny")
    base = ({**MAIN, **(QUICK_MAIN if args.quick else {"steps": args.main_steps})} if part == "main"
            else {**TINY, **(QUICK if args.quick else {})})
    env = {"OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    runner = RUNNER if args.isolate else train_with_peer
    results = run_experiments(todo, args.out, base=base, runner=runner, isolate=args.isolate, env=env, desc=phase)
    new = [{**r.row(), "part": part} for r in results]
    names = {r["name"] for r in new}
    rows = [r for r in rows if r["name"] not in names] + new
    write_text_atomic(args.out / "rows.json", json.dumps(rows, indent=1, default=str) + "\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("phase", nargs="?", default="table",
                    choices=["sweep", "seeds", "peers", "qgalore", "main", "main-seeds", "main-peers", "table"])
    ap.add_argument("--out", type=Path, default=None, help="run folders (default: runs/bench_optim2[-quick])")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the seeds/peers/main phases")
    ap.add_argument("--only", default=None, help="comma list of leantrain optimizers (and their peers) to run")
    ap.add_argument("--lrs", default=",".join(f"{x:g}" for x in LRS), help="learning rates of the sweep")
    ap.add_argument("--isolate", action="store_true", help="one process per run (peak RSS per run; ~20 s more "
                                                                "per run for imports and data on this machine)")
    ap.add_argument("--main-steps", type=int, default=120)
    ap.add_argument("--main-lrs", default=",".join(f"{x:g}" for x in MAIN_LRS), help="learning rates of ``main``")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="nano preset / tiny BERT, a few steps (smoke run)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    args.out = args.out or ROOT / "runs" / ("bench_optim2-quick" if args.quick else "bench_optim2")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    print(f"load average at start: {os.getloadavg()[0]:.2f} (2 shared cores); torch threads per run: {args.threads}")
    rows = load_rows(args.out)
    if args.phase != "table":
        rows = run_phase(args.phase, args, rows)
    print("lr sweep (tiny LLaMA, seed 0):\n" + sweep_table(rows))
    print("\nbest lr per optimizer:", best_lrs(rows))
    print("\ntiny LLaMA at the best lr:\n" + tiny_table(rows))
    print("\nQ-GaLore options (tiny LLaMA, seed 0):\n" + qgalore_table(rows))
    print("\nmain job lr sweep (seed 0):\n" + main_sweep_table(rows))
    print("\nbest main-job lr per optimizer:", best_main_lrs(rows))
    print("\nmain job at the best lr:\n" + main_table(rows))
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    if args.phase == "table" and not args.quick:
        plot(rows, ROOT / "docs" / "img" / "optimizers2.png")
    if args.json:
        write_text_atomic(args.json, json.dumps(rows, indent=1, default=str) + "\n")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

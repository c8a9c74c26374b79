"""``leantrain compare``: the main job once per method, side by side, with a table and plots.

Each run is a separate ``leantrain train`` process so its peak RSS is its own and a crash in one method cannot
take the others down; results are read back from each run's metrics.json / metrics.jsonl.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .checkpoint import write_text_atomic
from .report import read_jsonl, smooth


@dataclass(frozen=True)
class Entry:
    label: str
    method: str
    optim: str
    estimator_method: str  # name in leantrain.memory's estimator


ENTRIES = {
    "head": Entry("head", "head", "adamw", "head"),
    "full": Entry("full", "full", "adamw", "full"),
    "lora": Entry("lora", "lora", "adamw", "lora"),
    "dora": Entry("dora", "dora", "adamw", "dora"),
    "pissa": Entry("pissa", "pissa", "adamw", "pissa"),
    "vera": Entry("vera", "vera", "adamw", "vera"),
    "miss": Entry("miss", "miss", "adamw", "miss"),
    "shira": Entry("shira", "shira", "adamw", "shira"),
    "galore": Entry("galore", "full", "galore-adamw", "galore"),
    "galore8bit": Entry("galore8bit", "full", "galore-adamw8bit", "galore-8bit"),
    "gradnormlorp": Entry("gradnormlorp", "gradnormlorp", "adamw", "gradnormlorp"),
    "adamw8bit": Entry("adamw8bit", "full", "adamw8bit", "full"),
    "dlrt": Entry("dlrt", "dlrt", "adamw", "dlrt"),
}
DEFAULT = ["full", "lora", "dora", "pissa", "vera", "miss", "shira", "galore", "gradnormlorp", "adamw8bit", "dlrt"]


def _estimate(entry: Entry, optim: str, train_args: list[str], num_labels: int) -> int | None:
    """Estimated peak bytes from the analytic model (None when the estimator does not know the setting)."""
    try:
        from .commands.train import config_from_args, register  # noqa: F401
        import argparse

        from .memory import estimate

        parser = argparse.ArgumentParser()
        register(parser.add_subparsers())
        cfg = config_from_args(parser.parse_args(["train", *train_args]))
        est_optim = optim.replace("galore-", "") if entry.estimator_method.startswith("galore") else optim
        report = estimate(cfg.model, method=entry.estimator_method, optim=est_optim, batch_size=cfg.batch_size,
                          seq_len=cfg.max_length, rank=cfg.rank, fraction=cfg.fraction, targets=cfg.targets,
                          num_labels=num_labels)
        return report.total
    except Exception:  # the estimator is optional here: a missing preset must not stop the comparison
        return None


def run_compare(out: Path, labels: list[str], train_args: list[str], progress: bool = True) -> list[dict[str, Any]]:
    unknown = [name for name in labels if name not in ENTRIES]
    if unknown:
        raise ValueError(f"unknown compare entry {unknown[0]!r}; choose from: {', '.join(ENTRIES)}")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for label in tqdm(labels, desc="compare", unit="run", disable=not progress):
        entry = ENTRIES[label]
        run_dir = out / label
        cmd = [sys.executable, "-m", "leantrain", "train", "--method", entry.method, "--optim", entry.optim,
               *train_args, "--out", str(run_dir), "--overwrite", "--no-progress"]
        log = out / f"{label}.log"
        with log.open("w") as handle:
            proc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ})
        row: dict[str, Any] = {"label": label, "method": entry.method, "optim": entry.optim}
        metrics_path = run_dir / "metrics.json"
        if proc.returncode != 0 or not metrics_path.is_file():
            lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
            row["error"] = lines[-1] if lines else f"exit code {proc.returncode}"
        else:
            m = json.loads(metrics_path.read_text())
            labels_file = run_dir / "labels.json"
            n_labels = len(json.loads(labels_file.read_text())) if labels_file.is_file() else 2
            row.update({k: m.get(k) for k in ("val_accuracy", "val_loss", "trainable_params", "total_params",
                                              "optimizer_state_bytes", "grad_bytes", "peak_rss_bytes",
                                              "wall_time_s", "steps", "majority_baseline_accuracy",
                                              "tfidf_baseline_accuracy")})
            row["sec_per_step"] = m.get("sec_per_step")
            row["estimated_peak_bytes"] = _estimate(entry, entry.optim, train_args, n_labels)
        rows.append(row)
        write_text_atomic(out / "results.json", json.dumps(rows, indent=2) + "\n")
    write_text_atomic(out / "results.md", format_table(rows) + "\n")
    plot_compare(rows, out)
    return rows


def _mib(value: float | None) -> str:
    return "—" if value is None else f"{value / 2**20:.1f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ("| run | method | optimizer | val acc | val loss | trainable params | optimizer state MiB | "
            "est. peak MiB (tensors) | peak RSS MiB (process) | s/step |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['method']} | {r['optim']} | failed: {r['error'][:80]} |||||||")
            continue
        lines.append(f"| {r['label']} | {r['method']} | {r['optim']} | {r['val_accuracy']:.4f} | {r['val_loss']:.4f} | "
                     f"{r['trainable_params']:,} | {_mib(r['optimizer_state_bytes'])} | "
                     f"{_mib(r['estimated_peak_bytes'])} | {_mib(r['peak_rss_bytes'])} | {r['sec_per_step']:.3f} |")
    ok = [r for r in rows if "error" not in r]
    if ok:
        lines.append("")
        lines.append(f"Baselines on the same split: majority class {ok[0]['majority_baseline_accuracy']:.4f}, "
                     f"TF-IDF + logistic regression {ok[0]['tfidf_baseline_accuracy'] or float('nan'):.4f}.")
    return "\n".join(lines)


def plot_compare(rows: list[dict[str, Any]], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for r in ok:
        recs = [x for x in read_jsonl(out / r["label"] / "metrics.jsonl") if "loss" in x]
        steps = [x["step"] for x in recs]
        losses = [x["loss"] for x in recs]
        axes[0].plot(steps, smooth(losses, max(1, len(losses) // 15)), label=r["label"])
    axes[0].set(title="training loss (smoothed)", xlabel="step", ylabel="cross-entropy")
    axes[0].legend(fontsize=8)
    names = [r["label"] for r in ok]
    state = [r["optimizer_state_bytes"] / 2**20 for r in ok]
    grads = [r["grad_bytes"] / 2**20 for r in ok]
    axes[1].bar(names, grads, label="gradients")
    axes[1].bar(names, state, bottom=grads, label="optimizer state")
    axes[1].set(title="trainable-side memory (MiB)", ylabel="MiB")
    axes[1].tick_params(axis="x", rotation=45)
    axes[1].legend(fontsize=8)
    for r in ok:
        x = (r["grad_bytes"] + r["optimizer_state_bytes"]) / 2**20
        axes[2].scatter(x, r["val_accuracy"])
        axes[2].annotate(r["label"], (x, r["val_accuracy"]), fontsize=8)
    axes[2].axhline(ok[0]["majority_baseline_accuracy"], ls=":", color="gray", label="majority")
    if ok[0].get("tfidf_baseline_accuracy"):
        axes[2].axhline(ok[0]["tfidf_baseline_accuracy"], ls="--", color="gray", label="TF-IDF + LR")
    axes[2].set_xscale("symlog", linthresh=0.1)
    axes[2].set_xlim(left=0)
    axes[2].set(title="accuracy vs gradient + optimizer-state memory", xlabel="MiB", ylabel="validation accuracy")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=110)
    plt.close(fig)

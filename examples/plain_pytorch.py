"""leantrain as a library in a hand-written PyTorch loop: inject LoRA with ``leantrain.adapters.inject``, update
it with ``leantrain.optim.AdamW8bit``, save the adapter in PEFT's layout and load it back into a fresh model.

No trainer, no CLI: a small labelled sentence set (leantrain's bundled VADER data), the embedded MiniLM tokenizer,
and a model from ``leantrain.models.build_classifier`` (``tiny`` = random 2-layer BERT for a quick CPU check,
``minilm`` = the embedded pretrained encoder).

    .venv/bin/python examples/plain_pytorch.py --model tiny --steps 40 --out /tmp/plain
    .venv/bin/python examples/plain_pytorch.py --model minilm --steps 200 --out /tmp/plain
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing leantrain

from leantrain import adapters
from leantrain.config import TrainConfig
from leantrain.data import load_classification
from leantrain.models import build_classifier, load_tokenizer
from leantrain.optim import AdamW8bit


def batches(texts: list[str], labels: list[int], tokenizer, batch_size: int, max_length: int, seed: int):
    """Endless shuffled, padded batches (a fresh permutation every epoch)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.tensor(labels)
    while True:
        order = torch.randperm(len(texts), generator=gen).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            rows = order[start:start + batch_size]
            enc = tokenizer([texts[i] for i in rows], truncation=True, max_length=max_length, padding=True,
                            return_tensors="pt")
            yield enc["input_ids"], enc["attention_mask"], y[rows]


def run(model: str = "tiny", steps: int = 40, out: str | Path = "runs/plain_pytorch", train_size: int = 64,
        batch_size: int = 8, lr: float = 5e-3, rank: int = 8, max_length: int = 32, seed: int = 0) -> dict:
    """Train LoRA (+ the fresh head) for ``steps`` steps; save and reload the adapter; return the losses."""
    data = load_classification(TrainConfig(data="vader", train_size=train_size, val_size=16))
    tokenizer = load_tokenizer("minilm")
    net = build_classifier(model, len(data.label_names), seed=seed, dropout=0.0)
    targets = adapters.inject(net, adapters.LoraConfig(r=rank, alpha=2 * rank, target_modules="all-linear"))
    for p in net.classifier.parameters():  # inject froze everything but LoRA; the fresh head must train too
        p.requires_grad_(True)
    lora = [p for n, p in net.named_parameters() if p.requires_grad and not n.startswith("classifier.")]
    optimizer = AdamW8bit([{"params": lora}, {"params": list(net.classifier.parameters()), "lr": max(lr, 1e-3)}],
                          lr=lr, weight_decay=0.0)
    net.train()
    losses = []
    stream = batches(data.train.texts, data.train.labels, tokenizer, batch_size, max_length, seed)
    for step in range(steps):
        ids, mask, y = next(stream)
        loss = F.cross_entropy(net(ids, mask), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora, 1.0)
        optimizer.step()
        losses.append(loss.item())
    out = Path(out)
    adapters.save(net, out / "adapter")  # adapter_config.json + adapter_model.safetensors (PEFT layout)
    from safetensors.torch import save_file  # the head as safetensors too: nothing pickled

    save_file({k: v.contiguous() for k, v in net.classifier.state_dict().items()}, str(out / "head.safetensors"))
    return {"losses": losses, "targets": targets, "model": net, "adapter_dir": str(out / "adapter")}


def reload(model: str, out: str | Path, num_labels: int, seed: int = 0) -> torch.nn.Module:
    """A fresh base model with the saved adapter and head loaded (what a user ships and restores)."""
    from safetensors.torch import load_file

    net = build_classifier(model, num_labels, seed=seed, dropout=0.0)
    adapters.load(net, Path(out) / "adapter")
    net.classifier.load_state_dict(load_file(str(Path(out) / "head.safetensors")))
    return net.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", choices=["tiny", "minilm"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--out", default="runs/plain_pytorch")
    args = ap.parse_args(argv)
    result = run(args.model, args.steps, args.out, lr=args.lr)
    losses = result["losses"]
    k = max(1, len(losses) // 5)
    print(json.dumps({"lora_layers": len(result["targets"]), "first_losses_mean": sum(losses[:k]) / k,
                      "last_losses_mean": sum(losses[-k:]) / k, "adapter_dir": result["adapter_dir"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

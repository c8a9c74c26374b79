"""A leantrain classifier (BERT encoder -> masked MEAN pooling -> linear head) as a transformers
``BertForSequenceClassification``, which pools the *first token* through ``tanh(dense(.))``.

No choice of BertForSequenceClassification weights maps the two onto each other exactly, so the export appends
one BERT layer that computes the mean pooling (checked against leantrain's logits to ~1e-6 in float32):

* attention: query = key = 0, so every query attends uniformly to the unmasked positions, and value = S P W,
  where W is the trained head (no bias) and P writes each logit twice with opposite signs (dims 2k, 2k+1):
  position 0 receives ``S P W mean(h)``, the masked mean leantrain pools;
* the residual (position 0's own hidden state, |h| <= B) is drowned: S = 1e6 B, error |h|/S <= 1e-6;
* both LayerNorms see a constant +C/-C pattern on the spare dims (C = 1e5 S U for the first, 1e5 U for the
  second, U bounding the logits), so their variance is a constant up to a relative 1e-10 and they act linearly
  on the logit dims; the float error of the LayerNorm mean is common to every dim, so the +/- pairs cancel it;
* the pooler computes ``tanh(eps * logit)`` and the classifier multiplies by ``1/eps`` and adds the head bias:
  tanh(x) = x - x^3/3 + ..., so eps is chosen with eps^2 U^3 / 3 <= 1e-7.

Bounds U and B come from the weights (a LayerNorm output has norm <= max|gamma| sqrt(H) + |beta|), so they hold
for every input. The exported model is for float32 inference; fine-tuning it further makes no sense (use the
``safetensors`` export or the run itself). It needs 2 * labels + 2 <= hidden size.
"""
from __future__ import annotations

import math

import torch
from torch import nn

EXTRA_DIMS = 2  # spare dims that carry the constant pattern
# Printed by ``leantrain export`` for a classifier's hf export, and shown in its --help: what the user must know.
POOLING_NOTE = ("note: the classifier's last encoder layer is not trained: it computes leantrain's masked mean "
                "pooling with constants of order 1e12, so use the model in float32 and for inference only (to train "
                "further, export with --format safetensors); see docs/export.md")


def hidden_bound(encoder: nn.Module) -> float:
    """An upper bound of the norm of any hidden state the encoder's last LayerNorm can output."""
    last = encoder.encoder.layer[-1].output.LayerNorm
    hidden = last.weight.numel()
    return float(last.weight.detach().abs().max()) * math.sqrt(hidden) + float(last.bias.detach().norm())


def pooling_layer_weights(head: nn.Linear, bound: float, hidden: int) -> tuple[dict[str, torch.Tensor], float]:
    """State dict (BertLayer keys) of the mean-pooling layer, and eps for pooler/classifier."""
    weight = head.weight.detach().double()
    labels = weight.shape[0]
    if 2 * labels + EXTRA_DIMS > hidden:
        raise ValueError(f"--format hf: {labels} labels need a hidden size of at least {2 * labels + EXTRA_DIMS} "
                         f"for the mean-pooling layer (the encoder has {hidden}); use --format safetensors")
    logit_bound = max(float(weight.norm(dim=1).max()) * bound, 1.0)
    scale = 1e6 * max(bound, 1.0)
    spare = torch.arange(2 * labels, hidden)
    spare = spare[: len(spare) // 2 * 2]  # an even number of spare dims: their +C/-C pattern sums to zero
    sign = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(len(spare) // 2)
    # Each LayerNorm gets its own constant: large enough that its variance is constant to 1e-10, and no larger,
    # since its mean is summed in float32 with an error ~1e-7 C common to every dim (the +/- pairs cancel it).
    spread = math.sqrt(2 * labels / len(spare))
    pattern1, pattern2 = torch.zeros(hidden, dtype=torch.float64), torch.zeros(hidden, dtype=torch.float64)
    pattern1[spare] = 1e5 * scale * logit_bound * spread * sign
    pattern2[spare] = 1e5 * logit_bound * spread * sign
    sigma1 = math.sqrt(float((pattern1**2).sum()) / hidden)  # the LayerNorm scale of the constant pattern
    sigma2 = math.sqrt(float((pattern2**2).sum()) / hidden)
    value = torch.zeros(hidden, weight.shape[1], dtype=torch.float64)
    value[0:2 * labels:2], value[1:2 * labels:2] = scale * weight, -scale * weight
    gamma1, gamma2 = torch.zeros(hidden, dtype=torch.float64), torch.zeros(hidden, dtype=torch.float64)
    gamma1[: 2 * labels] = sigma1 / scale  # LayerNorm 1 outputs P W mean(h) on the logit dims, 0 elsewhere
    gamma2[: 2 * labels] = sigma2  # LayerNorm 2 likewise
    zeros = torch.zeros(hidden, hidden, dtype=torch.float64)
    state = {
        "attention.self.query.weight": zeros, "attention.self.query.bias": torch.zeros(hidden),
        "attention.self.key.weight": zeros, "attention.self.key.bias": torch.zeros(hidden),
        "attention.self.value.weight": value, "attention.self.value.bias": torch.zeros(hidden),
        "attention.output.dense.weight": torch.eye(hidden, dtype=torch.float64),
        "attention.output.dense.bias": pattern1,
        "attention.output.LayerNorm.weight": gamma1, "attention.output.LayerNorm.bias": torch.zeros(hidden),
        "output.LayerNorm.weight": gamma2, "output.LayerNorm.bias": torch.zeros(hidden),
        "output.dense.bias": pattern2,
    }
    eps = math.sqrt(3e-7 / logit_bound**3)
    return {k: v.float() for k, v in state.items()}, eps


def to_bert_for_sequence_classification(classifier: nn.Module, label_names: list[str]) -> nn.Module:
    """A ``BertForSequenceClassification`` whose logits equal ``classifier``'s (a plain, merged leantrain
    SequenceClassifier with a BERT encoder) to float32 precision; see the module docstring."""
    from transformers import BertConfig, BertForSequenceClassification

    encoder = classifier.encoder
    if getattr(encoder.config, "model_type", None) != "bert":
        raise ValueError(f"--format hf: the classifier export builds on BERT; this encoder is "
                         f"{encoder.config.model_type!r}: use --format safetensors")
    values = encoder.config.to_dict()
    values.update(num_hidden_layers=encoder.config.num_hidden_layers + 1, num_labels=len(label_names),
                  id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)},
                  architectures=["BertForSequenceClassification"], problem_type="single_label_classification")
    config = BertConfig.from_dict(values)
    hidden = config.hidden_size
    model = BertForSequenceClassification(config).eval()
    missing, unexpected = model.bert.load_state_dict(encoder.state_dict(), strict=False)
    extra = config.num_hidden_layers - 1
    if unexpected or any(not (k.startswith((f"encoder.layer.{extra}.", "pooler."))) for k in missing):
        raise ValueError(f"--format hf: the encoder does not fit BertModel (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    head = classifier.classifier
    layer, eps = pooling_layer_weights(head, hidden_bound(encoder), hidden)
    with torch.no_grad():
        block = model.bert.encoder.layer[extra]
        for p in block.parameters():
            p.zero_()
        block.load_state_dict(layer, strict=False)
        labels = len(label_names)
        pool = torch.zeros(hidden, hidden)
        rows = torch.arange(labels)
        pool[rows, 2 * rows], pool[rows, 2 * rows + 1] = eps / 2, -eps / 2
        model.bert.pooler.dense.weight.copy_(pool)
        model.bert.pooler.dense.bias.zero_()
        out = torch.zeros(labels, hidden)
        out[rows, rows] = 1.0 / eps
        model.classifier.weight.copy_(out)
        model.classifier.bias.copy_(head.bias.detach().float())
    return model

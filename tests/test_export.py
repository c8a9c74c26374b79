"""``leantrain export``: each format loads in the tool it is made for and reproduces leantrain's own logits.

Differential tests: a finished tiny run is rebuilt by leantrain (``predict.load_trained``, the path ``predict``
uses) and its logits are compared with the exported folder loaded by transformers / PEFT / a plain
``load_state_dict`` (bar: 1e-4, issue 25). Classification runs use the random 2-layer ``tiny`` BERT, causal-LM
runs a scratch ``nano`` LLaMA on a synthetic corpus. The mean-pooling construction of the classifier export is
also checked against the pooling computed by hand.
"""
from __future__ import annotations

import json

import pytest
import torch

from leantrain.cli import main
from leantrain.predict import load_trained

TINY = ["--model", "tiny", "--train-size", "96", "--val-size", "48", "--max-length", "24", "--batch-size", "8",
        "--no-progress", "--steps", "3", "--lr", "1e-2", "--rank", "4"]
NANO = ["--task", "causal-lm", "--model", "minilm", "--init-weights", "scratch", "--arch", "llama", "--preset",
        "nano", "--batch-size", "8", "--max-length", "16", "--val-size", "16", "--no-progress", "--steps", "6",
        "--lr", "3e-3"]
TEXTS = ["what a wonderful film", "awful", "not great , not terrible , and far too long for its own good " * 3]
PROMPTS = ["and moses said", "and ruth said unto david , behold zebra", "sarah"]
TOL = 1e-4


@pytest.fixture(scope="module")
def trained(tmp_path_factory, bible_corpus):
    """trained(task, *method args) -> a finished run folder, trained once per module."""
    root = tmp_path_factory.mktemp("export")
    corpus = bible_corpus
    cache: dict[tuple[str, ...], object] = {}

    def make(task: str, *extra: str):
        key = (task, *extra)
        if key not in cache:
            out = root / "-".join(key).replace("--", "")
            base = TINY if task == "classify" else [*NANO, "--data", str(corpus)]
            assert main(["train", *base, "--method", *extra, "--out", str(out)]) == 0
            cache[key] = out
        return cache[key]

    return make


def export(run, out, fmt):
    assert main(["export", str(run), "--out", str(out), "--format", fmt]) == 0
    return out


@torch.no_grad()
def leantrain_class_logits(run_dir):
    run = load_trained(run_dir)
    enc = run.task.tokenizer(TEXTS, truncation=True, max_length=run.cfg.max_length, padding=True,
                             return_tensors="pt")
    return run, enc, run.task.model(enc["input_ids"], enc["attention_mask"]).float()


CLASSIFY_CASES = [pytest.param(("lora",), id="lora"),
                  pytest.param(("full",), id="full", marks=pytest.mark.slow),
                  pytest.param(("dlrt",), id="dlrt", marks=pytest.mark.slow),
                  pytest.param(("lora", "--quantize", "nf4"), id="qlora", marks=pytest.mark.slow)]


@pytest.mark.parametrize("method", CLASSIFY_CASES)
def test_hf_classifier_loads_with_auto_class_and_reproduces_logits(method, trained, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir = trained("classify", *method)
    out = export(run_dir, tmp_path / "hf", "hf")
    _, enc, want = leantrain_class_logits(run_dir)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    got_enc = tok(TEXTS, truncation=True, padding=True, return_tensors="pt")  # max length saved with the tokenizer
    assert torch.equal(got_enc["input_ids"], enc["input_ids"])
    with torch.no_grad():
        got = model(**got_enc).logits
    assert (got - want).abs().max().item() < TOL
    labels = json.loads((run_dir / "labels.json").read_text())
    assert model.config.model_type == "bert" and model.config.num_labels == len(labels)
    assert [model.config.id2label[i] for i in range(len(labels))] == labels
    assert model.config.label2id == {n: i for i, n in enumerate(labels)}
    meta = json.loads((out / "export.json").read_text())
    if "--quantize" in method:
        assert any("dequantized" in n for n in meta["notes"])


@torch.no_grad()
def lm_logits_pair(run_dir, model):
    """(leantrain logits, exported model logits restricted to the run's vocabulary) for every prompt."""
    run = load_trained(run_dir)
    pairs = []
    for text in PROMPTS:
        ids = torch.tensor([run.task.tokenizer(text, add_special_tokens=False)["input_ids"]])
        vocab = run.task.vocab
        want = run.task.model(input_ids=vocab.to_compact(ids) if vocab else ids).logits
        got = model(input_ids=ids).logits
        pairs.append((want, got[..., torch.tensor(vocab.kept)] if vocab else got))
    return run, pairs


LM_CASES = [pytest.param(("full",), id="full"),
            pytest.param(("lora",), id="lora", marks=pytest.mark.slow),
            pytest.param(("lora", "--quantize", "nf4"), id="qlora", marks=pytest.mark.slow),
            pytest.param(("dlrt", "--rank", "8"), id="dlrt", marks=pytest.mark.slow)]


@pytest.mark.parametrize("method", LM_CASES)
def test_hf_causal_lm_reproduces_logits_and_greedy_text(method, trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from leantrain.predict import generate

    run_dir = trained("causal-lm", *method)
    out = export(run_dir, tmp_path / "hf", "hf")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    run, pairs = lm_logits_pair(run_dir, model)
    assert max((w - g).abs().max().item() for w, g in pairs) < TOL
    tok = AutoTokenizer.from_pretrained(out)
    ours = list(generate(run, PROMPTS, max_new_tokens=10, progress=False))
    for text, mine in zip(PROMPTS, ours):
        ids = tok([text], add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            seq = model.generate(ids, max_new_tokens=10, do_sample=False)
        assert tok.decode(seq[0, ids.shape[1]:], skip_special_tokens=True) == mine


PEFT_CASES = [pytest.param(("classify", "lora"), id="lora"),
              *[pytest.param(("classify", m), id=m, marks=pytest.mark.slow)
                for m in ("rslora", "dora", "pissa", "vera", "miss", "shira", "lora-fa")],
              pytest.param(("classify", "lora", "--quantize", "nf4"), id="qlora", marks=pytest.mark.slow),
              pytest.param(("causal-lm", "lora", "--quantize", "nf4"), id="lm-qlora", marks=pytest.mark.slow)]


@pytest.mark.parametrize("case", PEFT_CASES)
def test_peft_adapter_on_its_base_reproduces_logits(case, trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    task, *method = case
    run_dir = trained(task, *method)
    out = export(run_dir, tmp_path / "peft", "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "base").resolve())
    if task == "classify":
        base = AutoModelForSequenceClassification.from_pretrained(out / "base")
        model = PeftModel.from_pretrained(base, out).eval()
        _, enc, want = leantrain_class_logits(run_dir)
        with torch.no_grad():
            got = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        assert (got - want).abs().max().item() < TOL
    else:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base"), out).eval()
        _, pairs = lm_logits_pair(run_dir, model)
        assert max((w - g).abs().max().item() for w, g in pairs) < TOL


def test_safetensors_export_loads_into_the_plain_architecture(trained, tmp_path):
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from leantrain.models import build_classifier

    run_dir = trained("classify", "lora")
    out = export(run_dir, tmp_path / "st", "safetensors")
    labels = json.loads((out / "labels.json").read_text())
    plain = build_classifier("tiny", len(labels)).eval()
    plain.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    _, enc, want = leantrain_class_logits(run_dir)
    with torch.no_grad():
        assert (plain(enc["input_ids"], enc["attention_mask"]) - want).abs().max().item() < TOL
    lm_dir = trained("causal-lm", "full")
    lm_out = export(lm_dir, tmp_path / "lm", "safetensors")
    info = json.loads((lm_out / "lm.json").read_text())
    lm = LlamaForCausalLM(LlamaConfig.from_dict(info["model_config"])).eval()
    lm.load_state_dict(load_file(lm_out / "model.safetensors"), strict=True)
    run = load_trained(lm_dir)
    ids = torch.arange(len(info["vocab_original_ids"]))[None]
    with torch.no_grad():
        assert (lm(input_ids=ids).logits - run.task.model(input_ids=ids).logits).abs().max().item() < TOL


def test_mean_pooling_layer_matches_the_pooling_math():
    """The appended layer's logits equal masked-mean(h) @ W.T + b computed here from the encoder's hidden states."""
    from leantrain.export_bert import to_bert_for_sequence_classification
    from leantrain.models import build_classifier

    model = build_classifier("tiny", 5, seed=3).eval()
    with torch.no_grad():
        model.classifier.weight.normal_(0, 3.0)
        model.classifier.bias.normal_()
    hf = to_bert_for_sequence_classification(model, list("abcde"))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (4, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:], mask[2, 2:], mask[3, 10:] = 0, 0, 0
    with torch.no_grad():
        hidden = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        want = pooled @ model.classifier.weight.T + model.classifier.bias
        got = hf(input_ids=ids, attention_mask=mask).logits
    assert want.abs().max() > 5  # large logits: the tanh and LayerNorm tricks are exercised
    assert (got - want).abs().max().item() < TOL


def test_too_many_labels_for_the_pooling_layer_is_one_error():
    from leantrain.export_bert import to_bert_for_sequence_classification
    from leantrain.models import build_classifier

    with pytest.raises(ValueError, match="16 labels need a hidden size of at least 34"):
        to_bert_for_sequence_classification(build_classifier("tiny", 16), [str(i) for i in range(16)])


@pytest.mark.parametrize("argv,needle", [
    (["export", "{full}", "--out", "{tmp}/p", "--format", "peft"], "method 'full' has no PEFT adapter"),
    (["export", "{lora}", "--out", "{tmp}/busy"], "exists and is not empty; pass --overwrite"),
    (["export", "{tmp}/nope", "--out", "{tmp}/x"], "is missing (is"),
    (["export", "{lora}", "--out", "{tmp}/x", "--format", "onnx"], "invalid choice: 'onnx'"),
    (["export", "{lora}", "--out", "{lora}", "--overwrite"], "would replace the run folder"),
])
def test_bad_export_is_one_line(argv, needle, trained, tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    full, lora = trained("causal-lm", "full"), trained("classify", "lora")
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{full}", str(full)).replace("{lora}", str(lora)) for a in argv]
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]  # not argparse's usage
    assert len(err) == 1 and needle in err[0], err
    assert (tmp_path / "busy" / "keep.txt").is_file() and not (tmp_path / "x").exists()
    assert (lora / "trainable.safetensors").is_file()


def test_merge_is_an_alias_and_files_follow_the_umask(trained, tmp_path):
    run_dir = trained("classify", "lora")
    out = tmp_path / "merged"
    assert main(["merge", str(run_dir), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bert" and config["architectures"] == ["BertForSequenceClassification"]
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {
        p.name: 0o666 & ~mask for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")]  # no temp folder left


def _every(task: str) -> list:
    from leantrain.methods import specs

    # --method head on a causal LM has nothing to train (no classifier head): `leantrain train` refuses it
    return [pytest.param(name, id=name, marks=pytest.mark.slow) for name, spec in sorted(specs().items())
            if task in spec.tasks and not (task == "causal-lm" and name == "head")]


@pytest.mark.parametrize("method", _every("classify"))
def test_every_classification_method_exports_to_transformers(method, trained, tmp_path):
    from transformers import AutoModelForSequenceClassification

    run_dir = trained("classify", method)
    out = export(run_dir, tmp_path / "hf", "hf")
    _, enc, want = leantrain_class_logits(run_dir)
    with torch.no_grad():
        got = AutoModelForSequenceClassification.from_pretrained(out).eval()(**enc).logits
    assert (got - want).abs().max().item() < TOL


@pytest.mark.parametrize("method", _every("causal-lm"))
def test_every_causal_lm_method_exports_to_transformers(method, trained, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = trained("causal-lm", method, "--rank", "4")
    out = export(run_dir, tmp_path / "hf", "hf")
    _, pairs = lm_logits_pair(run_dir, AutoModelForCausalLM.from_pretrained(out).eval())
    assert max((w - g).abs().max().item() for w, g in pairs) < TOL


MERGE_LINES = [pytest.param(("classify", "lora"), id="classify-lora"),
               pytest.param(("causal-lm", "lora"), id="lm-lora"),
               pytest.param(("classify", "full"), id="full", marks=pytest.mark.slow),
               pytest.param(("classify", "dlrt"), id="dlrt", marks=pytest.mark.slow),
               pytest.param(("classify", "lora", "--quantize", "nf4"), id="qlora", marks=pytest.mark.slow),
               pytest.param(("causal-lm", "full", "--optim", "galore-adamw", "--rank", "4"), id="lm-galore",
                            marks=pytest.mark.slow)]


@pytest.mark.parametrize("case", MERGE_LINES)
def test_issue_25_merge_lines_now_load_in_transformers(case, trained, tmp_path, capsys):
    """Issue 25's trial: `leantrain merge RUN --out merged` wrote leantrain's TrainConfig as config.json (no
    model_type), refused LM LoRA runs (no labels.json) and full / DLRT / QLoRA / LM-GaLore runs (no adapter).
    A classifier's folder comes with the one-line note on its appended mean-pooling layer; an LM's without."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from leantrain.export_bert import POOLING_NOTE

    task, *method = case
    run_dir = trained(task, *method)
    capsys.readouterr()
    assert main(["merge", str(run_dir), "--out", str(tmp_path / "merged")]) == 0
    assert (POOLING_NOTE in capsys.readouterr().out.splitlines()) == (task == "classify")
    auto = AutoModelForSequenceClassification if task == "classify" else AutoModelForCausalLM
    model = auto.from_pretrained(tmp_path / "merged")
    assert type(model).__name__ == ("BertForSequenceClassification" if task == "classify" else "LlamaForCausalLM")


def test_a_layer_without_a_dense_form_is_refused_by_name():
    from torch import nn

    from leantrain.export import densify

    class Odd(nn.Module):
        def forward(self, x):
            return x

    model = nn.Sequential(nn.Linear(2, 2), Odd())
    with pytest.raises(ValueError, match="module '1' is a Odd, which has no dense form yet"):
        densify(model)


def test_densify_turns_every_factorised_layer_into_the_linear_it_applies():
    """DLRT's U S Vᵀ, the low-rank baseline's B A, SLTrain's s B A + S and GradNormLoRP's g V/|V| become plain
    nn.Linear layers that give the same outputs."""
    from torch import nn

    from leantrain.export import densify
    from leantrain.lm.lowrank import FactorizedLinear
    from leantrain.lm.sltrain import SparseLowRankLinear
    from leantrain.lowrank.layers import LowRankLinear
    from leantrain.optim.gradnorm import WeightNormLinear

    torch.manual_seed(0)
    sparse = SparseLowRankLinear(nn.Linear(8, 6), 2, 4.0, 0.2, torch.Generator().manual_seed(1))
    with torch.no_grad():
        sparse.B.normal_()
    model = nn.ModuleDict({"dlrt": LowRankLinear(8, 6, 3), "lowrank": FactorizedLinear(nn.Linear(8, 6), 2),
                           "sltrain": sparse, "gradnorm": WeightNormLinear.from_linear(nn.Linear(8, 6))})
    x = torch.randn(5, 8)
    with torch.no_grad():
        want = {k: m(x) for k, m in model.items()}
    notes = densify(model)
    assert all(type(m) is nn.Linear for m in model.values()) and "4 layers" in notes[-1]
    with torch.no_grad():
        for k, m in model.items():
            torch.testing.assert_close(m(x), want[k], atol=1e-5, rtol=1e-5)

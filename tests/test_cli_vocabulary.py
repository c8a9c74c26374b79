"""One CLI vocabulary: every ``leantrain train`` option explains itself from TrainConfig's field metadata, and
``leantrain memory`` takes train's method/optimizer names and flag spellings (table-driven over the registries).
Also the newcomer defaults of ``--init-weights scratch`` (full training at docs/lm.md's pre-training lr)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest

from leantrain.cli import build_parser, main
from leantrain.commands.train import config_from_args, flag_of
from leantrain.config import SCRATCH_LR, SCRATCH_METHOD, TrainConfig
from leantrain.memory.estimate import ESTIMATED_METHODS, METHOD_ALIASES
from leantrain.methods import available_methods, get_method
from leantrain.optim.registry import available_optimizers

ROOT = Path(__file__).resolve().parents[1]
FIELDS = [f for f in dataclasses.fields(TrainConfig) if f.name != "extra"]
SCRATCH = ["--task", "causal-lm", "--init-weights", "scratch"]


def run_cli(argv: list[str], capsys) -> tuple[int, str, list[str]]:
    """(exit code, stdout, stderr lines) of ``leantrain ARGV``; argparse exits are caught."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def squeeze(text: str) -> str:
    """Text without whitespace: argparse re-wraps help lines (and breaks them after hyphens)."""
    return re.sub(r"\s+", "", text)


def subparser(name: str) -> argparse.ArgumentParser:
    actions = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return actions[0].choices[name]


# --- help text from field metadata ----------------------------------------------------------------------------

@pytest.mark.parametrize("field", FIELDS, ids=[f.name for f in FIELDS])
def test_every_config_field_has_help(field):
    assert field.metadata.get("help", "").strip(), f"TrainConfig.{field.name} has no metadata help"


def test_train_help_shows_every_fields_help(capsys):
    code, out, _ = run_cli(["train", "--help"], capsys)
    assert code == 0
    for field in FIELDS:
        assert flag_of(field.name) in out, field.name
        assert squeeze(field.metadata["help"]) in squeeze(out), f"--help lacks the help of {field.name}"


def test_train_help_states_the_scratch_defaults(capsys):
    _, out, _ = run_cli(["train", "--help"], capsys)
    flat = " ".join(out.split())
    assert f"--method {SCRATCH_METHOD} --lr {SCRATCH_LR:g}" in flat
    assert f"None = {SCRATCH_METHOD} for --init-weights scratch" in flat
    assert f"None = {SCRATCH_LR:g} for --init-weights scratch" in flat


# --- memory speaks train's vocabulary -----------------------------------------------------------------------------

def test_memory_options_shared_with_train_have_trains_spelling_and_help():
    memory = subparser("memory")
    shared = [a for a in memory._actions if a.dest in {f.name for f in FIELDS}]
    assert {a.dest for a in shared} >= {"method", "optim", "rank", "batch_size", "max_length", "quantize",
                                        "targets", "fraction", "block_size", "activation_checkpointing"}
    for action in shared:
        assert action.option_strings[0] == flag_of(action.dest)
        # Same spelling, memory's own meaning: estimator presets, the estimator's method coverage, cpu|cuda.
        if action.dest not in ("model", "method", "device"):
            assert TrainConfig.__dataclass_fields__[action.dest].metadata["help"] in action.help


@pytest.mark.parametrize("method", available_methods())
def test_memory_and_train_accept_every_registered_method(method, capsys, tmp_path):
    task = get_method(method).tasks[0]  # e.g. the LM-only low-rank baseline is refused for classification
    cfg = config_from_args(build_parser().parse_args(["train", "--method", method, "--task", task]))
    assert cfg.method == method
    # every registered method declares its estimator terms, so `leantrain memory` models it on a model of its task
    model = "tiny" if task == "classify" else "llama-60m"
    code, out, err = run_cli(["memory", "--model", model, "--method", method, "--json"], capsys)
    assert method in ESTIMATED_METHODS and code == 0, err
    assert json.loads(out)["setting"]["method"] == method


def test_memory_refuses_a_method_for_another_task(capsys):
    code, _, err = run_cli(["memory", "--model", "tiny", "--method", "lowrank"], capsys)
    assert code == 2 and len(err) == 1 and "--method lowrank supports --task causal-lm" in err[0], err


@pytest.mark.parametrize("optim", available_optimizers())
def test_memory_and_train_accept_every_registered_optimizer(optim, capsys):
    cfg = config_from_args(build_parser().parse_args(["train", "--method", "full", "--optim", optim]))
    assert cfg.optim == optim
    code, out, err = run_cli(["memory", "--model", "tiny", "--method", "full", "--optim", optim, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["setting"]["optim"] == optim


def test_estimator_method_names_are_registry_names():
    assert set(ESTIMATED_METHODS) <= set(available_methods())
    assert not set(METHOD_ALIASES) & set(available_methods())


@pytest.mark.parametrize("old,new", [
    (["--method", "galore"], ["--method", "full", "--optim", "galore-adamw"]),
    (["--method", "galore", "--optim", "adamw8bit"], ["--method", "full", "--optim", "galore-adamw8bit"]),
    (["--method", "galore-8bit"], ["--method", "full", "--optim", "galore-adamw8bit"]),
])
def test_old_galore_spellings_are_aliases_with_a_one_line_note(old, new, capsys):
    base = ["memory", "--model", "llama-60m", "--rank", "128", "--dtype", "bf16", "--json"]
    code, out_old, err = run_cli([*base, *old], capsys)
    assert code == 0 and len(err) == 1 and "note" in err[0] and " ".join(new) in err[0], err
    code, out_new, err_new = run_cli([*base, *new], capsys)
    assert code == 0 and not err_new
    assert json.loads(out_old) == json.loads(out_new)


def test_seq_len_is_an_alias_of_max_length(capsys):
    _, a, _ = run_cli(["memory", "--model", "tiny", "--seq-len", "32", "--json"], capsys)
    _, b, _ = run_cli(["memory", "--model", "tiny", "--max-length", "32", "--json"], capsys)
    assert a == b and json.loads(a)["setting"]["seq_len"] == 32


def documented_memory_commands() -> list[str]:
    """``leantrain memory ...`` lines of README.md and docs/memory.md (continuations joined, comments cut)."""
    commands = []
    for doc in ("README.md", "docs/memory.md"):
        text = (ROOT / doc).read_text().replace("\\\n", " ")
        commands += [line.split("#")[0].strip() for line in text.splitlines()
                     if line.strip().startswith("leantrain memory ")]
    return commands


def test_docs_name_memory_commands():
    assert any(c for c in documented_memory_commands()), "README.md names no leantrain memory command"


@pytest.mark.parametrize("command", documented_memory_commands())
def test_documented_memory_command_works(command, capsys):
    code, out, err = run_cli(shlex.split(command)[1:], capsys)
    assert code == 0 and not err, err
    assert "total" in out


# --- scratch defaults ---------------------------------------------------------------------------------------------

def test_scratch_runs_default_to_full_training_at_a_pretraining_lr():
    cfg = TrainConfig(task="causal-lm", init_weights="scratch")
    assert (cfg.method, cfg.lr) == (SCRATCH_METHOD, SCRATCH_LR)
    saved = json.loads(cfg.to_json())
    assert (saved["method"], saved["lr"]) == (SCRATCH_METHOD, SCRATCH_LR)  # config.json records what ran
    assert TrainConfig.from_dict(saved) == cfg


def test_pretrained_runs_keep_lora_at_the_methods_lr():
    cfg = TrainConfig()
    assert (cfg.method, cfg.lr) == ("lora", get_method("lora").default_lr)  # resolved: config.json records it
    assert TrainConfig(task="causal-lm", model="smollm2").method == "lora"


@pytest.mark.parametrize("method", ["lora", "dora", "miss"])  # head on causal-lm: refused, no fresh head
def test_adapters_on_scratch_weights_are_refused_unless_deliberate(method):
    with pytest.raises(ValueError, match=f"method='{method}'.*--method {SCRATCH_METHOD}.*--lr"):
        TrainConfig(task="causal-lm", init_weights="scratch", method=method)
    assert TrainConfig(task="causal-lm", init_weights="scratch", method=method, lr=1e-3).method == method


@pytest.mark.parametrize("method", ["full", "gradnormlorp", "dlrt", "lowrank"])
def test_base_training_methods_on_scratch_get_the_pretraining_lr(method):
    assert TrainConfig(task="causal-lm", init_weights="scratch", method=method).lr == SCRATCH_LR


def test_cli_refuses_lora_on_scratch_in_one_line(tmp_path, capsys):
    code, _, err = run_cli(["train", *SCRATCH, "--method", "lora", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and len(err) == 1, err
    assert "--method full" in err[0] and "--lr" in err[0]
    assert not (tmp_path / "r").exists()


def test_scratch_run_records_resolved_defaults(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"and moses said unto aaron , behold {i} ." for i in range(200)) + "\n")
    out = tmp_path / "run"
    code, _, err = run_cli(["train", *SCRATCH, "--arch", "llama", "--preset", "nano", "--data", str(corpus),
                            "--steps", "2", "--batch-size", "4", "--max-length", "16", "--train-size", "none",
                            "--val-size", "4", "--no-progress", "--out", str(out)], capsys)
    assert code == 0, err
    saved = json.loads((out / "config.json").read_text())
    assert (saved["method"], saved["lr"]) == (SCRATCH_METHOD, SCRATCH_LR)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["lr"] > 0  # the schedule ran at the recorded base lr (warm-up scales it)

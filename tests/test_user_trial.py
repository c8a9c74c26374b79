"""Issue 25's trial of a new user, line by line: each line of the issue's "Why" list, re-run as the user ran it
(the CLI on small files with the tiny BERT), now succeeds or stops with one line naming the problem.

``TRIAL`` maps every line to the test that covers it. Lines already covered by another file name that test; the
others are tested here. docs/data_and_outputs.md ("A new user's day, re-run") has the same table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import warnings
from pathlib import Path

import pytest
import torch

from leantrain.cli import build_parser, main
from leantrain.config import TrainConfig

TESTS = Path(__file__).parent
TINY = ["--model", "tiny", "--max-length", "24", "--batch-size", "8", "--no-progress", "--steps", "2"]

# (the line, the test file, the test): every line of the trial has a test that fails if it comes back.
TRIAL = [
    ("--data my.csv with 6,000 rows trained on 4,000 / validated on 1,000",
     "test_user_trial.py", "test_a_6000_row_file_trains_on_every_row"),
    ("a 400-row CSV with duplicates trained on 41 rows; the summary shows neither count",
     "test_user_data.py", "test_repeated_texts_are_counted_and_reported"),
    ("merge writes TrainConfig as config.json: AutoModelForSequenceClassification fails (no model_type)",
     "test_export.py", "test_issue_25_merge_lines_now_load_in_transformers"),
    ("merging a SmolLM2 LoRA run: 'labels.json is missing' (a scratch LLaMA stands in for SmolLM2)",
     "test_export.py", "test_issue_25_merge_lines_now_load_in_transformers"),
    ("full, DLRT, QLoRA and LM-GaLore runs: 'adapter_config.json is missing' (slow cases)",
     "test_export.py", "test_issue_25_merge_lines_now_load_in_transformers"),
    ("exports reproduce leantrain's logits within 1e-4 (lora by default; full, dlrt, qlora slow)",
     "test_export.py", "test_hf_classifier_loads_with_auto_class_and_reproduces_logits"),
    ("there is no predict", "test_predict.py", "test_cli_writes_csv_and_jsonl"),
    ("--max-length 100000 with long texts: RuntimeError (802) vs (512)",
     "test_user_trial.py", "test_bad_data_is_one_line_and_leaves_no_run_folder"),
    ("all-distinct float labels: IndexError in the tokenizer",
     "test_user_trial.py", "test_bad_data_is_one_line_and_leaves_no_run_folder"),
    ("--device cuda on a CPU build: AssertionError",
     "test_cli_validation.py", "test_cuda_device_on_a_cpu_machine_is_one_line"),
    ("a crash leaves a half-written run folder that blocks the corrected rerun",
     "test_run_folders.py", "test_a_crash_before_the_first_step_does_not_block_the_rerun"),
    ("--resume then says 'has no checkpoint'", "test_run_folders.py", "test_a_run_without_checkpoint_names_overwrite"),
    ("' billing ' and 'billing' became two classes", "test_user_trial.py", "test_padded_labels_are_one_class"),
    ("float labels silently became four categories",
     "test_user_trial.py", "test_bad_data_is_one_line_and_leaves_no_run_folder"),
    ("a label seen only in validation silently added an untrained output class",
     "test_user_trial.py", "test_bad_data_is_one_line_and_leaves_no_run_folder"),
    ("make run: torchao's 'Failed to load ..._C_mxfp8' and pytree deprecation warnings",
     "test_quiet.py", "test_train_stderr_is_empty"),
    ("the Python API prints the same chatter", "test_quiet.py", "test_python_api_import_has_no_peer_chatter"),
    ("DDP prints a broadcast_buffers FutureWarning per rank",
     "test_user_trial.py", "test_ddp_wrapper_warns_nothing"),
    ("transformers' loading bar under --no-progress", "test_quiet.py", "test_train_stderr_is_empty"),
    ("Ctrl-C in leantrain bench dumps a child traceback",
     "test_bench_cli.py", "test_ctrl_c_during_a_benchmark_is_one_line_and_exit_130"),
    ("--method lora --tau 0.5 --gap 3 --mask snip: silently ignored",
     "test_cli_validation.py", "test_unused_options_warn_once_each"),
    ("help: --rank 'DLRT max rank' yet ranks reached 96-139",
     "test_user_trial.py", "test_dlrt_rank_is_the_minimum_rank_per_layer"),
    ("help: --preset 'for --init scratch'", "test_user_trial.py", "test_preset_without_scratch_weights_is_warned"),
    ("help: --save-every '0 = only at the end' but no checkpoint is written",
     "test_user_trial.py", "test_save_every_0_writes_no_checkpoint"),
    ("help: --block-size reads as context length", "test_user_trial.py", "test_block_size_is_the_quantization_block"),
    ("help texts state what the options do", "test_user_trial.py", "test_help_states_the_corrected_claims"),
    ("the non-UTF-8 error names neither file nor line",
     "test_user_trial.py", "test_bad_data_is_one_line_and_leaves_no_run_folder"),
    ("'steps 10 in 65.2 s (2.479 s/step)' mixes loop and wall time",
     "test_run_folders.py", "test_summary_separates_loop_and_wall_time"),
    ("resuming a finished run prints 0.000 s/step", "test_run_folders.py", "test_resuming_a_finished_run_says_so"),
    ("--resume --steps 8 silently changes the schedule",
     "test_run_folders.py", "test_resume_announces_a_new_step_count"),
    ("--resume with a changed schedule field", "test_run_folders.py", "test_resume_refuses_a_changed_schedule_field"),
    ("config.json / metrics.json / merged weights written 0600 while labels.json is 0644",
     "test_user_trial.py", "test_run_and_export_files_follow_the_umask"),
    ("the Python train() prints nothing", "test_user_trial.py", "test_python_train_prints_what_the_cli_prints"),
    ("missing: run tracking (TensorBoard event files)", "test_tracking.py", "test_run_reports_to_jsonl_and_tensorboard"),
    ("missing: per-class precision/recall/F1 and a confusion matrix",
     "test_tracking.py", "test_run_reports_to_jsonl_and_tensorboard"),
    ("missing: choosing the text/label columns", "test_user_data.py", "test_text_and_label_columns"),
    ("missing: YAML/TOML configs", "test_config_files.py", "test_every_format_gives_the_same_config"),
    ("missing: every config field settable from the CLI (extra only via JSON)",
     "test_cli_vocabulary.py", "test_train_help_shows_every_fields_help"),
    ("missing: --extra from the CLI", "test_config_files.py", "test_extra_flags_merge_with_the_file"),
]


@pytest.mark.parametrize("line, file, test", TRIAL, ids=[t for _, _, t in TRIAL])
def test_every_trial_line_has_a_test(line, file, test):
    text = (TESTS / file).read_text()
    assert f"def {test}(" in text, f"{line!r}: {file} has no {test}"


def test_the_docs_table_lists_every_trial_line():
    docs = (TESTS.parent / "docs" / "data_and_outputs.md").read_text()
    missing = sorted({test for _, _, test in TRIAL if f"`{test}`" not in docs})
    assert not missing, f"docs/data_and_outputs.md lacks {missing}"


# --- data ------------------------------------------------------------------------------------------------------
def write_csv(path: Path, rows: list[tuple[str, str]], encoding: str = "utf-8") -> str:
    path.write_bytes(("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows)).encode(encoding))
    return str(path)


def test_a_6000_row_file_trains_on_every_row(tmp_path, capsys):
    data = write_csv(tmp_path / "my.csv", [(f"review {i}", "abc"[i % 3]) for i in range(6000)])
    out = tmp_path / "run"
    assert main(["train", *TINY, "--data", data, "--steps", "1", "--out", str(out)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    # stratified 80/20 of 2,000 rows per class: 1,600 + 400 each (was the demo's 4,000 / 1,000)
    assert "4,800 train / 1,200 validation examples (all of it)" in first, first
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["train_examples"], metrics["val_examples"]) == (4800, 1200)


def test_padded_labels_are_one_class(tmp_path):
    rows = [(f"ticket {i}", [" billing ", "billing", "shipping"][i % 3]) for i in range(60)]
    out = tmp_path / "run"
    assert main(["train", *TINY, "--data", write_csv(tmp_path / "t.csv", rows), "--out", str(out)]) == 0
    assert json.loads((out / "labels.json").read_text()) == ["billing", "shipping"]
    per_class = json.loads((out / "metrics.json").read_text())["val_per_class"]
    assert {k: v["support"] for k, v in per_class.items()} == {"billing": 8, "shipping": 4}


def _floats(n: int) -> list[tuple[str, str]]:
    rng = random.Random(0)
    return [(f"text {i}", f"{rng.random():.6f}") for i in range(n)]


# (case, training rows, validation rows or None, bytes encoding, extra options, what the one line names)
BAD_DATA = [
    ("all-distinct-floats", _floats(80), None, "utf-8", [], ["continuous number", "needs categories", "d.csv"]),
    ("four-float-values", [(f"t {i}", ["0.5", "1.5", "2.5", "3.5"][i % 4]) for i in range(80)], None, "utf-8", [],
     ["label '0.5' is a continuous number", "d.csv"]),
    ("validation-only-label", [(f"t {i}", "ab"[i % 2]) for i in range(40)],
     [(f"v {i}", "abc"[i % 3]) for i in range(12)], "utf-8", [], ["['c']", "v.csv", "never occur in the training"]),
    ("not-utf8", [(f"t {i}", "ab"[i % 2]) for i in range(40)] + [("caf\xe9", "a")], None, "latin-1", [],
     ["d.csv:42:", "not UTF-8", "0xe9"]),
    ("max-length-100000", [(" ".join(["word"] * 900) + f" {i}", "ab"[i % 2]) for i in range(20)], None, "utf-8",
     ["--max-length", "100000"], ["--max-length 100000", "model's 128 positions", "--max-length 128 or less"]),
]


@pytest.mark.parametrize("case, rows, val_rows, encoding, extra, needles", BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_data_is_one_line_and_leaves_no_run_folder(case, rows, val_rows, encoding, extra, needles, tmp_path,
                                                       capsys, one_line_error):
    argv = ["train", *TINY, "--data", write_csv(tmp_path / "d.csv", rows, encoding), *extra]
    if val_rows:
        argv += ["--val-data", write_csv(tmp_path / "v.csv", val_rows)]
    out = tmp_path / "run"
    one_line_error(main([*argv, "--out", str(out)]), capsys.readouterr().err, *needles)
    assert not out.exists()


# --- options that apply, help that says what they do -------------------------------------------------------------
def _help(flag: str) -> str:
    train = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    action = next(a for a in train._actions if flag in a.option_strings)
    return " ".join(action.help.split())


@pytest.mark.parametrize("flag, claim", [
    ("--rank", "minimum rank per layer (DLRT)"),
    ("--preset", "for --init-weights scratch"),
    ("--save-every", "0 = none"),
    ("--block-size", "elements per quantization block"),
    ("--block-size", "not a sequence length"),
])
def test_help_states_the_corrected_claims(flag, claim):
    assert claim in _help(flag), _help(flag)


def _dlrt_ranks(tmp_path: Path, rank: int) -> list[int]:
    out = tmp_path / f"dlrt{rank}"
    assert main(["train", *TINY, "--train-size", "48", "--val-size", "16", "--method", "dlrt", "--tau", "0.9",
                 "--rank", str(rank), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    return [int(v) for k, v in metrics.items() if k.startswith("dlrt/rank/")]


def test_dlrt_rank_is_the_minimum_rank_per_layer(tmp_path):
    # tau 0.9 alone keeps few singular values; --rank lifts every layer to at least that rank, it caps none
    low, floored = _dlrt_ranks(tmp_path, 1), _dlrt_ranks(tmp_path, 5)
    assert len(low) == len(floored) == 12  # the tiny BERT's 2 x 6 encoder Linears
    assert min(low) < 5 and min(floored) >= 5, (low, floored)


def test_preset_without_scratch_weights_is_warned(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--train-size", "48", "--val-size", "16", "--preset", "nano",
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [("leantrain: warning: --preset is used only with --init-weights scratch (this run loads --model "
                    "tiny); ignored")], err


def test_save_every_0_writes_no_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--train-size", "48", "--val-size", "16", "--save-every", "0", "--stop-at", "1",
                 "--out", str(out)]) == 0
    # --stop-at still leaves a checkpoint (the help says so); a whole run with --save-every 0 leaves none
    assert (out / "checkpoints").is_dir()
    other = tmp_path / "other"
    assert main(["train", *TINY, "--train-size", "48", "--val-size", "16", "--out", str(other)]) == 0
    assert (other / "trainable.safetensors").is_file() and not (other / "checkpoints").exists()


def test_block_size_is_the_quantization_block(tmp_path):
    state, cfgs = {}, {}
    for block in (64, 256):
        out = tmp_path / str(block)
        assert main(["train", *TINY, "--train-size", "48", "--val-size", "16", "--method", "full", "--optim",
                     "adamw8bit", "--block-size", str(block), "--steps", "1", "--out", str(out)]) == 0
        state[block] = json.loads((out / "metrics.json").read_text())["optimizer_state_bytes"]
        cfgs[block] = TrainConfig.load(out / "config.json")
    assert cfgs[64].max_length == cfgs[256].max_length == 24  # the sequence length is --max-length's
    assert state[64] > state[256]  # one fp32 absmax per block: smaller blocks, more of them


# --- quiet, files, Python API --------------------------------------------------------------------------------------
def test_ddp_wrapper_warns_nothing(tmp_path):
    from torch.nn.parallel import DistributedDataParallel

    from leantrain.dist import DistContext, wrap_model

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings(record=True) as old:
            warnings.simplefilter("always")
            DistributedDataParallel(torch.nn.Linear(2, 2), broadcast_buffers=False)
        with warnings.catch_warnings(record=True) as ours:
            warnings.simplefilter("always")
            model = wrap_model(torch.nn.Linear(2, 2), DistContext(rank=0, world=2, strategy="ddp"))
    finally:
        torch.distributed.destroy_process_group()
    assert isinstance(model, DistributedDataParallel)
    assert [str(w.message) for w in ours] == []
    # the check can fail: this torch does warn about the spelling the DDP runs used
    assert any("broadcast_buffers" in str(w.message) for w in old)


def _modes(root: Path) -> set[tuple[str, int]]:
    return {("dir" if p.is_dir() else "file", p.stat().st_mode & 0o777) for p in root.rglob("*")}


def test_run_and_export_files_follow_the_umask(tmp_path, capsys):
    run, merged = tmp_path / "run", tmp_path / "merged"
    old = os.umask(0o027)
    try:
        assert main(["train", *TINY, "--train-size", "48", "--val-size", "16", "--save-every", "1",
                     "--out", str(run)]) == 0
        assert main(["merge", str(run), "--out", str(merged)]) == 0
    finally:
        os.umask(old)
    assert {p.name for p in run.iterdir()} >= {"config.json", "labels.json", "metrics.json", "checkpoints"}
    assert _modes(run) == {("file", 0o640), ("dir", 0o750)}  # every file and folder of the run, checkpoints too
    assert _modes(merged) == {("file", 0o640)}  # the merged weights, config.json, tokenizer files


def test_python_train_prints_what_the_cli_prints(tmp_path, capsys):
    argv = [*TINY, "--train-size", "48", "--val-size", "16"]
    assert main(["train", *argv, "--out", str(tmp_path / "cli")]) == 0
    cli = capsys.readouterr().out.splitlines()
    cfg = TrainConfig(model="tiny", max_length=24, batch_size=8, progress=False, steps=2, train_size=48, val_size=16,
                      out=str(tmp_path / "py"))
    import leantrain.train  # the module rebinds the package attribute; calling it must still train

    metrics = leantrain.train(cfg)
    py = capsys.readouterr().out.splitlines()
    assert [line[:20] for line in py] == [line[:20] for line in cli] and len(py) == 7, py  # same lines, same order
    assert py[1] == f"run folder          {cfg.out}" and f"{metrics['val_accuracy']:.4f}" in py[2]
    leantrain.train(dataclasses.replace(cfg, out=str(tmp_path / "quiet")), verbose=False)
    assert capsys.readouterr().out == ""

"""Run tracking (issue 25 item 4): --report-to jsonl|tensorboard|none and the classification scores.

The TensorBoard writer is our own (no tensorboard/protobuf dependency), so it is checked three ways: bytes
against a hand encoding of the protobuf wire format, a read-back with our reader, and -- when the ``tensorboard``
package is installed (the bench extra) -- TensorBoard's own EventAccumulator and protobuf classes.
The scores are checked against a hand computation and against scikit-learn.
"""
from __future__ import annotations

import json
import random
import struct

import pytest

from leantrain import class_metrics
from leantrain.cli import main
from leantrain.report import read_jsonl
from leantrain.tfevents import EventWriter, crc32c, encode_event, frame, read_records, read_scalars

TINY = ["--model", "tiny", "--train-size", "96", "--val-size", "48", "--max-length", "24", "--batch-size", "8",
        "--no-progress"]


# --- the event file format -----------------------------------------------------------------------------------------
def test_crc32c_check_values():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C catalogue's check value
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 (iSCSI) B.4: 32 bytes of zeros


def test_event_bytes_match_a_hand_encoding():
    data = encode_event(1.0, 3, {"a": 0.5})
    value = b"\x0a\x01a" + b"\x15" + struct.pack("<f", 0.5)  # Value{tag=1:"a", simple_value=2:0.5f}
    summary = b"\x0a" + bytes([len(value)]) + value  # Summary{value=1}
    expected = b"\x09" + struct.pack("<d", 1.0) + b"\x10\x03" + b"\x2a" + bytes([len(summary)]) + summary
    assert data == expected
    record = frame(data)
    assert struct.unpack("<Q", record[:8])[0] == len(data) and record[12:12 + len(data)] == data
    assert read_records_of(record) == [data]


def read_records_of(raw: bytes) -> list[bytes]:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "events.out.tfevents.1"
        path.write_bytes(raw)
        return read_records(path)


def test_torn_or_corrupt_records_are_named(tmp_path):
    raw = frame(encode_event(1.0, 1, {"x": 1.0}))
    path = tmp_path / "events.out.tfevents.1"
    path.write_bytes(raw + raw[:-3])  # killed while writing the second record
    with pytest.raises(ValueError, match="torn"):
        read_records(path)
    assert read_scalars(tmp_path) == {"x": [(1, 1.0)]}  # the reader of a live run skips the torn tail
    flipped = bytearray(raw)
    flipped[14] ^= 1
    path.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="checksum"):
        read_records(path)


def _write_with_resume(folder):
    """Steps 1-3 logged, a crash, then a resume from the checkpoint at step 2 that logs step 3 anew."""
    w = EventWriter(folder)
    for step, loss in ((1, 1.5), (2, 1.25), (3, 9.0)):
        w.add_scalars(step, {"loss": loss, "lr": 1e-3 * step})
    w.close()
    w = EventWriter(folder, resume_step=2)
    w.add_scalars(3, {"loss": 1.0, "lr": 3e-3})
    w.close()


def test_own_reader_round_trip_and_resume(tmp_path):
    _write_with_resume(tmp_path)
    got = read_scalars(tmp_path)
    def f32(v):  # simple_value is a float32
        return struct.unpack("<f", struct.pack("<f", v))[0]

    assert got["loss"] == [(1, 1.5), (2, 1.25), (3, 1.0)]
    assert got["lr"] == [(s, f32(1e-3 * s)) for s in (1, 2, 3)]
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2


def test_tensorboard_reads_our_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.compat.proto import event_pb2

    _write_with_resume(tmp_path)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["loss", "lr"]
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.5), (2, 1.25), (3, 1.0)]
    first = min(tmp_path.glob("events.out.tfevents.*"))
    events = [event_pb2.Event.FromString(r) for r in read_records(first)]
    assert events[0].file_version == "brain.Event:2"
    assert [(v.tag, v.simple_value) for v in events[1].summary.value] == [("loss", 1.5), ("lr", pytest.approx(1e-3))]


# --- scores ----------------------------------------------------------------------------------------------------------
def test_scores_by_hand():
    true, pred = [0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2]
    matrix = class_metrics.confusion_matrix(true, pred, 4)
    assert matrix == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    scores = class_metrics.class_scores(matrix)
    # class 0: P 2/2, R 2/3, F1 0.8; class 1: P 1/2, R 1/2, F1 0.5; class 2: P 1/2, R 1, F1 2/3
    assert [(s["precision"], s["recall"], s["support"]) for s in scores[:3]] == \
        [(1.0, 2 / 3, 3), (0.5, 0.5, 2), (0.5, 1.0, 1)]
    assert [s["f1"] for s in scores[:3]] == pytest.approx([0.8, 0.5, 2 / 3])
    assert scores[3] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # class 3 occurs nowhere: left out of the average, (0.8 + 0.5 + 2/3) / 3
    assert class_metrics.macro_f1(matrix) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    never_predicted = class_metrics.confusion_matrix([0, 1, 1], [0, 0, 0], 2)
    assert class_metrics.class_scores(never_predicted)[1]["precision"] == 0.0
    assert class_metrics.macro_f1(never_predicted) == pytest.approx((2 * (1 / 3) / (4 / 3) + 0.0) / 2)


def test_scores_match_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    for classes in (2, 3, 7):
        true = [rng.randrange(classes) for _ in range(200)]
        pred = [y if rng.random() < 0.6 else rng.randrange(classes - 1) for y in true]  # last class rarely
        matrix = class_metrics.confusion_matrix(true, pred, classes)
        assert matrix == metrics.confusion_matrix(true, pred, labels=list(range(classes))).tolist()
        assert class_metrics.macro_f1(matrix) == pytest.approx(
            metrics.f1_score(true, pred, average="macro", zero_division=0), abs=1e-12)
        p, r, f, s = metrics.precision_recall_fscore_support(true, pred, labels=list(range(classes)), zero_division=0)
        ours = class_metrics.class_scores(matrix)
        assert [o["precision"] for o in ours] == pytest.approx(p.tolist(), abs=1e-12)
        assert [o["recall"] for o in ours] == pytest.approx(r.tolist(), abs=1e-12)
        assert [o["f1"] for o in ours] == pytest.approx(f.tolist(), abs=1e-12)
        assert [o["support"] for o in ours] == s.tolist()


# --- end to end ------------------------------------------------------------------------------------------------------
def test_run_reports_to_jsonl_and_tensorboard(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "4", "--eval-every", "2", "--report-to", "jsonl,tensorboard",
                 "--out", str(out)]) == 0
    records = read_jsonl(out / "metrics.jsonl")
    events = read_scalars(out / "tensorboard")
    expected: dict[str, list] = {}
    for r in records:
        for key, value in r.items():
            if key != "step":
                expected.setdefault(key, []).append((r["step"], pytest.approx(value, rel=1e-6)))
    assert {"loss", "lr", "val_loss", "val_accuracy", "val_macro_f1"} <= set(expected)
    assert events == expected  # every scalar of metrics.jsonl, at its step (float32 in the event file)
    metrics = json.loads((out / "metrics.json").read_text())
    matrix = metrics["val_confusion_matrix"]["counts"]
    assert metrics["val_confusion_matrix"]["labels"] == ["negative", "neutral", "positive"]
    assert sum(map(sum, matrix)) == metrics["val_examples"]
    assert sum(matrix[i][i] for i in range(3)) / metrics["val_examples"] == pytest.approx(metrics["val_accuracy"])
    assert metrics["val_macro_f1"] == pytest.approx(class_metrics.macro_f1(matrix))
    assert [metrics["val_per_class"][n]["support"] for n in ("negative", "neutral", "positive")] == \
        [sum(row) for row in matrix]
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("report_to, jsonl, events", [("tensorboard", False, True), ("none", False, False)])
def test_report_to_without_jsonl(report_to, jsonl, events, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "3", "--report-to", report_to, "--out", str(out)]) == 0
    assert (out / "metrics.jsonl").exists() == jsonl and (out / "tensorboard").exists() == events
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_loss_last"] is not None and (out / "loss.png").is_file()  # from the in-memory records
    if events:
        assert [s for s, _ in read_scalars(out / "tensorboard")["loss"]] == [1, 2, 3]


def test_tensorboard_resume_matches_the_straight_run(tmp_path):
    common = [*TINY, "--method", "full", "--lr", "1e-3", "--steps", "6", "--save-every", "2",
              "--report-to", "jsonl,tensorboard"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", *common, "--out", str(straight)]) == 0
    assert main(["train", *common, "--stop-at", "4", "--out", str(split)]) == 0
    assert main(["train", "--out", str(split), "--resume", "--no-progress"]) == 0
    assert read_scalars(split / "tensorboard")["loss"] == read_scalars(straight / "tensorboard")["loss"]
    assert [s for s, _ in read_scalars(split / "tensorboard")["loss"]] == [1, 2, 3, 4, 5, 6]


def test_report_to_is_validated(tmp_path, capsys):
    assert main(["train", *TINY, "--report-to", "wandb", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "report_to='wandb'" in err and "tensorboard" in err

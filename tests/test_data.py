"""Offline sources and splits: counts from shared/DATA.md, determinism, no sentence in both splits."""
from __future__ import annotations

from collections import Counter

import pytest

from leantrain.config import TrainConfig
from leantrain.data import deduplicate, load_classification, stratified_indices
from leantrain.sources import bible_division, load_bible, load_table, load_vader, vader_label


def test_vader_matches_published_counts():
    texts, labels, names = load_vader()
    # DATA.md: 23,703 sentences, 9,181 negative / 4,244 neutral / 10,278 positive
    assert len(texts) == 23703
    assert Counter(labels) == {0: 9181, 1: 4244, 2: 10278}
    assert names == ["negative", "neutral", "positive"]


def test_bible_divisions_match_canonical_positions():
    texts, labels, names = load_bible()
    assert len(texts) == 31103 and len(names) == 7
    # Majority class (history) share from DATA.md: 0.226
    assert abs(Counter(labels).most_common(1)[0][1] / len(labels) - 0.226) < 0.001
    assert [bible_division(b) for b in (1, 5, 6, 17, 18, 22, 23, 39, 40, 44, 45, 65, 66)] == \
        [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    with pytest.raises(ValueError, match="67"):
        bible_division(67)


@pytest.mark.parametrize("rating, label", [(-0.5, 0), (-0.49, 1), (0.0, 1), (0.49, 1), (0.5, 2), (3.9, 2)])
def test_vader_thresholds(rating, label):
    assert vader_label(rating) == label


def test_split_is_deterministic_disjoint_and_stratified():
    cfg = TrainConfig(train_size=None, val_size=None)
    a, b = load_classification(cfg), load_classification(TrainConfig(train_size=None, val_size=None, seed=7))
    assert a.train.texts == b.train.texts and a.val.texts == b.val.texts  # the seed does not move the split
    assert not set(a.train.texts) & set(a.val.texts)
    assert len(a.train) + len(a.val) == 23703 - 84  # DATA.md: 84 texts occur more than once
    share_train = Counter(a.train.labels)[0] / len(a.train)
    share_val = Counter(a.val.labels)[0] / len(a.val)
    assert abs(share_train - share_val) < 0.01
    assert abs(len(a.val) / (len(a.train) + len(a.val)) - 0.2) < 0.001


def test_subset_sizes_and_baseline():
    data = load_classification(TrainConfig(train_size=400, val_size=100))
    assert abs(len(data.train) - 400) <= 3 and abs(len(data.val) - 100) <= 3
    assert 0.38 < data.majority_accuracy() < 0.48  # DATA.md: 3-class majority 0.434


def test_deduplicate_keeps_first():
    assert deduplicate(["a", "b", "a"], [1, 2, 3]) == (["a", "b"], [1, 2])


def test_stratified_indices_partition():
    labels = [0] * 10 + [1] * 5 + [2]
    kept, rest = stratified_indices(labels, 0.4, seed=0)
    assert sorted(kept + rest) == list(range(16))
    assert Counter(labels[i] for i in kept) == {0: 4, 1: 2, 2: 1}


def test_table_errors_name_the_problem(tmp_path):
    bad_json = tmp_path / "d.jsonl"
    bad_json.write_text('{"text": "a", "label": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2"):
        load_table(bad_json)
    text_file = tmp_path / "x.txt"
    text_file.write_text("x")
    with pytest.raises(ValueError, match=r"\.csv or \.jsonl"):
        load_table(text_file)
    empty = tmp_path / "e.csv"
    empty.write_text("text,label\n")
    with pytest.raises(ValueError, match="no rows"):
        load_table(empty)


# ---- user labels: stripped, categorical, validation labels seen in training ---------------------------------------
def _csv(path, rows):
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    return str(path)


def test_labels_are_stripped(tmp_path):
    rows = [(f"text {i}", " billing " if i % 2 else "billing") for i in range(20)] + \
           [(f"other {i}", "refund") for i in range(20)]
    data = load_classification(TrainConfig(model="tiny", data=_csv(tmp_path / "d.csv", rows)))
    assert data.label_names == ["billing", "refund"]


def test_continuous_labels_are_refused_whole_numbers_are_classes(tmp_path):
    floats = [(f"t{i}", f"{i / 7:.3f}") for i in range(30)]
    with pytest.raises(ValueError, match=r"label '0\.143' is a continuous number; classification needs categories"):
        load_classification(TrainConfig(model="tiny", data=_csv(tmp_path / "f.csv", floats)))
    ints = [(f"t{i}", i % 3) for i in range(30)]
    assert load_classification(TrainConfig(model="tiny", data=_csv(tmp_path / "i.csv", ints))).label_names == \
        ["0", "1", "2"]


def test_validation_only_labels_are_named(tmp_path):
    train = _csv(tmp_path / "train.csv", [(f"t{i}", "ab"[i % 2]) for i in range(20)])
    val = _csv(tmp_path / "val.csv", [("x", "a"), ("y", "c"), ("z", " b ")])
    with pytest.raises(ValueError, match=r"validation label\(s\) \['c'\] never occur in the training data"):
        load_classification(TrainConfig(model="tiny", data=train, val_data=val))


def test_non_utf8_file_names_file_line_and_column(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\nfine,a\ncaf\xe9,b\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.csv:3:4: not UTF-8 text \(byte 0xe9\)"):
        load_table(path)

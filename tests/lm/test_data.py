"""Packing and loss masking: block boundaries are exact and no prompt token is ever a prediction target."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leantrain.lm.data import (
    VAL_EVERY,
    BlockBatcher,
    Blocks,
    Document,
    VocabMap,
    load_documents,
    pack,
    split_documents,
    tokenize_documents,
)
from leantrain.lm.task import token_loss_sum

EOS = 0


class CharTokenizer:
    """One token per character (ord), so expected streams can be written by hand."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def test_stream_and_mask_by_hand():
    docs = [Document(text="ab"), Document(prompt="xy", response="c"), Document(text="d")]
    ids, mask = tokenize_documents(docs, CharTokenizer(), EOS)
    assert ids == [97, 98, EOS, 120, 121, 99, EOS, 100, EOS]
    assert mask == [True, True, True, False, False, True, True, True, True]


def test_pack_block_boundaries_exact():
    ids = list(range(1, 11))
    blocks = pack(ids, [True] * 10, 3)
    assert blocks.ids.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]  # the tail token 10 is dropped
    assert len(pack(ids, [True] * 10, 11)) == 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.text("abc", min_size=0, max_size=6), st.text("xyz", min_size=1, max_size=6)),
                min_size=1, max_size=12), st.integers(2, 9))
def test_packing_preserves_stream_and_masks_every_prompt_token(pairs, block):
    docs = [Document(prompt=p, response=r) for p, r in pairs]
    ids, mask = tokenize_documents(docs, CharTokenizer(), EOS)
    blocks = pack(ids, mask, block)
    n = len(ids) // block
    assert blocks.ids.reshape(-1).tolist() == ids[: n * block]
    assert blocks.mask.reshape(-1).tolist() == mask[: n * block]
    # Prompt characters are a/b/c; responses x/y/z plus EOS: a target is in the loss iff it is not a prompt token.
    prompt_tokens = {ord(c) for c in "abc"}
    for row_ids, row_mask in zip(blocks.ids.tolist(), blocks.mask.tolist()):
        for t in range(1, block):
            assert row_mask[t] == (row_ids[t] not in prompt_tokens)


def test_loss_has_no_gradient_through_prompt_targets():
    docs = [Document(prompt="ab", response="x"), Document(prompt="c", response="yz")]
    ids, mask = tokenize_documents(docs, CharTokenizer(), EOS)
    blocks = pack(ids, mask, len(ids))
    logits = torch.randn(1, len(ids), 128, requires_grad=True)
    total, count = token_loss_sum(logits, blocks.ids, blocks.mask)
    total.backward()
    # targets are positions 1..L-1; logits at position t predict token t+1
    for t in range(len(ids) - 1):
        touched = bool(logits.grad[0, t].abs().sum() > 0)
        assert touched == mask[t + 1], (t, ids[t + 1])
    assert count == sum(mask[1:])


def test_split_every_twentieth_document():
    docs = [Document(text=str(i)) for i in range(45)]
    train, val = split_documents(docs)
    assert [d.text for d in val] == [str(VAL_EVERY - 1), str(2 * VAL_EVERY - 1)]
    assert len(train) == 43


def test_batches_are_a_pure_function_of_seed_and_index():
    blocks = pack(list(range(200)), [True] * 200, 4)
    a, b = BlockBatcher(blocks, 5, seed=3), BlockBatcher(blocks, 5, seed=3)
    for i in (0, 7, 9, 10, 23):  # 10 batches per epoch: 10 and 23 are in later epochs
        assert torch.equal(a.batch(i)["input_ids"], b.batch(i)["input_ids"])
    epoch0 = torch.cat([a.batch(i)["input_ids"] for i in range(len(a))])
    assert sorted(epoch0[:, 0].tolist()) == list(range(0, 200, 4))  # one epoch visits every block once


def test_vocab_map_round_trip_and_unknown():
    vocab = VocabMap([50, 7, 900], unk_id=3)
    ids = torch.tensor([7, 50, 900, 3, 11])
    compact = vocab.to_compact(ids)
    assert compact.max() < len(vocab) == 4
    assert vocab.to_original(compact).tolist() == [7, 50, 900, 3, 3]  # 11 was never seen -> unk
    assert vocab.unknown_share(ids) == pytest.approx(0.2)


def test_blocks_subset_is_evenly_spaced():
    blocks = Blocks(torch.arange(10).view(10, 1), torch.ones(10, 1, dtype=torch.bool))
    assert blocks.subset(5).ids.view(-1).tolist() == [0, 2, 4, 6, 8]
    assert blocks.subset(None) is blocks


def test_jsonl_and_txt_sources(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "hello"}) + "\n\n" + json.dumps({"prompt": "q", "response": "a"}) + "\n")
    assert load_documents(str(path)) == [Document(text="hello"), Document(prompt="q", response="a")]
    txt = tmp_path / "d.txt"
    txt.write_text("para one\nstill one\n\npara two\n")
    assert [d.text for d in load_documents(str(txt))] == ["para one\nstill one", "para two"]
    txt.write_text("line one\nline two\n")
    assert [d.text for d in load_documents(str(txt))] == ["line one", "line two"]


@pytest.mark.parametrize("content, match", [
    ("\n\n  \n", "empty"),
    ('{"prompt": "q"}\n', "response"),
    ("[1, 2]\n", "JSON object"),
    ("{not json\n", "not valid JSON"),
])
def test_bad_sources_name_the_file(tmp_path, content, match):
    path = tmp_path / ("bad.txt" if match == "empty" else "bad.jsonl")
    path.write_text(content)
    with pytest.raises((ValueError, TypeError), match=match) as info:
        load_documents(str(path))
    assert "bad." in str(info.value)


def test_unknown_suffix_and_missing_file(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="x.csv"):
        load_documents(str(tmp_path / "x.csv"))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_documents(str(tmp_path / "nope.txt"))

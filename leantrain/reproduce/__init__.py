"""``leantrain reproduce NAME``: small, offline versions of each implemented paper's headline experiment.

Each module ``leantrain/reproduce/<name>.py`` exposes ``PAPER`` (title + link), ``run(out, work, quick,
progress) -> Path`` that trains with the library's public API, and writes ``docs/results/<name>/README.md``
(the paper's number beside ours, with a sentence on any difference) and ``<name>.png``.
"""
from __future__ import annotations

EXPERIMENTS = ("dlrt", "miss", "shira", "blockwise8bit", "gradnormlorp", "galore")

__all__ = ["EXPERIMENTS"]

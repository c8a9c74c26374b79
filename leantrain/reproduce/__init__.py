"""``leantrain reproduce NAME``: small, offline versions of each implemented paper's headline experiment.

Each module ``leantrain/reproduce/<name>.py`` exposes ``PAPER`` (title + link), ``run(out, work, quick,
progress) -> Path`` that trains with the library's public API, and writes ``docs/results/<name>/README.md``
(the paper's number beside ours, with a sentence on any difference) and ``<name>.png``.
"""
from __future__ import annotations

EXPERIMENTS = ("dlrt", "miss", "shira", "blockwise8bit", "gradnormlorp", "galore", "dlrt-lenet5")


def module_name(name: str) -> str:
    """The module of experiment ``name`` (a '-' in the CLI name is '_' in the module's)."""
    return f"leantrain.reproduce.{name.replace('-', '_')}"


__all__ = ["EXPERIMENTS", "module_name"]

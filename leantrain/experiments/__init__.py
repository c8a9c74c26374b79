"""One experiment runner for ``leantrain compare``, ``leantrain reproduce`` and the benchmark sweeps.

``run_experiments`` trains a list of named ``TrainConfig`` overrides (in-process or one process per run, cached
by config hash, resumable); ``format_table`` turns the results into one markdown table (mean ± std over seeds);
``plot_panels`` draws them (matplotlib optional). See ``engine.py`` for why overrides are dicts.
"""
from __future__ import annotations

from .engine import (
    DEFAULT_RUNNER,
    Experiment,
    Result,
    base_from_cli,
    config_hash,
    one_line,
    run_experiments,
    train_run,
)
from .plot import Panel, plot_panels
from .table import Column, format_table, group_rows

__all__ = ["DEFAULT_RUNNER", "Column", "Experiment", "Panel", "Result", "base_from_cli", "config_hash",
           "format_table", "group_rows", "one_line", "plot_panels", "run_experiments", "train_run"]

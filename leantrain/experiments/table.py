"""One markdown table formatter for every experiment list: a row per group, mean ± std over its runs.

Rows are flat dicts (``Result.row()``, or rows read back from a results.json), so a saved sweep can be tabulated
again without re-running it. A group with several runs (seeds) shows ``mean ± std`` (sample std) in numeric
columns whose values differ; a failed run gets its own row with the one-line error.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Row = Mapping[str, Any]


@dataclass(frozen=True)
class Column:
    """A table column: a row key (or a function of the row), its format, and how a group's runs combine."""

    header: str
    value: str | Callable[[Row], Any]
    fmt: str = ""  # format spec for numbers, e.g. ".4f" or ","
    scale: float = 1.0  # numbers are multiplied by this first (e.g. 2**-20 for MiB)
    suffix: str = ""
    combine: str = "mean"  # "mean": mean ± std when a group's values differ; "each": every run's value
    sep: str = " "  # separator for combine="each"

    def get(self, row: Row) -> Any:
        """The raw value, or None when the row lacks it (a failed run, an optional metric)."""
        if isinstance(self.value, str):
            return row.get(self.value)
        try:
            return self.value(row)
        except (KeyError, TypeError, ZeroDivisionError):
            return None

    def text(self, value: Any) -> str:
        if value is None:
            return "—"
        if _is_number(value):
            return format(value if self.scale == 1 else value * self.scale, self.fmt) + self.suffix
        return f"{value}{self.suffix}"

    def cell(self, rows: Sequence[Row]) -> str:
        """One group's cell: a single value, mean ± std, or every run's value."""
        values = [self.get(r) for r in rows]
        if self.combine == "each":
            return self.sep.join(self.text(v) for v in values)
        numbers = [v for v in values if _is_number(v)]
        if self.combine == "mean" and len(numbers) == len(values) > 1 and len(set(numbers)) > 1:
            return f"{self.text(statistics.mean(numbers))} ± {self.text(statistics.stdev(numbers))}"
        return self.text(values[0])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _group_of(row: Row, key: str) -> str:
    return str(row.get(key, row.get("name")))


def group_rows(rows: Sequence[Row], key: str = "label") -> dict[str, list[Row]]:
    """Successful rows by group, in order of first appearance."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        if "error" not in row:
            groups.setdefault(_group_of(row, key), []).append(row)
    return groups


def failed_line(row: Row, columns: Sequence[Column], width: int = 80) -> str:
    """The row of a failed run: the cells it still has (config, tags), then ``failed: <error>``."""
    cells, placed = [], False
    for column in columns:
        value = column.get(row)
        if value is None and not placed:
            cells.append(f"failed: {str(row['error'])[:width]}")
            placed = True
        else:
            cells.append("" if value is None else column.text(value))
    return "| " + " | ".join(cells) + " |"


def format_table(rows: Sequence[Row], columns: Sequence[Column], group_key: str = "label") -> str:
    """Markdown table in run order: a group's row (mean ± std over its runs) where it first appears, and a
    ``failed:`` row for every failed run."""
    lines = ["| " + " | ".join(c.header for c in columns) + " |", "|" + "---|" * len(columns)]
    groups, done = group_rows(rows, group_key), set()
    for row in rows:
        if "error" in row:
            lines.append(failed_line(row, columns))
        elif _group_of(row, group_key) not in done:
            done.add(_group_of(row, group_key))
            lines.append("| " + " | ".join(c.cell(groups[_group_of(row, group_key)]) for c in columns) + " |")
    return "\n".join(lines)

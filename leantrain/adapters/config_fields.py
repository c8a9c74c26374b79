"""Typed reads of ``adapter_config.json`` fields.

A PEFT config file is user input: ``int(2.5)``, ``float(True)`` or ``bool("no")`` would silently turn a wrong
value into a different adapter (another rank, another scaling). These readers refuse instead, with a one-line
``ValueError`` naming the key and the value.
"""
from __future__ import annotations

from typing import Any


def _where(kind: str) -> str:
    return f"{kind} adapter_config.json" if kind else "adapter_config.json"


def get_int(d: dict[str, Any], key: str, default: int, kind: str = "", *, minimum: int | None = None) -> int:
    value = d.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{_where(kind)}: {key}={value!r} must be an integer")
    if minimum is not None and value < minimum:
        raise ValueError(f"{_where(kind)}: {key}={value!r} must be >= {minimum}")
    return value


def get_float(d: dict[str, Any], key: str, default: float, kind: str = "") -> float:
    value = d.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{_where(kind)}: {key}={value!r} must be a number")
    return float(value)


def get_bool(d: dict[str, Any], key: str, default: bool, kind: str = "") -> bool:
    value = d.get(key, default)
    if value is None:
        value = default
    if not isinstance(value, bool):
        raise ValueError(f"{_where(kind)}: {key}={value!r} must be true or false")
    return value


def get_dict(d: dict[str, Any], key: str, kind: str = "") -> dict[str, Any]:
    value = d.get(key) or {}
    if not isinstance(value, dict):
        raise ValueError(f"{_where(kind)}: {key}={value!r} must be an object")
    return dict(value)

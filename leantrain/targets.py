"""Which modules a method adapts, converts or quantizes: the one target rule every leantrain module uses.

A *targets* value is one of
  * ``"all-linear"``: every candidate that is a linear layer (the caller says what counts as linear);
  * ``"re:<regex>"``: candidates whose full module name the regex matches entirely (``re.fullmatch``);
  * a comma-separated string (``"query, value"``) or a list of names: a candidate matches when its full name
    equals an entry or ends with ``"." + entry`` (PEFT's rule, so ``query`` hits every attention block).
    Every entry must match some candidate, so a typo fails instead of silently training nothing.

*Candidates* are the named modules the caller offers, filtered by ``kind`` (e.g. ``nn.Linear`` only); the
root module (empty name) is never one.

*Heads*: a module is a task head when any dotted component of its name is one of :data:`HEAD_NAMES`, so the
``classifier.dense`` of a RoBERTa-style head counts as head too. ``heads="auto"`` (the default) leaves heads
out of ``"all-linear"`` and regex selections but lets an explicit name list pick one (naming a module is taken
as intent), unless the caller gives ``exclude``, which then replaces the automatic head rule (PEFT's
``exclude_modules``). ``heads="never"`` removes heads from the candidates for callers that must keep the head a
plain trainable layer (quantization, GradNormLoRP, the low-rank baseline); naming one is then an unmatched
entry.

Where leantrain used to differ: full fine-tuning's GaLore grouping compared only the *last* name component with
the head names; it now uses :func:`is_head` like the rest (the same result on every model leantrain builds).
A plain string here is a comma list; PEFT config files mean a regex by a plain string, and the adapter code
translates that before calling in (``leantrain.adapters.inject``).

This module imports nothing from leantrain and not even torch, so any layer (including the torch-free memory
estimator) can use it.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import nn

HEAD_NAMES: tuple[str, ...] = ("classifier", "lm_head", "score")  # task heads: trained by the loop, kept dense
ALL_LINEAR = "all-linear"

Targets = str | Sequence[str]
Predicate = Callable[[Any], bool]


def is_head(name: str) -> bool:
    """True when any dotted component of the module name ``name`` is a head name."""
    return any(part in HEAD_NAMES for part in name.split("."))


def name_matches(name: str, entry: str) -> bool:
    """PEFT's name rule: the full name equals ``entry`` or ends with ``"." + entry``."""
    return name == entry or name.endswith("." + entry)


def parse_targets(targets: Targets) -> str | re.Pattern[str] | list[str]:
    """Normalise a targets value: ``"all-linear"``, a compiled regex, or the list of names (bad input raises)."""
    if isinstance(targets, str):
        text = targets.strip()
        if text == ALL_LINEAR:
            return ALL_LINEAR
        if text.startswith("re:"):
            try:
                return re.compile(text[3:])
            except re.error as exc:
                raise ValueError(f"targets regex {text[3:]!r} is invalid: {exc}") from exc
        entries = [e.strip() for e in text.split(",") if e.strip()]
    else:
        entries = list(targets)
        if not all(isinstance(e, str) for e in entries):
            raise TypeError(f"targets must be 'all-linear', 're:<regex>', a string or a list of strings, "
                            f"got {targets!r}")
    if not entries:
        raise ValueError(f"targets={targets!r} names no module; give module names, 're:<regex>' or 'all-linear'")
    return entries


def matches(name: str, spec: str | re.Pattern[str] | list[str]) -> bool:
    """Does module ``name`` match a parsed regex or name list (``"all-linear"`` matches every name)?"""
    if isinstance(spec, re.Pattern):
        return spec.fullmatch(name) is not None
    if isinstance(spec, str):
        return True
    return any(name_matches(name, e) for e in spec)


def of_kind(*types: type, exact: bool = False) -> Predicate:
    """A ``kind`` predicate: an instance of one of ``types`` (``exact``: of exactly one of them, no subclass)."""
    if exact:
        return lambda module: type(module) in types
    return lambda module: isinstance(module, types)


def _hint(entry: str, names: list[str]) -> str:
    """'; did you mean ...?' from the candidates' full names and last components, or ''."""
    pool = sorted(set(names) | {n.rsplit(".", 1)[-1] for n in names})
    close = difflib.get_close_matches(entry, pool, n=5, cutoff=0.5)
    return f"; did you mean {', '.join(map(repr, close))}?" if close else ""


def _check_entries(entries: list[str], names: list[str], what: str) -> None:
    """Raise on the first entry that matches no candidate (``what`` ends with 'of <model class>')."""
    for entry in entries:
        if not any(name_matches(n, entry) for n in names):
            raise ValueError(f"target {entry!r} matches no {what}{_hint(entry, names)}")


def select(named: Iterable[tuple[str, Any]], targets: Targets, *, owner: str, kind: Predicate | None = None,
           linear: Predicate | None = None, heads: Literal["auto", "never"] = "auto",
           exclude: Targets | None = None, what: str = "module") -> list[str]:
    """Names (in ``named`` order) of the candidates ``targets`` selects under the rule in the module docstring.

    ``named``: (name, module) pairs, e.g. ``model.named_modules()``; ``owner`` names the model in errors;
    ``kind`` filters the candidates; ``linear`` says which candidates ``"all-linear"`` takes (default: all);
    ``exclude``: names or ``re:`` regex removed from the selection (``[]`` removes nothing and keeps heads);
    ``what`` describes a candidate in errors ("nn.Linear").
    """
    if heads not in ("auto", "never"):
        raise ValueError(f"heads={heads!r} must be 'auto' or 'never'")
    candidates = [(n, m) for n, m in named if n and (kind is None or kind(m))]
    if heads == "never":
        candidates = [(n, m) for n, m in candidates if not is_head(n)]
        what = f"{what} (heads excluded)"
    names = [n for n, _ in candidates]
    spec = parse_targets(targets)
    if spec == ALL_LINEAR:
        chosen = [n for n, m in candidates if linear is None or linear(m)]
    else:
        if isinstance(spec, list):
            _check_entries(spec, names, f"{what} of {owner}")
        chosen = [n for n in names if matches(n, spec)]
    if exclude is None:
        if not isinstance(spec, list):
            chosen = [n for n in chosen if not is_head(n)]
    elif exclude:
        dropped = parse_targets(exclude)
        chosen = [n for n in chosen if not matches(n, dropped)]
    if not chosen:
        raise ValueError(f"targets={targets!r} selects no {what} of {owner}")
    return chosen


def resolve(model: nn.Module, targets: Targets, **kwargs: Any) -> list[str]:
    """:func:`select` over ``model.named_modules()``, naming ``model``'s class in errors."""
    return select(model.named_modules(), targets, owner=type(model).__name__, **kwargs)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model`` (the parent must exist)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)

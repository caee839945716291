"""Check a params file's written conclusion against the run it describes.

``notes.conclusion`` is prose that quotes measured figures ("rank 4 subject fidelity 0.67").
The prose does not change when the run does (notes are outside the params hash), so a
conclusion can outlive its numbers. :func:`check` flags that:

Rule for which numbers count as quoted figures: a decimal in [0, 1] written with two or three
decimals (``0.67``, ``.83``, ``1.00``, ``0.668``). Learning rates (``2e-3``, ``0.0004``), step
counts, percentages, dates, version numbers (``0.42.1``) and one-decimal values (``0.3``) are
not figures. Figures equal to a params value the experiment sets or varies (``captions.dropout
0.10``) are ignored, and so is anything in backticks: quote an earlier run's figures as
```0.08``` to keep them out of the check.

A figure matches when some metric value of the run's table (every row of ablation.json, base
included, nested values too) rounds to it at the quoted precision; figures matching none are
listed as missing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

# two or three decimals, not part of a longer number or a version string
_FIGURE_RE = re.compile(r"(?<![\w.])([01]?\.\d{2,3})(?!\.?\d)")
_CODE_RE = re.compile(r"`[^`]*`")

EMPTY = "no measured conclusion yet"


def quoted_figures(text: str) -> list[str]:
    """The figures the conclusion quotes (see the module docstring), as written, in order, once each."""
    prose = _CODE_RE.sub(" ", text or "")
    found = [m.group(1) for m in _FIGURE_RE.finditer(prose)]
    return list(dict.fromkeys(f for f in found if float(f) <= 1.0))


def metric_values(rows: Iterable[Mapping[str, Any]]) -> list[float]:
    """Every number in the rows' ``metrics`` (nested mappings too); booleans are not numbers."""
    out: list[float] = []

    def walk(v: Any) -> None:
        if isinstance(v, Mapping):
            for x in v.values():
                walk(x)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))

    for row in rows:
        if isinstance(row, Mapping):  # a hand-edited table may hold anything
            walk(row.get("metrics") or {})
    return out


def _matches(figure: str, value: float) -> bool:
    decimals = len(figure.split(".")[1])
    # half a unit of the last quoted digit, either way: 0.625 may be written 0.62 or 0.63
    return abs(value - float(figure)) <= 0.5 * 10 ** -decimals + 1e-9


def check(conclusion: str, rows: Iterable[Mapping[str, Any]], ignore: Iterable[Any] = ()) -> dict:
    """``{"status", "figures", "missing", "message"}``: status ``empty`` (nothing written),
    ``stale`` (some quoted figure is in no row's metrics: ``missing`` lists them), ``ok``, or
    ``unchecked`` (the conclusion quotes no figure). ``ignore``: params values to skip."""
    text = " ".join(str(conclusion or "").split())
    if not text:
        return {"status": "empty", "figures": [], "missing": [], "message": EMPTY}
    skip = [float(v) for v in ignore if isinstance(v, (int, float)) and not isinstance(v, bool)]
    figures = [f for f in quoted_figures(text) if not any(abs(float(f) - v) < 1e-12 for v in skip)]
    values = metric_values(rows)
    missing = [f for f in figures if not any(_matches(f, v) for v in values)]
    if missing:
        return {"status": "stale", "figures": figures, "missing": missing,
                "message": f"conclusion may be stale: {', '.join(missing)} not in this run's table"}
    return {"status": "ok" if figures else "unchecked", "figures": figures, "missing": [], "message": ""}


def params_figures(vary: Mapping[str, list], variants: Mapping[str, Mapping], diff: Mapping[str, tuple]) -> list:
    """The params values an experiment sets or varies (its ablation values, its variants'
    overrides, its own values that differ from the parent): a conclusion names them as settings."""
    out: list = [v for values in (vary or {}).values() if isinstance(values, list) for v in values]
    out += [v for overrides in (variants or {}).values() if isinstance(overrides, Mapping) for v in overrides.values()]
    out += [pair[1] for pair in (diff or {}).values() if isinstance(pair, (list, tuple)) and len(pair) > 1]
    return out


def first_sentence(text: str) -> str:
    """The first sentence of a paragraph (up to a full stop followed by a space and a capital,
    so "e.g. this" and "0.67." inside a sentence do not end it), whitespace collapsed."""
    text = " ".join(str(text or "").split())
    m = re.search(r"(?<!\be\.g)(?<!\bi\.e)[.!?](?=\s+[A-Z(\"'`])", text)
    return text[:m.end()] if m else text


_DIFFERS_RE = re.compile(r"\b(differs?|disagrees?|contradicts?)\b[^.]*\bnotes\b", re.IGNORECASE)
_AGREES_RE = re.compile(r"\b(agrees?|confirms?)\b[^.]*\bnotes\b", re.IGNORECASE)


def verdict(notes: Mapping[str, Any]) -> str:
    """agrees / differs / partly with the research notes: ``notes.verdict`` when set, else read
    from the conclusion ("… differs from the notes", "… agrees with the notes"); '' when unknown."""
    said = str(notes.get("verdict") or "").strip().lower()
    if said:
        return said
    text = " ".join(str(notes.get("conclusion") or "").split())
    differs, agrees = bool(_DIFFERS_RE.search(text)), bool(_AGREES_RE.search(text))
    if differs and agrees:
        return "partly"
    return "differs" if differs else ("agrees" if agrees else "")

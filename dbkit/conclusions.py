"""A params file's written conclusion, tied to the table it describes by reference.

``notes.conclusion`` is prose about measured figures. Copying a figure into prose lets it
outlive its table (notes are outside the params hash) and lets a wrong figure pass as long
as *some* cell rounds to it: prior.yaml said 0.62 for a 0.6146 because another row's
``background_leak`` was 0.625. So a conclusion quotes figures **by reference** and the
report, the index and ``dbkit`` fill them in from the table:

- ``{prompt_fidelity@prior.enabled=False}``: a row's metric, two decimals (``0.61``);
- ``{subject_fidelity@main|ci}``: with its Wilson 95% interval (``0.50 [0.39, 0.61]``);
- ``{subject_fidelity@prior.enabled=False - main}``: a difference of two rows with
  Newcombe's 95% interval, ``+0.46 [+0.32, +0.57]``, followed by ``(within noise)`` when the
  interval holds 0. A sentence saying one row beats another cites such a difference.

A row is named by its label in the table (``base``, a variant's label) or ``main`` for the
experiment's own run. A reference to a row or metric the table lacks makes the conclusion
*stale* (structural: nothing rounds its way past it).

A **bare figure** (a decimal in [0, 1] with two or three decimals: ``0.67``, ``.83``, ``1.00``)
is refused at params load: it is a copy. Settings the experiment sets or varies
(``captions.dropout 0.10``) are not figures, and anything in backticks is left alone: quote
an earlier run's figure as ```0.08``` and say which run it came from. Learning rates
(``2e-3``), step counts, percentages, dates and one-decimal values (``0.3``) are not figures.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import intervals

# two or three decimals, not part of a longer number or a version string
# two or more decimals (a table cell copied whole, 0.6146, counts too), not part of a longer
# number or a version string; values below 0.01 written with 4+ decimals are rates of learning
# or decay (0.0004), not figures
_FIGURE_RE = re.compile(r"(?<![\w.])([01]?\.(?!00\d\d)\d{2,})(?!\.?\d)")
_CODE_RE = re.compile(r"`[^`]*`")

EMPTY = "no measured conclusion yet"


def quoted_figures(text: str) -> list[str]:
    """The figures the conclusion quotes (see the module docstring), as written, in order, once each."""
    prose = _CODE_RE.sub(" ", text or "")
    found = [m.group(1) for m in _FIGURE_RE.finditer(prose)]
    return list(dict.fromkeys(f for f in found if float(f) <= 1.0))


_REF_RE = re.compile(r"\{([A-Za-z_][\w.]*)@([^{}|]+?)(?:\|(ci))?\}")
MAIN = "main"  # the experiment's own run, whatever its label ("<experiment> (this run)")


@dataclass(frozen=True)
class Reference:
    """One ``{metric@row}`` in a conclusion: ``rows`` has one label, or two for a difference."""

    text: str
    metric: str
    rows: tuple[str, ...]
    ci: bool


def references(text: str) -> list[Reference]:
    """The references in a conclusion, in order (see the module docstring)."""
    out = []
    for m in _REF_RE.finditer(text or ""):
        rows = tuple(r.strip() for r in " ".join(m.group(2).split()).split(" - "))  # wrapped lines too
        out.append(Reference(m.group(0), m.group(1), rows, bool(m.group(3)) or len(rows) == 2))
    return out


def _row(label: str, rows: list[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    for row in rows:
        name = " ".join(str(row.get("label", "")).split())
        if name == label or (label == MAIN and name.endswith(" (this run)")):
            return row
    return None


def _value(metrics: Mapping[str, Any], dotted: str) -> float | None:
    cur: Any = metrics
    for part in dotted.split("."):
        cur = cur.get(part) if isinstance(cur, Mapping) else None
    ok = isinstance(cur, (int, float)) and not isinstance(cur, bool) and math.isfinite(cur)
    return float(cur) if ok else None


def resolve(ref: Reference, rows: Iterable[Mapping[str, Any]]) -> str:
    """The text a reference stands for; :class:`KeyError` naming the missing row or metric."""
    rows = [r for r in rows if isinstance(r, Mapping)]
    labels = ref.rows
    if len(labels) > 1 and _row(" - ".join(labels), rows) is not None:  # a label that holds " - "
        labels = (" - ".join(labels),)
    elif len(labels) > 2:
        raise KeyError(f"{ref.text}: a difference names two rows, not {len(labels)}")
    found = []
    for label in labels:
        row = _row(label, rows)
        if row is None:
            raise KeyError(f"{ref.text}: no row '{label}' in the table (rows: "
                           f"{', '.join(str(r.get('label')) for r in rows)}; '{MAIN}' is the experiment's own run)")
        metrics = row.get("metrics") or {}
        value = _value(metrics, ref.metric)
        if value is None:
            raise KeyError(f"{ref.text}: row '{label}' has no metric '{ref.metric}'")
        found.append((value, metrics))
    if len(found) == 1:
        value, metrics = found[0]
        return intervals.fmt(value, intervals.interval(metrics, ref.metric) if ref.ci else None)
    return _difference(ref.metric, found[0], found[1])


def _difference(metric: str, a: tuple[float, Mapping], b: tuple[float, Mapping]) -> str:
    na, nb = intervals.denominators(a[1]).get(metric), intervals.denominators(b[1]).get(metric)
    if na is None or nb is None:  # a continuous score: no interval this module can honestly give
        return f"{a[0] - b[0]:+.2f} (no interval: not a rate)"
    d, low, high = intervals.difference(a[0], na, b[0], nb)
    noise = " (within noise)" if low <= 0 <= high else ""
    return f"{d:+.2f} [{low:+.2f}, {high:+.2f}]{noise}"


def render(text: str, rows: Iterable[Mapping[str, Any]]) -> str:
    """The conclusion with every reference filled in from ``rows``; a reference that does not
    resolve is left as written, marked ``⚠``."""
    rows = list(rows)
    text = " ".join(str(text or "").split())  # as check() reads it: a reference may wrap lines

    def fill(m: re.Match) -> str:
        ref = references(m.group(0))[0]
        try:
            return resolve(ref, rows)
        except KeyError:
            return f"⚠{ref.text}"

    return _REF_RE.sub(fill, text)


def bare_figures(text: str, ignore: Iterable[Any] = ()) -> list[str]:
    """Figures copied into the prose (see the module docstring): decimals outside references
    and backticks that are not a params value the experiment sets or varies."""
    skip = [float(v) for v in ignore if isinstance(v, (int, float)) and not isinstance(v, bool)]
    prose = _REF_RE.sub(" ", text or "")
    return [f for f in quoted_figures(prose) if not any(abs(float(f) - v) < 1e-12 for v in skip)]


def check(conclusion: str, rows: Iterable[Mapping[str, Any]], ignore: Iterable[Any] = ()) -> dict:
    """``{"status", "figures", "missing", "message"}``: status ``empty`` (nothing written),
    ``stale`` (a reference names a row or metric the table lacks, or a figure is copied in
    bare: ``missing`` lists them), ``ok``, or ``unchecked`` (no reference: prose only).
    ``figures`` are the references. ``ignore``: params values to skip."""
    text = " ".join(str(conclusion or "").split())
    if not text:
        return {"status": "empty", "figures": [], "missing": [], "message": EMPTY}
    rows = list(rows)
    refs = references(text)
    missing, why = [], []
    for ref in refs:
        try:
            resolve(ref, rows)
        except KeyError as e:
            missing.append(ref.text)
            why.append(str(e.args[0]))
    bare = bare_figures(text, ignore)
    if bare:
        missing += bare
        why.append(f"{', '.join(bare)} copied in bare: cite the table as {{metric@row}} instead")
    figures = [r.text for r in refs]
    if missing:
        return {"status": "stale", "figures": figures, "missing": missing,
                "message": "conclusion may be stale: " + "; ".join(why)}
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

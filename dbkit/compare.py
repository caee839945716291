"""`dbkit compare A B`: only what differs between two runs — params, metrics, and their
grids side by side.

A and B are each one of:

- a run folder (``runs/<experiment>/<hash12>``) or a params file (resolved to the run folder
  its params hash names): params from ``params.yaml`` (what the run was trained with), metrics
  from ``metrics.json`` (the trained model's, as the report shows);
- a committed report row, ``reports/<experiment>/<hash12>#<label>`` (``reports/<experiment>``
  alone means its newest version, ``#<label>`` left out means the report's own run): params and
  metrics from that row of the report's ``summary.json``, so a clone without ``runs/`` can
  compare the research notes' measurements.

Both kinds become a :class:`Side`, and everything after that (differences, text, HTML) sees
only sides, so a run folder can be compared with a report row.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import config, runs
from .files import atomic_write_text, read_json

MAIN_ROW = "{experiment} (this run)"  # the label report.py gives the report's own run
# Keys that name or describe a run without changing what it trains (config.HASH_EXCLUDE's
# reasoning): every variant's experiment name differs, and a diff of notes prints paragraphs,
# so they are named on one line of their own rather than listed as params that differ.
DESCRIPTIVE = ("experiment", "notes")


class CompareError(ValueError):
    """A and B cannot be compared (the message names the path and what to do)."""


@dataclass(frozen=True)
class Side:
    """One side of a comparison: what it was trained with, what it measured, its pictures."""

    name: str
    params: dict
    metrics: dict
    # loaded only when the HTML page is written (preview grids are built from many samples)
    pictures: Callable[[], list[tuple[str, Any]]] = field(default=lambda: [], compare=False)
    no_pictures: str = "no pictures"  # what the page says when pictures() finds none
    note: str = ""  # printed under the side's name (e.g. which report version was picked)


# ----------------------------------------------------------------------------- run folders


def run_folder(arg: str | Path) -> Path:
    """A run folder from a run folder or a params file."""
    p = Path(arg)
    if p.is_dir():
        if not (p / "params.yaml").is_file():
            raise CompareError(f"{p}: not a run folder (no params.yaml): pass runs/<experiment>/<hash> or a "
                               "params file")
        return p
    if p.is_file():
        exp = config.load(p, [], check_prose=False)  # comparing publishes nothing
        rd = runs.RUNS_ROOT / exp.name / exp.hash[:12]  # not runs.run_dir: comparing creates nothing
        if not (rd / "params.yaml").is_file():
            raise CompareError(f"{p}: its run folder {rd} does not exist yet: `dbkit run {p}` first")
        return rd
    raise CompareError(f"{p}: no such run folder or params file")


def _params(rd: Path) -> dict:
    return yaml.safe_load((rd / "params.yaml").read_text(encoding="utf-8")) or {}


def run_side(rd: Path) -> Side:
    """A run folder as a side."""
    return Side(str(rd), _params(rd), read_json(rd / "metrics.json") or {}, pictures=lambda: _grids(rd))


def _grids(rd: Path) -> list[tuple[str, Any]]:
    """The run's pictures: training previews (rows = steps, columns = seeds) and ablation grids."""
    from . import report, workflow

    out = []
    for k in range(8):
        g = workflow.preview_grid(rd, k)
        if g is None:
            break
        out.append((f"previews, prompt {k}", g))
    for path in sorted((rd / "ablation").glob("grid_p*.png")):
        out.append((f"ablation {path.stem}", report.open_image(path)))
    return out


# ----------------------------------------------------------------------------- report rows


def _is_report(p: Path) -> bool:
    """A report version folder, or an experiment folder holding some."""
    return (p / "summary.json").is_file() or bool(_versions(p))


def _versions(folder: Path) -> list[Path]:
    return [d for d in folder.iterdir() if d.is_dir() and (d / "summary.json").is_file()] if folder.is_dir() else []


def _published(version: Path) -> str:
    """When a version was published, from version.json's own stamp: a clone's file times are
    the checkout's, not the run's."""
    info = read_json(version / "version.json") or {}
    return str(info.get("published") or (read_json(version / "summary.json") or {}).get("date") or "")


def report_version(folder: Path) -> tuple[Path, str]:
    """The version folder a report path means, and a note when it had to choose among several."""
    if (folder / "summary.json").is_file():
        return folder, ""
    versions = sorted(_versions(folder), key=lambda d: (_published(d), d.name))
    if not versions:
        raise CompareError(f"{folder}: no report here (no summary.json in it or its hash folders)")
    newest = versions[-1]
    if len(versions) == 1:
        return newest, ""
    return newest, (f"{folder} has {len(versions)} reports: using the newest, {newest.name} "
                    f"(published {_published(newest) or 'unknown'}); name another as {folder}/<hash12>")


def _find_row(rows: list[dict], label: str) -> dict | None:
    """The row labelled so, else the variant whose run folder is ``<experiment>__<label>``
    (``ema_decay-0.99`` for the row labelled ``train.ema_decay=0.99``)."""
    for r in rows:
        if r.get("label") == label:
            return r
    for r in rows:
        exp = Path(r.get("run_dir") or "").parent.name
        if exp == label or exp.endswith(f"__{label}"):
            return r
    return None


def report_side(folder: Path, label: str = "") -> Side:
    """One row of a committed report as a side (the report's own run when label is empty)."""
    version, note = report_version(folder)
    path = version / "summary.json"
    summary = read_json(path) or {}
    rows = summary.get("rows") or []
    label = label or MAIN_ROW.format(experiment=summary.get("experiment", folder.name))
    row = _find_row(rows, label)
    labels = ", ".join(repr(r.get("label")) for r in rows)
    if row is None:
        raise CompareError(f"{path}: no row labelled {label!r}; the labels there: {labels}")
    if not isinstance(row.get("params"), dict):
        # the untrained base and merged/borrowed LoRAs have no params of their own: an empty
        # dict would list every key of the other side as a "difference"
        with_params = ", ".join(repr(r.get("label")) for r in rows if isinstance(r.get("params"), dict))
        raise CompareError(f"{path}: row {row.get('label')!r} has no params (the untrained base model, or a "
                           f"model this run did not train): compare a trained row: {with_params}")
    grids = [version / g["file"] for g in summary.get("grids") or [] if isinstance(g, dict) and g.get("file")]
    return Side(f"{version}#{row['label']}", row["params"], row.get("metrics") or {},
                pictures=lambda: _report_grids(grids),
                no_pictures="no pictures committed (the report's grids are not in its folder: re-run its "
                            "params file to get them)",
                note=note)


def _report_grids(paths: list[Path]) -> list[tuple[str, Any]]:
    """The report's ablation grids that exist (named as a run folder's, so they line up)."""
    from . import report

    return [(f"ablation {p.stem}", report.open_image(p)) for p in paths if p.is_file()]


# ----------------------------------------------------------------------------- any argument


def side(arg: str | Path) -> Side:
    """A side from a run folder, a params file, or a report (``reports/<exp>[/<hash12>][#label]``)."""
    text = str(arg)
    p = Path(text)
    if not p.exists() and "#" in text:  # a '#' that is part of an existing path is not a label
        folder, label = text.rsplit("#", 1)
        if not Path(folder).is_dir():
            raise CompareError(f"{folder}: no such report folder")
        return report_side(Path(folder), label)
    if p.is_dir() and not (p / "params.yaml").is_file() and _is_report(p):
        return report_side(p)
    if not p.exists():
        raise CompareError(f"{p}: no such run folder or params file (nor a report: "
                           "reports/<experiment>[/<hash12>][#label])")
    return run_side(run_folder(p))


def _as_side(x: Side | Path | str) -> Side:
    """Run folders as sides, for the callers written before report rows existed."""
    return x if isinstance(x, Side) else run_side(Path(x))


# ----------------------------------------------------------------------------- output


def differences(a: Side | Path, b: Side | Path) -> dict[str, dict[str, tuple[Any, Any]]]:
    """{"params": {key: (a, b)}, "metrics": {key: (a, b)}}, only keys whose values differ."""
    a, b = _as_side(a), _as_side(b)
    return {"params": config.diff(_trained(a.params), _trained(b.params)),
            "metrics": config.diff(a.metrics, b.metrics)}


def _trained(params: dict) -> dict:
    # a run made before metrics.seed existed drew the seeds the key's default names: no difference
    return {k: v for k, v in config.with_added_keys(params).items() if k not in DESCRIPTIVE}


def _descriptive_differences(a: Side, b: Side) -> list[str]:
    return [k for k in DESCRIPTIVE if a.params.get(k) != b.params.get(k)]


def as_text(a: Side | Path, b: Side | Path, diff: dict) -> str:
    a, b = _as_side(a), _as_side(b)
    lines = []
    for tag, s in (("A", a), ("B", b)):
        lines.append(f"{tag}: {s.name}")
        if s.note:
            lines.append(f"   ({s.note})")
    if described := _descriptive_differences(a, b):
        lines.append(f"named/described differently (not params that train): {', '.join(described)}")
    for section in ("params", "metrics"):
        rows = diff[section]
        lines.append(f"{section}: " + ("the same" if not rows else f"{len(rows)} differ"))
        width = max((len(k) for k in rows), default=0)
        lines += [f"  {k.ljust(width)}  {va!r}  →  {vb!r}" for k, (va, vb) in rows.items()]
    return "\n".join(lines)


def write_html(a: Side | Path, b: Side | Path, diff: dict, out: Path) -> Path:
    """A self-contained page: the two diff tables, then each side's grids side by side."""
    from . import report

    a, b = _as_side(a), _as_side(b)

    def table(rows: dict) -> str:
        if not rows:
            return "<p>the same</p>"
        body = "".join(f"<tr><td><code>{html.escape(k)}</code></td><td>{html.escape(repr(va))}</td>"
                       f"<td>{html.escape(repr(vb))}</td></tr>" for k, (va, vb) in rows.items())
        return f"<table><tr><th>key</th><th>A</th><th>B</th></tr>{body}</table>"

    def img(im: Any) -> str:
        data, fmt = report.embed_bytes(im)
        return f'<img src="data:image/{fmt};base64,{base64.b64encode(data).decode()}" style="max-width:100%">'

    ga, gb = dict(a.pictures()), dict(b.pictures())
    missing = "".join(f"<p>{tag}: {html.escape(s.no_pictures)}</p>" for tag, s, g in (("A", a, ga), ("B", b, gb))
                      if not g)
    pics = "".join(f"<h3>{html.escape(name)}</h3><div style='display:flex;gap:12px'>"
                   f"<div>{img(ga[name]) if name in ga else '—'}</div><div>{img(gb[name]) if name in gb else '—'}"
                   "</div></div>" for name in dict.fromkeys([*ga, *gb]))
    notes = "".join(f"<p><small>{html.escape(s.note)}</small></p>" for s in (a, b) if s.note)
    if described := _descriptive_differences(a, b):
        notes += f"<p>Named/described differently (not params that train): {html.escape(', '.join(described))}</p>"
    page = (f"<!doctype html><meta charset='utf-8'><title>compare</title><body style='font-family:sans-serif'>"
            f"<h1>A vs B</h1><p>A: <code>{html.escape(a.name)}</code><br>B: <code>{html.escape(b.name)}</code></p>"
            f"{notes}<h2>Params that differ</h2>{table(diff['params'])}<h2>Metrics that differ</h2>"
            f"{table(diff['metrics'])}<h2>Pictures (left A, right B)</h2>{missing}{pics}</body>")
    atomic_write_text(out, page)
    return out

"""`dbkit compare A B`: only what differs between two runs — params, metrics, and their
grids side by side.

A and B are run folders (``runs/<experiment>/<hash12>``) or params files (resolved to the run
folder their params hash names). Params come from each folder's ``params.yaml`` (what the run
was trained with), metrics from ``metrics.json`` (the trained model's, as the report shows).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import yaml

from . import config, runs
from .files import atomic_write_text, read_json


class CompareError(ValueError):
    """A and B cannot be compared (the message names the path and what to do)."""


def run_folder(arg: str | Path) -> Path:
    """A run folder from a run folder or a params file."""
    p = Path(arg)
    if p.is_dir():
        if not (p / "params.yaml").is_file():
            raise CompareError(f"{p}: not a run folder (no params.yaml): pass runs/<experiment>/<hash> or a "
                               "params file")
        return p
    if p.is_file():
        exp = config.load(p, [])
        rd = runs.RUNS_ROOT / exp.name / exp.hash[:12]  # not runs.run_dir: comparing creates nothing
        if not (rd / "params.yaml").is_file():
            raise CompareError(f"{p}: its run folder {rd} does not exist yet: `dbkit run {p}` first")
        return rd
    raise CompareError(f"{p}: no such run folder or params file")


def _params(rd: Path) -> dict:
    return yaml.safe_load((rd / "params.yaml").read_text(encoding="utf-8")) or {}


def differences(a: Path, b: Path) -> dict[str, dict[str, tuple[Any, Any]]]:
    """{"params": {key: (a, b)}, "metrics": {key: (a, b)}}, only keys whose values differ."""
    return {"params": config.diff(_params(a), _params(b)),
            "metrics": config.diff(read_json(a / "metrics.json") or {}, read_json(b / "metrics.json") or {})}


def as_text(a: Path, b: Path, diff: dict) -> str:
    lines = [f"A: {a}", f"B: {b}"]
    for section in ("params", "metrics"):
        rows = diff[section]
        lines.append(f"{section}: " + ("the same" if not rows else f"{len(rows)} differ"))
        width = max((len(k) for k in rows), default=0)
        lines += [f"  {k.ljust(width)}  {va!r}  →  {vb!r}" for k, (va, vb) in rows.items()]
    return "\n".join(lines)


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


def write_html(a: Path, b: Path, diff: dict, out: Path) -> Path:
    """A self-contained page: the two diff tables, then each run's grids side by side."""
    from . import report

    def table(rows: dict) -> str:
        if not rows:
            return "<p>the same</p>"
        body = "".join(f"<tr><td><code>{html.escape(k)}</code></td><td>{html.escape(repr(va))}</td>"
                       f"<td>{html.escape(repr(vb))}</td></tr>" for k, (va, vb) in rows.items())
        return f"<table><tr><th>key</th><th>A</th><th>B</th></tr>{body}</table>"

    def img(im: Any) -> str:
        data, fmt = report.embed_bytes(im)
        return f'<img src="data:image/{fmt};base64,{base64.b64encode(data).decode()}" style="max-width:100%">'

    ga, gb = dict(_grids(a)), dict(_grids(b))
    pics = "".join(f"<h3>{html.escape(name)}</h3><div style='display:flex;gap:12px'>"
                   f"<div>{img(ga[name]) if name in ga else '—'}</div><div>{img(gb[name]) if name in gb else '—'}"
                   "</div></div>" for name in dict.fromkeys([*ga, *gb]))
    page = (f"<!doctype html><meta charset='utf-8'><title>compare</title><body style='font-family:sans-serif'>"
            f"<h1>A vs B</h1><p>A: <code>{html.escape(str(a))}</code><br>B: <code>{html.escape(str(b))}</code></p>"
            f"<h2>Params that differ</h2>{table(diff['params'])}<h2>Metrics that differ</h2>{table(diff['metrics'])}"
            f"<h2>Pictures (left A, right B)</h2>{pics}</body>")
    atomic_write_text(out, page)
    return out

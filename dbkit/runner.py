"""`dbkit run`: execute the experiment notebooks with papermill and publish them as HTML reports.

An experiment is five notebooks run in order (:data:`NOTEBOOKS`). Each gets three
parameters — ``params_path``, ``overrides`` and ``run_dir`` — and hands results to the next
through files in the run folder, never through Python state. The params are validated
before anything runs, so a typo costs a second, not a training run.

Outputs, under ``reports/<experiment>/``:

- ``<nb>.ipynb``: the executed notebook (with its code, for debugging);
- ``<nb>.html``: the same without code cells or prompts, self-contained (see below);
- ``index.html``: the report notebook's page with a nav to the four others;

and ``reports/index.html`` (:func:`build_index`), one row per experiment that has a
``summary.json`` written by :func:`dbkit.report.write_summary`.

Self-contained HTML: nbconvert's lab template loads require.js, MathJax, Mermaid and the
widget manager from CDNs. :data:`_TEMPLATE` extends it with those blocks emptied and widget
views replaced by their text fallback; :func:`strip_external` then removes any
remaining external ``src``/``href`` (e.g. a ``<script src=https://…>`` in an HTML output or a
remote image in Markdown), so that a report opens offline and never phones home. Images
are already base64 PNGs in the outputs. Consequence: LaTeX in Markdown shows as source.
"""

from __future__ import annotations

import contextlib
import html
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jupyter_client.manager import AsyncKernelManager
from traitlets import default

from . import config, runs

NOTEBOOKS = ("01_data", "02_captions", "03_train", "04_ablations", "05_report")
TITLES = {"01_data": "Data", "02_captions": "Captions", "03_train": "Training",
          "04_ablations": "Ablations", "05_report": "Report"}
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")

_TEMPLATE = r"""{%- extends 'index.html.j2' -%}
{#- dbkit: the lab template without anything fetched from a CDN -#}
{% block html_head_js %}{% endblock html_head_js %}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
{% block html_head_js_mathjax %}{% endblock html_head_js_mathjax %}
{% block html_head_js_mermaidjs %}{% endblock html_head_js_mermaidjs %}
{% block extra_css %}
<style type="text/css">{{ resources.get('dbkit_css', '') }}</style>
{% endblock extra_css %}
{% block body_header %}{{ super() }}{{ resources.get('dbkit_nav', '') }}{% endblock body_header %}
{%- block data_widget_view scoped %}
<div class="jp-RenderedText jp-OutputArea-output {{ extra_class }}" data-mime-type="text/plain">
<pre>{{ output.data.get('text/plain', '[interactive widget: not shown in the static report]')
        | ansi2html }}</pre>
</div>
{%- endblock data_widget_view -%}
"""

_NAV_CSS = """
nav.dbkit-nav { position: sticky; top: 0; z-index: 10; background: #f6f8fa; border-bottom: 1px solid #d0d7de;
  padding: 8px 16px; font: 14px system-ui, sans-serif; }
nav.dbkit-nav a { margin-right: 14px; color: #0969da; text-decoration: none; }
nav.dbkit-nav a.current { color: #24292f; font-weight: 600; }
nav.dbkit-nav .exp { font-weight: 600; margin-right: 18px; }
"""


class NotebookFailed(RuntimeError):
    """A notebook cell raised; the partial notebook was still rendered to ``html_path``."""

    def __init__(self, notebook: str, cell: str | None, ename: str, evalue: str, html_path: Path | None):
        self.notebook, self.cell, self.ename, self.evalue = notebook, cell, ename, evalue
        self.html_path = html_path
        where = f", cell {cell}" if cell is not None else ""
        super().__init__(f"FAILED: {notebook}.ipynb{where}: {ename}: {evalue}")


class _VenvKernelManager(AsyncKernelManager):
    """Starts ipykernel with this interpreter even if a user-level kernelspec names another.

    A ``python3`` kernelspec in ~/.local/share/jupyter takes precedence over the venv's and
    may point at a Python without dbkit or torch; the notebooks must run where dbkit runs.
    Transport encryption is on where pyzmq supports it (the kernel warns on every start
    otherwise, and nothing else should read the notebooks' traffic).
    """

    @default("transport_encryption")
    def _default_transport_encryption(self) -> str:
        import zmq

        return "auto" if zmq.has("curve") else "disabled"

    def format_kernel_cmd(self, extra_arguments: list[str] | None = None) -> list[str]:
        cmd = super().format_kernel_cmd(extra_arguments)
        if len(cmd) > 2 and cmd[1] == "-m" and cmd[2] in ("ipykernel_launcher", "ipykernel"):
            cmd[0] = sys.executable
        return cmd


# ----------------------------------------------------------------------------- HTML


# A start tag whose src/href/… attribute points off-machine; <a href> is allowed (clicking is fine).
_TAG_RE = re.compile(r"<([a-zA-Z][\w:-]*)(\s[^<>]*)?>")
_EXT_ATTR_RE = re.compile(
    r"""\s(src|href|srcset|poster|data|action|background|xlink:href)\s*=\s*(?:"\s*(?:https?:)?//[^"]*"|"""
    r"""'\s*(?:https?:)?//[^']*'|(?:https?:)?//[^\s>]*)""", re.IGNORECASE)
_CSS_IMPORT_RE = re.compile(r"""@import\s+(?:url\()?\s*["']?\s*(?:https?:)?//[^;]*;?""", re.IGNORECASE)
_CSS_URL_RE = re.compile(r"""url\(\s*["']?\s*(?:https?:)?//[^)]*\)""", re.IGNORECASE)


def external_refs(page: str) -> list[str]:
    """Snippets of ``page`` that would make the browser fetch from the network (empty = self-contained)."""
    found = []
    for m in _TAG_RE.finditer(page):
        if m.group(1).lower() != "a" and _EXT_ATTR_RE.search(m.group(0)):
            found.append(m.group(0)[:200])
    imports = [m.span() for m in _CSS_IMPORT_RE.finditer(page)]
    found += [page[a:b][:200] for a, b in imports]
    # an @import url(…) is one reference, not two
    found += [m.group(0)[:200] for m in _CSS_URL_RE.finditer(page)
              if not any(a <= m.start() < b for a, b in imports)]
    return found


def strip_external(page: str) -> str:
    """Remove every network reference :func:`external_refs` would report.

    Scripts and stylesheet links with a remote source are dropped whole; other tags
    (img, iframe, …) lose the attribute and so show their alt text or nothing.
    """
    out, pos = [], 0
    for m in _TAG_RE.finditer(page):
        if m.start() < pos:  # inside a dropped <script> element
            continue
        tag = m.group(1).lower()
        if tag == "a" or not _EXT_ATTR_RE.search(m.group(0)):
            continue
        out.append(page[pos:m.start()])
        if tag == "script":
            end = page.lower().find("</script>", m.end())
            pos = len(page) if end < 0 else end + len("</script>")
        elif tag == "link":
            pos = m.end()
        else:
            out.append(_EXT_ATTR_RE.sub("", m.group(0)))
            pos = m.end()
    out.append(page[pos:])
    page = "".join(out)
    page = _CSS_IMPORT_RE.sub("", page)
    return _CSS_URL_RE.sub("none", page)


def nav_html(experiment: str, current: str | None = None, notebooks: tuple[str, ...] = NOTEBOOKS) -> str:
    """The bar on top of every page: the experiment's pages (relative links) and the index."""
    links = [f'<span class="exp">{html.escape(experiment)}</span>']
    for nb in notebooks:
        href = "index.html" if nb == NOTEBOOKS[-1] else f"{nb}.html"
        cls = ' class="current"' if nb == current else ""
        links.append(f'<a href="{href}"{cls}>{html.escape(TITLES.get(nb, nb))}</a>')
    links.append('<a href="../index.html">All experiments</a>')
    return f'<nav class="dbkit-nav">{"".join(links)}</nav>'


_WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
_WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
_BAR_COLORS = {"success": "#5cb85c", "danger": "#d9534f", "info": "#5bc0de", "warning": "#f0ad4e"}


def _widget_html(model_id: str, models: dict, depth: int = 0) -> str | None:
    """Static HTML of a widget from its saved final state; None when it has no static form."""
    model = models.get(model_id)
    if not isinstance(model, dict) or depth > 20:
        return None
    name, st = model.get("model_name", ""), model.get("state", {})
    desc = html.escape(str(st.get("description") or ""))
    label = f"<span>{desc}&nbsp;</span>" if desc else ""
    if name in ("HBoxModel", "VBoxModel", "BoxModel", "GridBoxModel"):
        parts = [_widget_html(str(c).removeprefix("IPY_MODEL_"), models, depth + 1)
                 for c in st.get("children", [])]
        direction = "row" if name == "HBoxModel" else "column"
        return (f'<div style="display:flex;flex-direction:{direction};align-items:center;gap:6px">'
                + "".join(p for p in parts if p) + "</div>")
    if name in ("HTMLModel", "HTMLMathModel"):
        return label + f"<span>{st.get('value', '')}</span>"  # the widget's value is HTML by definition
    if name in ("FloatProgressModel", "IntProgressModel"):
        lo, hi = float(st.get("min") or 0), float(st.get("max") or 100)
        v = float(st.get("value") or 0)
        pct = 0.0 if hi <= lo else max(0.0, min(100.0, 100 * (v - lo) / (hi - lo)))
        color = _BAR_COLORS.get(st.get("bar_style") or "", "#2196f3")
        return (label + '<span style="display:inline-block;width:320px;height:14px;background:#e0e0e0">'
                f'<span style="display:block;width:{pct:.1f}%;height:100%;background:{color}"></span></span>')
    if name == "ImageModel":
        # binary traits are saved beside the state, base64-encoded
        data = next((b.get("data") for b in model.get("buffers", []) if b.get("path") == ["value"]), None)
        if not data:
            return None
        fmt = html.escape(str(st.get("format") or "png"))
        size = "".join(f' {k}="{html.escape(str(st[k]))}"' for k in ("width", "height") if st.get(k))
        return f'<img alt="widget image" src="data:image/{fmt};base64,{data}"{size}>'
    if isinstance(st.get("_options_labels"), list) and isinstance(st.get("index"), int):
        labels = st["_options_labels"]
        chosen = labels[st["index"]] if 0 <= st["index"] < len(labels) else ""
        return label + f"<code>{html.escape(str(chosen))}</code>"
    if "value" in st and not isinstance(st["value"], (dict, list)):
        return label + f"<code>{html.escape(str(st['value']))}</code>"
    return None


def _freeze_widgets(nb: Any) -> None:
    """Replace widget views by static HTML of their final state (or their text fallback).

    Without a widget manager a view renders as nothing, and its text/plain fallback is
    the state at display time: a tqdm bar would read 0% forever.
    """
    models = nb.metadata.get("widgets", {}).get(_WIDGET_STATE, {}).get("state", {})
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if _WIDGET_VIEW not in data:
                continue
            view = data.pop(_WIDGET_VIEW)
            frozen = _widget_html(str(view.get("model_id", "")), models) if isinstance(view, dict) else None
            if frozen:
                data["text/html"] = f'<div class="dbkit-widget">{frozen}</div>'
            elif not data:
                data["text/plain"] = "[interactive widget: not shown in the static report]"
    # the saved state only feeds a widget manager, which static pages do not load
    nb.metadata.pop("widgets", None)


def render_html(nb_path: Path, html_path: Path, *, title: str = "", nav: str = "",
                resources_dir: Path | None = None) -> Path:
    """Render an executed notebook to a code-free, self-contained HTML page (written atomically).

    ``resources_dir`` is where relative images in Markdown cells are looked up (the source
    notebook's folder); they are embedded as base64.
    """
    import nbformat
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(nb_path), as_version=4)
    _freeze_widgets(nb)
    exporter = HTMLExporter(
        template_name="lab", extra_loaders=[DictLoader({"dbkit_report.html.j2": _TEMPLATE})],
        template_file="dbkit_report.html.j2", exclude_input=True, exclude_input_prompt=True,
        exclude_output_prompt=True, embed_images=True, exclude_anchor_links=True,
    )
    resources: dict[str, Any] = {
        "metadata": {"name": title or Path(nb_path).stem, "path": str(resources_dir or Path(nb_path).parent)},
        "dbkit_nav": nav, "dbkit_css": _NAV_CSS,
    }
    body, _ = exporter.from_notebook_node(nb, resources=resources)
    runs.atomic_write_text(html_path, strip_external(body))
    return Path(html_path)


# ----------------------------------------------------------------------------- running


def _select(only: list[str] | None) -> list[str]:
    """``--only`` names → notebook names; accepts '03_train', '03_train.ipynb', '03' or 'train'."""
    if not only:
        return list(NOTEBOOKS)
    wanted = set()
    for name in only:
        key = name.removesuffix(".ipynb")
        hits = [nb for nb in NOTEBOOKS if key in (nb, nb.split("_", 1)[0], nb.split("_", 1)[1])]
        if not hits:
            raise ValueError(f"--only {name!r}: not a notebook; choose from {', '.join(NOTEBOOKS)}")
        wanted.update(hits)
    return [nb for nb in NOTEBOOKS if nb in wanted]


@contextlib.contextmanager
def _kernel_env(reports_root: Path) -> Iterator[None]:
    """Environment for the notebooks' kernel, which inherits this process's.

    dbkit's parent folder goes on PYTHONPATH so ``import dbkit`` works from a checkout run
    outside the repo root, and ``$DBKIT_REPORTS`` tells :func:`dbkit.report.reports_dir`
    where this run publishes (the notebooks only get the three papermill parameters).
    """
    root = str(Path(__file__).resolve().parent.parent)
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "DBKIT_REPORTS")}
    parts = saved["PYTHONPATH"].split(os.pathsep) if saved["PYTHONPATH"] else []
    if root not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *parts])
    os.environ["DBKIT_REPORTS"] = str(Path(reports_root).resolve())
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _failed_cell(err: Any) -> str:
    return str(err.exec_count) if err.exec_count is not None else f"#{err.cell_index}"


def run_experiment(params_path: str | Path, overrides: list[str] | None = None, *,
                   reports_root: Path = Path("reports"), notebooks_dir: Path = Path("notebooks"),
                   only: list[str] | None = None, progress: bool = True) -> Path:
    """Run the experiment's notebooks in order and write its HTML reports; returns ``reports/<experiment>``.

    Raises :class:`dbkit.config.ConfigError` (nothing has run), ``FileNotFoundError`` for a
    missing notebook, or :class:`NotebookFailed` after printing which cell failed; the
    failing notebook's partial output is rendered to HTML and later notebooks do not run.
    """
    import papermill
    from tqdm import tqdm

    overrides = list(overrides or [])
    exp = config.load(params_path, overrides)
    selected = _select(only)
    notebooks_dir = Path(notebooks_dir)
    missing = [str(notebooks_dir / f"{nb}.ipynb") for nb in selected
               if not (notebooks_dir / f"{nb}.ipynb").is_file()]
    if missing:
        raise FileNotFoundError(f"notebook(s) not found: {', '.join(missing)}")

    rdir = runs.run_dir(exp)  # each notebook records its own stage's provenance there
    out_dir = Path(reports_root) / exp.name
    out_dir.mkdir(parents=True, exist_ok=True)
    parameters = {"params_path": str(params_path), "overrides": overrides, "run_dir": str(rdir)}

    bar = tqdm(selected, desc="notebooks", unit="nb", disable=not progress, file=sys.stderr)
    with _kernel_env(reports_root):
        for nb in bar:
            bar.set_description(nb)
            out_nb = out_dir / f"{nb}.ipynb"
            html_path = out_dir / f"{nb}.html"
            # papermill rewrites its output after every cell; a temp name keeps the last
            # complete notebook in place until this one ends (in success or failure)
            fd, tmp_name = tempfile.mkstemp(dir=out_dir, prefix=f".{nb}.", suffix=".ipynb")
            os.close(fd)
            tmp = Path(tmp_name)
            t0 = time.perf_counter()
            error: Exception | None = None
            wrote = False
            try:
                papermill.execute_notebook(
                    str(notebooks_dir / f"{nb}.ipynb"), str(tmp), parameters=parameters,
                    kernel_name="python3", progress_bar=progress, cwd=str(Path.cwd()),
                    kernel_manager_class=_VenvKernelManager,
                )
            except Exception as e:  # noqa: BLE001 - a cell raised or the kernel died: report either the same way
                error = e
            finally:
                runs.record_timing(rdir, nb, time.perf_counter() - t0)
                if tmp.exists() and tmp.stat().st_size:
                    os.chmod(tmp, 0o644)  # mkstemp makes it private; reports are for sharing
                    os.replace(tmp, out_nb)
                    wrote = True
                else:  # the kernel never started: nothing was written
                    tmp.unlink(missing_ok=True)
            rendered = None
            if wrote:
                rendered = render_html(out_nb, html_path, title=f"{exp.name} · {TITLES[nb]}",
                                       nav=nav_html(exp.name, nb), resources_dir=notebooks_dir)
                if nb == NOTEBOOKS[-1]:
                    render_html(out_nb, out_dir / "index.html", title=f"{exp.name} · report",
                                nav=nav_html(exp.name, nb), resources_dir=notebooks_dir)
            if error is not None:
                bar.close()
                if isinstance(error, papermill.PapermillExecutionError):
                    failure = NotebookFailed(nb, _failed_cell(error), error.ename, error.evalue, rendered)
                else:
                    failure = NotebookFailed(nb, None, type(error).__name__, str(error).strip(), rendered)
                print(str(failure) + (f"\n  see {rendered}" if rendered else ""), file=sys.stderr)
                build_index(reports_root)
                raise failure from error
    build_index(reports_root)
    return out_dir


# ----------------------------------------------------------------------------- index


@dataclass
class _Row:
    name: str
    summary: dict
    mtime: float


def _fmt_metric(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v)) if v is not None else ""


_INDEX_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
  padding: 0 1em; color: #24292f; }
h1 { font-size: 1.6em; margin-bottom: .2em; }
p.sub { color: #57606a; margin-top: 0; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #d0d7de; padding: 6px 10px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th.rank, td.rank { background: #fff8c5; }
code { font-size: 0.85em; color: #57606a; }
a { color: #0969da; }
"""


def build_index(reports_root: Path = Path("reports")) -> Path:
    """Write ``reports/index.html``: every experiment with a ``summary.json``, best first.

    Experiments are sorted, descending, by the metric most of them name as ``rank_by``;
    those without it follow, newest first.
    """
    root = Path(reports_root)
    rows = []
    for path in sorted(root.glob("*/summary.json")):
        try:
            summary = runs.read_json(path, default={})
        except ValueError:  # a hand-edited or foreign file: list the experiment, without data
            summary = {}
        summary = summary if isinstance(summary, dict) else {}
        rows.append(_Row(path.parent.name, summary, path.stat().st_mtime))

    ranks = Counter(r.summary.get("rank_by") for r in rows if r.summary.get("rank_by"))
    rank_by = ranks.most_common(1)[0][0] if ranks else None

    def metrics(r: _Row) -> dict:
        m = r.summary.get("metrics")
        return m if isinstance(m, dict) else {}

    def key(r: _Row) -> tuple:
        v = metrics(r).get(rank_by) if rank_by else None
        ranked = isinstance(v, (int, float)) and not isinstance(v, bool)
        return (0, -v, r.name) if ranked else (1, -r.mtime, r.name)

    rows.sort(key=key)
    names = list(dict.fromkeys(k for r in rows for k in metrics(r)))
    if rank_by in names:
        names.remove(rank_by)
        names.insert(0, rank_by)

    head = "".join(f'<th class="{"rank" if n == rank_by else ""}">{html.escape(n)}'
                   f'{" ↓" if n == rank_by else ""}</th>' for n in names)
    body = []
    for r in rows:
        s = r.summary
        name = html.escape(r.name)
        notes = s.get("notes") if isinstance(s.get("notes"), dict) else {}
        hypo = str(s.get("hypothesis") or notes.get("hypothesis") or "").strip()
        hypo = html.escape(hypo).replace("\n", "<br>")
        cells = "".join(f'<td class="num{" rank" if n == rank_by else ""}">'
                        f"{_fmt_metric(metrics(r).get(n))}</td>"
                        for n in names)
        h = html.escape(str(s.get("hash") or "")[:12])
        # ISO timestamps shown to the minute; anything else as written
        date = str(s.get("date") or time.strftime("%Y-%m-%dT%H:%M", time.localtime(r.mtime)))
        date = html.escape(date[:16].replace("T", " ") if re.match(r"\d{4}-\d\d-\d\dT", date) else date)
        body.append(f'<tr><td><a href="{name}/index.html">{name}</a></td><td>{hypo}</td>{cells}'
                    f"<td><code>{h}</code></td><td>{date}</td></tr>")
    if not rows:
        body.append(f'<tr><td colspan="{4 + len(names)}">No experiment has a summary yet: '
                    "run <code>dbkit run params/&lt;experiment&gt;.yaml</code>.</td></tr>")
    sub = f"{len(rows)} experiment(s)" + (f", ranked by {html.escape(rank_by)}" if rank_by else "")
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>dbkit experiments</title><style>{_INDEX_CSS}</style></head><body>"
        f'<h1>Experiments</h1><p class="sub">{sub}</p>'
        f"<table><thead><tr><th>experiment</th><th>hypothesis</th>{head}<th>params hash</th><th>date</th>"
        f"</tr></thead><tbody>{''.join(body)}</tbody></table></body></html>\n"
    )
    out = root / "index.html"
    runs.atomic_write_text(out, page)
    return out


# ----------------------------------------------------------------------------- browser check


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary, or None."""
    for c in CHROMIUM_CANDIDATES:
        if Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def screenshot(html_path: Path, png_path: Path, *, chromium: str | None = None,
               size: tuple[int, int] = (1200, 900), timeout: float = 90) -> Path:
    """Render ``html_path`` in headless Chromium, offline, and save a PNG screenshot.

    Raises FileNotFoundError when no Chromium is installed, RuntimeError when it fails.
    """
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium found (install it: apt-get install -y chromium)")
    png_path = Path(png_path).resolve()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dbkit-chromium-") as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--screenshot={png_path}", f"--window-size={size[0]},{size[1]}",
               Path(html_path).resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0 or not png_path.is_file():
        raise RuntimeError(f"chromium failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return png_path


def is_blank(png_path: Path) -> bool:
    """True when the image is a single colour (nothing rendered)."""
    from PIL import Image

    with Image.open(png_path) as im:
        extrema = im.convert("RGB").getextrema()
    return all(lo == hi for lo, hi in extrema)

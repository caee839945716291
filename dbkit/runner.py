"""`dbkit run`: execute the experiment notebooks with papermill and publish them as HTML reports.

An experiment is five notebooks run in order (:data:`NOTEBOOKS`). Each gets three
parameters — ``params_path``, ``overrides`` and ``run_dir`` — and hands results to the next
through files in the run folder, never through Python state. The params are validated
before anything runs, so a typo costs a second, not a training run.

Reports are versioned and never overwritten by other params. A version is named by
:func:`dbkit.config.version_hash`: the run's params hash plus its ablation, merge and report
sections, so editing an experiment's variants or merge weights publishes a new version
beside the old one. Under ``reports/<experiment>/<version[:12]>/`` (a *version*):

- ``<nb>.ipynb``: the executed notebook (with its code, for debugging);
- ``<nb>.html``: the same without code cells or prompts, self-contained (see below);
- ``index.html``: the report notebook's page with a nav to the four others;
- ``summary.json`` (from 05_report) and ``version.json`` (when, from which params, which notebooks).

A run renders into ``reports/<experiment>/.staging-<hash[:12]>/`` and swaps that folder in
as its version only when every notebook succeeded, so a page set is never a mix of two
runs; a failed run's pages go to ``reports/<experiment>/failed-<hash[:12]>/`` and the last
good set stays. ``reports/<experiment>/index.html`` lists the versions, newest first, and
``reports/index.html`` (:func:`build_index`) has one row per experiment (its latest version
with a ``summary.json`` written by :func:`dbkit.report.write_summary`) linking the others.
A report folder of an older dbkit (pages straight under ``reports/<experiment>/``) is moved
into a version folder of its own the first time the experiment runs again.

The run folder is locked while the notebooks run (:func:`dbkit.runs.lock_run`); the kernels
get the lock's token, so the notebooks' own locking passes through.

Self-contained HTML: nbconvert's lab template loads require.js, MathJax, Mermaid and the
widget manager from CDNs. :data:`_TEMPLATE` extends it with those blocks emptied and widget
views replaced by their text fallback; :func:`strip_external` then removes any
remaining external ``src``/``href`` (e.g. a ``<script src=https://…>`` in an HTML output or a
remote image in Markdown), so that a report opens offline and never phones home. Images
are already base64 PNGs in the outputs. Consequence: LaTeX in Markdown shows as source.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import html
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.manager import AsyncKernelManager
from traitlets import default

from . import config, files, intervals, runs

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
    """A notebook cell raised, or its kernel died; the partial notebook was still rendered to
    ``html_path``. ``advice`` says what to do where the cause is known (full disk, dead kernel)."""

    def __init__(self, notebook: str, cell: str | None, ename: str, evalue: str, html_path: Path | None,
                 advice: str = ""):
        self.notebook, self.cell, self.ename, self.evalue = notebook, cell, ename, evalue
        self.html_path, self.advice = html_path, advice
        where = f", cell {cell}" if cell is not None else ""
        evalue = " ".join(evalue.split())  # one line, whatever the exception printed
        super().__init__(f"FAILED: {notebook}.ipynb{where}: {ename}: {evalue}" + (f" — {advice}" if advice else ""))


class RunError(RuntimeError):
    """A problem the user can fix, met while running (an unwritable or full disk, missing
    notebooks); the message names the file or notebook and says what to do."""


class RunStopped(RuntimeError):
    """The run was interrupted (Ctrl-C); the message says where it stopped and how to go on."""


# Kernels this process started: on Ctrl-C they are killed before the run lock is released,
# so no orphaned kernel goes on writing into the run folder.
_KERNELS: list[subprocess.Popen] = []


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

    kernel_log: Path | None = None  # set by _kernel_manager

    async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: Any) -> None:
        # the kernel process's own stdout/stderr (not the notebook's outputs) go to a log file:
        # on Ctrl-C it prints tracebacks about closed sockets, and after a crash the log shows why
        log = open(self.kernel_log, "wb") if self.kernel_log else None  # the child gets its own copy
        try:
            if log is not None:
                kw.update(stdout=log, stderr=log)
            await super()._async_launch_kernel(kernel_cmd, **kw)
        finally:
            if log is not None:
                log.close()
        process = getattr(self.provisioner, "process", None)
        if process is not None:
            _KERNELS[:] = [p for p in _KERNELS if p.poll() is None] + [process]


def _kernel_manager(log: Path) -> type[_VenvKernelManager]:
    class _LoggedKernelManager(_VenvKernelManager):
        kernel_log = log

    return _LoggedKernelManager


def _kill_kernels() -> None:
    """Kill the kernels still running (each leads its own process group: its children too)."""
    import signal

    for p in _KERNELS:
        if p.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
    _KERNELS.clear()


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


def nav_html(experiment: str, current: str | None = None, notebooks: tuple[str, ...] = NOTEBOOKS,
             version: str = "") -> str:
    """The bar on top of every page: the experiment's pages (relative links) and the index.
    A page of a version folder (``reports/<exp>/<version>/``) also links the experiment's versions."""
    links = [f'<span class="exp">{html.escape(experiment)}</span>']
    if version:
        links.append(f'<span class="exp"><code>{html.escape(version)}</code></span>')
    for nb in notebooks:
        href = "index.html" if nb == NOTEBOOKS[-1] else f"{nb}.html"
        cls = ' class="current"' if nb == current else ""
        links.append(f'<a href="{href}"{cls}>{html.escape(TITLES.get(nb, nb))}</a>')
    if version:
        links.append('<a href="../index.html">All versions</a><a href="../../index.html">All experiments</a>')
    else:
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
    files.atomic_write_text(html_path, strip_external(body))
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
def _kernel_env(reports_root: Path, lock_token: str = "") -> Iterator[None]:
    """Environment for the notebooks' kernel, which inherits this process's.

    dbkit's parent folder goes on PYTHONPATH so ``import dbkit`` works from a checkout run
    outside the repo root, ``$DBKIT_REPORTS`` tells :func:`dbkit.report.reports_dir`
    where this run publishes (the notebooks only get the three papermill parameters) and
    ``$DBKIT_RUN_LOCK`` lets the notebooks work in the run folder this process has locked.
    """
    root = str(Path(__file__).resolve().parent.parent)
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "DBKIT_REPORTS", runs.LOCK_ENV)}
    parts = saved["PYTHONPATH"].split(os.pathsep) if saved["PYTHONPATH"] else []
    if root not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *parts])
    os.environ["DBKIT_REPORTS"] = str(Path(reports_root).resolve())
    if lock_token:
        os.environ[runs.LOCK_ENV] = lock_token
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


NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"  # dbkit's own, whatever the cwd
VERSION_FILE = "version.json"


def find_notebooks(notebooks_dir: Path | None, selected: list[str]) -> Path:
    """The folder of the selected notebooks: ``notebooks_dir`` (relative to the cwd) when given,
    else dbkit's own beside the package, so that `dbkit run` works from any directory."""
    folder = NOTEBOOKS_DIR if notebooks_dir is None else Path(notebooks_dir)
    missing = [f"{nb}.ipynb" for nb in selected if not (folder / f"{nb}.ipynb").is_file()]
    if not missing:
        return folder
    if notebooks_dir is None:
        fix = "they come with dbkit's source: restore them (git checkout notebooks)"
    else:
        fix = f"point --notebooks at the folder that holds them, or leave it out to use dbkit's own ({NOTEBOOKS_DIR})"
    raise RunError(f"{folder}: notebook(s) not found: {', '.join(missing)}: {fix}")


def run_command(params_path: str | Path, overrides: list[str], only: list[str] | None,
                reports_root: Path, notebooks_dir: Path | None = None) -> str:
    """The `dbkit run` command line that repeats this run, and so resumes it."""
    import shlex

    args = ["dbkit", "run", str(params_path)]
    for o in overrides:
        args += ["-p", o]
    if only:
        args += ["--only", *only]
    if Path(reports_root) != Path("reports"):
        args += ["--reports", str(reports_root)]
    if notebooks_dir is not None:
        args += ["--notebooks", str(notebooks_dir)]
    return shlex.join(args)


@dataclass(frozen=True)
class ReportSet:
    """The report folders of one experiment and report version (see the module docstring).
    ``hash`` is the version hash (config.version_hash): the run hash plus ablation, merge and
    report, so that an edited experiment never overwrites the version of its earlier table."""

    root: Path
    name: str
    hash: str

    @property
    def folder(self) -> Path:
        return self.root / self.name

    @property
    def version(self) -> Path:
        return self.folder / self.hash[:12]

    @property
    def failed(self) -> Path:
        return self.folder / f"failed-{self.hash[:12]}"

    @property
    def staging_root(self) -> Path:
        # $DBKIT_REPORTS in the kernels, so that report.reports_dir(name) there is `stage`
        return self.folder / f".staging-{self.hash[:12]}"

    @property
    def stage(self) -> Path:
        return self.staging_root / self.name


@dataclass(frozen=True)
class _Run:
    exp: config.Experiment
    reports: ReportSet
    run_dir: Path
    notebooks_dir: Path
    selected: list[str]
    command: str
    parameters: dict


def _open_stage(rs: ReportSet) -> None:
    """An empty staging folder; one a killed run left is removed (the run lock says nobody
    uses it), and so are the temp notebooks older dbkits left beside the pages. An older
    dbkit's flat page set is first moved into a version folder of its own."""
    try:
        rs.folder.mkdir(parents=True, exist_ok=True)
        _migrate_flat(rs.folder)
        for tmp in rs.folder.glob(".0[0-9]_*.ipynb"):
            tmp.unlink()
        shutil.rmtree(rs.staging_root, ignore_errors=True)
        rs.stage.mkdir(parents=True)
    except OSError as e:
        raise RunError(runs.describe_os_error(e, str(rs.root))) from None


def _migrate_flat(folder: Path) -> Path | None:
    """An older dbkit wrote one page set straight into reports/<exp>/, where the versions page
    now goes: move it into a version folder named by its summary's hash, so it stays."""
    pages = [f for f in folder.iterdir()
             if f.is_file() and (f.stem in NOTEBOOKS or f.name in ("index.html", "summary.json"))]
    if not any(f.suffix == ".html" and f.stem in NOTEBOOKS for f in pages):
        return None
    summary = _read_dict(folder / "summary.json")
    dest = folder / (str(summary.get("hash") or "")[:12] or "earlier")
    if dest.exists():
        dest = Path(tempfile.mkdtemp(dir=folder, prefix=f"{dest.name}-"))
    dest.mkdir(exist_ok=True)
    for f in pages:
        os.replace(f, dest / f.name)
    files.atomic_write_json(dest / VERSION_FILE, {"hash": summary.get("hash"), "status": "ok",
                                                  "note": "moved here from an older dbkit's single report folder"})
    return dest


def _execute(nb: str, run: _Run, progress: bool) -> Exception | None:
    """Run one notebook into the staging folder; returns the error it ended with, if any."""
    import logging

    import papermill

    t0 = time.perf_counter()
    # papermill logs a dead kernel as an error of its own; the failure is reported once, below
    log = logging.getLogger("papermill")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        papermill.execute_notebook(
            str(run.notebooks_dir / f"{nb}.ipynb"), str(run.reports.stage / f"{nb}.ipynb"),
            parameters=run.parameters, kernel_name="python3", progress_bar=progress, cwd=str(Path.cwd()),
            kernel_manager_class=_kernel_manager(run.run_dir / f"kernel-{nb}.log"))
    except Exception as e:  # noqa: BLE001 - a cell raised or the kernel died: report either the same way
        return e
    finally:
        log.setLevel(level)
        runs.record_timing(run.run_dir, nb, time.perf_counter() - t0)
    return None


def _render(nb: str, rs: ReportSet, notebooks_dir: Path) -> Path | None:
    """The staged notebook's HTML page (and index.html for the report); None when the
    notebook was never written (its kernel did not start)."""
    out = rs.stage / f"{nb}.ipynb"
    if not out.is_file() or not out.stat().st_size:
        out.unlink(missing_ok=True)
        return None
    nav = nav_html(rs.name, nb, version=rs.hash[:12])
    page = render_html(out, rs.stage / f"{nb}.html", title=f"{rs.name} · {TITLES[nb]}", nav=nav,
                       resources_dir=notebooks_dir)
    if nb == NOTEBOOKS[-1]:
        render_html(out, rs.stage / "index.html", title=f"{rs.name} · report", nav=nav, resources_dir=notebooks_dir)
    return page


def _advice(ename: str, evalue: str, log: Path, command: str) -> str:
    """What to do about a failure whose cause is the machine, not the code."""
    if ename == "DeadKernelError" or "Kernel died" in evalue:
        return (f"the notebook's Python process died, most often for lack of memory: lower train.batch_size or "
                f"data.resolution, or close other programs, then `{command}` (training resumes from its latest "
                f"checkpoint; the process's last output is in {log})")
    if "No space left on device" in evalue or "[Errno 28]" in evalue:
        return (f"the disk is full: free some space (checkpoints under runs/ and .cache/dbkit are the largest), "
                f"then `{command}` (training resumes from its latest checkpoint)")
    return ""


def _failure(nb: str, error: Exception, page: Path | None, run: _Run) -> NotebookFailed:
    import papermill

    if isinstance(error, papermill.PapermillExecutionError):
        cell, ename, evalue = _failed_cell(error), error.ename, error.evalue
    else:
        cell, ename, evalue = None, type(error).__name__, str(error).strip()
    advice = _advice(ename, evalue, run.run_dir / f"kernel-{nb}.log", run.command)
    return NotebookFailed(nb, cell, ename, evalue, page, advice=advice)


def stopped_message(nb: str, rdir: Path, command: str) -> str:
    """Where an interrupted run stopped, and what repeating its command does."""
    if nb == "03_train" and not (rdir / "train_done.json").exists():
        last, ckpt = runs.training_progress(rdir)
        if ckpt:
            return (f"stopped at step {last}; `{command}` resumes from step {ckpt} (the latest checkpoint, in "
                    f"{rdir / 'checkpoints'})")
        return (f"stopped at step {last}, before the first checkpoint; `{command}` starts training again from "
                "step 0 (train.save_every sets how often checkpoints are saved)")
    if nb == "04_ablations":
        return (f"stopped in {nb}.ipynb; `{command}` goes on from there: finished variants are reused and an "
                "interrupted one resumes from its latest checkpoint")
    return f"stopped in {nb}.ipynb; `{command}` runs it again (nothing finished is lost)"


def _run_notebooks(run: _Run, lock_token: str, progress: bool) -> None:
    """Execute and render the selected notebooks into the staging folder, in order. Raises
    NotebookFailed (its page rendered), RunError (a disk problem, naming the notebook) or
    RunStopped (Ctrl-C; the kernels are killed first, so none writes on unlocked)."""
    from tqdm import tqdm

    bar = tqdm(run.selected, desc="notebooks", unit="nb", disable=not progress, file=sys.stderr)
    with _kernel_env(run.reports.staging_root, lock_token):
        for nb in bar:
            bar.set_description(nb)
            try:
                error = _execute(nb, run, progress)
                page = _render(nb, run.reports, run.notebooks_dir)
            except KeyboardInterrupt:
                bar.close()
                _kill_kernels()
                raise RunStopped(stopped_message(nb, run.run_dir, run.command)) from None
            except OSError as e:
                bar.close()
                raise RunError(f"{nb}.ipynb: {runs.describe_os_error(e)}") from e
            if error is not None:
                bar.close()
                raise _failure(nb, error, page, run) from error


@contextlib.contextmanager
def _no_interrupt() -> Iterator[None]:
    """Ctrl-C waits for the end of the block: a swap of report folders is never left half done."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(1))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _version_info(run: _Run, status: str, failed: str = "") -> dict:
    info = {"experiment": run.exp.name, "hash": run.exp.hash, "version": run.exp.version,
            "params_file": str(run.parameters["params_path"]),
            "overrides": run.parameters["overrides"], "command": run.command, "status": status,
            "published": runs.utc_now()}
    return info | ({"failed": failed} if failed else {})


def _publish(rs: ReportSet, info: dict) -> Path:
    """Swap the staged pages in as this hash's version folder. Pages of notebooks that did
    not run this time (--only) are carried over from the version they replace."""
    if rs.version.is_dir():
        for f in rs.version.iterdir():
            if f.is_file() and not (rs.stage / f.name).exists():
                shutil.copy2(f, rs.stage / f.name)
    info["notebooks"] = [nb for nb in NOTEBOOKS if (rs.stage / f"{nb}.html").exists()]
    files.atomic_write_json(rs.stage / VERSION_FILE, info)
    old = rs.folder / f".replaced-{rs.hash[:12]}"
    shutil.rmtree(old, ignore_errors=True)
    with _no_interrupt():
        if rs.version.exists():
            os.replace(rs.version, old)
        os.replace(rs.stage, rs.version)
    for leftover in (old, rs.failed, rs.staging_root):  # a failed attempt at these params is superseded too
        shutil.rmtree(leftover, ignore_errors=True)
    return rs.version


def _keep_failed(rs: ReportSet, info: dict) -> Path | None:
    """Move a failed run's pages to failed-<hash>/ (replacing an older failure's); the version
    folder keeps the last good set. None when no page was written."""
    if not any(rs.stage.glob("*.html")):
        shutil.rmtree(rs.staging_root, ignore_errors=True)
        return None
    info["notebooks"] = [nb for nb in NOTEBOOKS if (rs.stage / f"{nb}.html").exists()]
    files.atomic_write_json(rs.stage / VERSION_FILE, info)
    shutil.rmtree(rs.failed, ignore_errors=True)
    with _no_interrupt():
        os.replace(rs.stage, rs.failed)
    shutil.rmtree(rs.staging_root, ignore_errors=True)
    return rs.failed


def _report_failure(run: _Run, failure: NotebookFailed) -> None:
    """Keep the failed pages apart, print the failure in two lines and where to look."""
    kept = _keep_failed(run.reports, _version_info(run, "failed", failure.notebook))
    page = kept / f"{failure.notebook}.html" if kept else None
    failure.html_path = page if page and page.exists() else None
    see = [f"see {failure.html_path}"] if failure.html_path else []
    if (run.reports.version / "index.html").exists():
        see.append(f"the last good report is unchanged: {run.reports.version / 'index.html'}")
    print(str(failure) + ("\n  " + "; ".join(see) if see else ""), file=sys.stderr)
    write_versions_page(run.reports.folder)
    build_index(run.reports.root)


def run_experiment(params_path: str | Path, overrides: list[str] | None = None, *,
                   reports_root: Path = Path("reports"), notebooks_dir: Path | None = None,
                   only: list[str] | None = None, progress: bool = True) -> Path:
    """Run the experiment's notebooks in order and publish their pages as a report version;
    returns its folder, ``reports/<experiment>/<hash[:12]>``. ``notebooks_dir`` defaults to
    dbkit's own notebooks.

    Raises :class:`dbkit.config.ConfigError` (nothing has run), :class:`RunError` (notebooks
    missing, a disk unwritable or full: the message names the file or notebook),
    :class:`dbkit.runs.RunLocked` (another process works in the run folder),
    :class:`RunStopped` (Ctrl-C: where it stopped, how to resume) or :class:`NotebookFailed`
    after printing which cell failed; the failed run's pages go to ``failed-<hash[:12]>/``,
    later notebooks do not run, and the last good version stays as it was.
    """
    overrides = list(overrides or [])
    exp = config.load(params_path, overrides)
    selected = _select(only)
    nb_dir = find_notebooks(notebooks_dir, selected)
    command = run_command(params_path, overrides, only, reports_root, notebooks_dir)
    rdir = runs.run_dir(exp)  # each notebook records its own stage's provenance there
    run = _Run(exp, ReportSet(Path(reports_root), exp.name, exp.version), rdir, nb_dir, selected, command,
               {"params_path": str(params_path), "overrides": overrides, "run_dir": str(rdir)})
    with runs.lock_run(rdir, command) as holder:
        _open_stage(run.reports)
        try:
            _run_notebooks(run, holder.get("token", ""), progress)
        except NotebookFailed as failure:
            _report_failure(run, failure)
            raise
        except BaseException:
            shutil.rmtree(run.reports.staging_root, ignore_errors=True)
            raise
        version = _publish(run.reports, _version_info(run, "ok"))
    write_versions_page(run.reports.folder)
    build_index(reports_root)
    return version


# ----------------------------------------------------------------------------- index


@dataclass
class _Row:
    name: str
    summary: dict
    mtime: float
    href: str = ""  # the report page, relative to reports/
    version: str = ""  # the version folder ("" for an older dbkit's flat folder)
    others: list[_Row] = field(default_factory=list)  # the experiment's other versions


def _read_dict(path: Path) -> dict:
    """A JSON object from a file; {} when it is missing, unreadable or not an object."""
    try:
        obj = files.read_json(path, default={})
    except (OSError, ValueError):  # a hand-edited or foreign file
        return {}
    return obj if isinstance(obj, dict) else {}


def _entry(folder: Path) -> str:
    """The page to open in a version folder: its report, else its first page."""
    names = ["index.html", *(f"{nb}.html" for nb in NOTEBOOKS)]
    return next((n for n in names if (folder / n).is_file()), "")


def _versions(folder: Path) -> list[dict]:
    """One experiment's version folders (failed attempts included), newest first: the fields
    of version.json plus dir, summary, has_summary, when (publication time, seconds) and shown
    (that time as the pages print it)."""
    out = []
    for d in folder.iterdir() if folder.is_dir() else []:
        stamp = d / VERSION_FILE if (d / VERSION_FILE).is_file() else d / "summary.json"
        if d.name.startswith(".") or not d.is_dir() or not stamp.is_file():
            continue
        info, summary = _read_dict(d / VERSION_FILE), _read_dict(d / "summary.json")
        when, shown = _published(info, summary, stamp)
        out.append({**info, "dir": d.name, "summary": summary, "when": when, "shown": shown,
                    "has_summary": (d / "summary.json").is_file(), "status": info.get("status", "ok")})
    return sorted(out, key=lambda v: (-v["when"], v["dir"]))


def _published(info: dict, summary: dict, stamp: Path) -> tuple[float, str]:
    """(seconds, minute as written) of a version's publication: version.json's "published",
    else summary.json's "date", else the file's mtime. The recorded times come first because a
    git clone gives every file the checkout's mtime, which would reorder and rewrite the pages."""
    for text in (info.get("published"), summary.get("date")):
        try:
            t = dt.datetime.fromisoformat(str(text))
        except ValueError:
            continue
        t = t if t.tzinfo else t.replace(tzinfo=dt.UTC)  # as runs.utc_now writes them
        return t.timestamp(), str(text)[:16].replace("T", " ")
    mtime = stamp.stat().st_mtime
    return mtime, time.strftime("%Y-%m-%d %H:%M", time.localtime(mtime))


def _experiment_row(folder: Path) -> _Row | None:
    """The index row of one experiment: its latest version that has a summary, the others
    linked beside it. An older dbkit's summary.json straight in the folder counts as one."""
    name = folder.name
    rows = [_Row(name, v["summary"], v["when"], f"{name}/{v['dir']}/{_entry(folder / v['dir'])}", v["dir"])
            for v in _versions(folder) if v["status"] == "ok" and v["has_summary"]]
    flat = folder / "summary.json"
    if flat.is_file():
        rows.append(_Row(name, _read_dict(flat), flat.stat().st_mtime, f"{name}/index.html"))
    if not rows:
        return None
    rows.sort(key=lambda r: -r.mtime)
    rows[0].others = rows[1:]
    return rows[0]


def _other_versions(r: _Row) -> str:
    links = [f'<a href="{html.escape(o.href)}"><code>{html.escape(o.version or "earlier")}</code></a>'
             for o in r.others]
    if r.version:
        links.append(f'<a href="{html.escape(r.name)}/index.html">all</a>')
    return " ".join(links)


def _fmt_metric(v: Any, ci: tuple[float, float] | None = None) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" + (f'<br><span class="ci">[{ci[0]:.2f}, {ci[1]:.2f}]</span>' if ci else "")
    return html.escape(str(v)) if v is not None else ""


def _best_intervals(summary: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """Wilson 95% intervals of the key metrics' rates, from the best row they were taken from."""
    metrics = summary.get("metrics") if isinstance(summary.get("metrics"), Mapping) else {}
    rows = summary.get("rows") if isinstance(summary.get("rows"), list) else []
    best = next((r for r in rows if isinstance(r, Mapping) and r.get("label") == metrics.get("best")), None)
    if best is None or not isinstance(best.get("metrics"), Mapping):
        return {}
    return {k: ci for k in metrics if (ci := intervals.interval(best["metrics"], k)) is not None}


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
# only the index shows intervals: a rule in _INDEX_CSS would rewrite every committed versions page
_CI_CSS = "span.ci { color: #57606a; font-size: .8em; white-space: nowrap; }\n"


def build_index(reports_root: Path = Path("reports"), notes_dir: Path | None = None) -> Path:
    """Write ``reports/index.html``: every experiment with a ``summary.json``, best first, one
    row each (its latest version; the others linked in the row), and each experiment's
    versions page (:func:`write_versions_page`). Below it, the sections of
    :mod:`dbkit.index_tables`: all runs (sortable) and the research notes of ``notes_dir``
    (default: ``params/notes`` beside the reports folder).

    Experiments are sorted, descending, by the metric most of them name as ``rank_by``;
    those without it follow, newest first. A conclusion whose figures are not in its run's
    table (or an empty one) is flagged under the hypothesis.
    """
    from . import index_tables

    root = Path(reports_root)
    project = index_tables.project_root(root)
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")) if root.is_dir() else []
    for folder in folders:
        write_versions_page(folder)
    rows, rank_by = _ranked_rows(folders)
    sub = f"{len(rows)} experiment(s)" + (f", ranked by {html.escape(rank_by)}" if rank_by else "")
    sub += (" · a rate's <span class=\"ci\">[low, high]</span> is its Wilson 95% interval over the images "
            "it was measured on (evaluation sampling only, not training variance): rows whose intervals overlap "
            "may differ by noise alone")
    latest = [(r.name, r.href, r.summary) for r in rows]
    all_runs = index_tables.all_runs_html(index_tables.all_runs(latest, project))
    notes = index_tables.notes_html(index_tables.notes_experiments(
        project / "params" / "notes" if notes_dir is None else Path(notes_dir),
        {name: (href, s) for name, href, s in latest}, project))
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>dbkit experiments</title><style>{_INDEX_CSS}{_CI_CSS}{index_tables.INDEX_CSS}</style></head><body>"
        f'<h1>Experiments</h1><p class="sub">{sub}</p>{_ranking_table(rows, rank_by, project)}'
        f"{all_runs}{notes}<script>{index_tables.SORT_JS}</script></body></html>\n"
    )
    out = root / "index.html"
    files.atomic_write_text(out, page)
    return out


def _summary_metrics(r: _Row) -> dict:
    m = r.summary.get("metrics")
    return m if isinstance(m, dict) else {}


def _ranked_rows(folders: list[Path]) -> tuple[list[_Row], str | None]:
    """The experiments' rows, best first by the metric most of them rank by (those without it
    after them, newest first), and that metric."""
    rows = [r for r in map(_experiment_row, folders) if r is not None]
    ranks = Counter(r.summary.get("rank_by") for r in rows if r.summary.get("rank_by"))
    rank_by = ranks.most_common(1)[0][0] if ranks else None

    def key(r: _Row) -> tuple:
        v = _summary_metrics(r).get(rank_by) if rank_by else None
        ranked = isinstance(v, (int, float)) and not isinstance(v, bool)
        return (0, -v, r.name) if ranked else (1, -r.mtime, r.name)

    return sorted(rows, key=key), rank_by


def _ranking_table(rows: list[_Row], rank_by: str | None, project: Path) -> str:
    """The index's first table: one row per experiment, its hypothesis (with a stale-conclusion
    flag), its metrics with the ranking one first, hash, date and other versions."""
    from . import index_tables

    names = list(dict.fromkeys(k for r in rows for k in _summary_metrics(r)))
    if rank_by in names:
        names.remove(rank_by)
        names.insert(0, rank_by)
    head = "".join(f'<th class="{"rank" if n == rank_by else ""}">{html.escape(n)}'
                   f'{" ↓" if n == rank_by else ""}</th>' for n in names)
    body = []
    for r in rows:
        s = r.summary
        notes = s.get("notes") if isinstance(s.get("notes"), dict) else {}
        hypo = html.escape(str(s.get("hypothesis") or notes.get("hypothesis") or "").strip()).replace("\n", "<br>")
        hypo += index_tables.stale_html(index_tables.conclusion_check(s, project))
        cis = _best_intervals(s)
        cells = "".join(f'<td class="num{" rank" if n == rank_by else ""}">'
                        f"{_fmt_metric(_summary_metrics(r).get(n), cis.get(n))}</td>" for n in names)
        # the version folder names what the row shows (run + ablation + merge); an older
        # dbkit's flat folder has only the run hash
        h = html.escape(r.version or str(s.get("hash") or "")[:12])
        # ISO timestamps shown to the minute; anything else as written
        date = str(s.get("date") or time.strftime("%Y-%m-%dT%H:%M", time.localtime(r.mtime)))
        date = html.escape(date[:16].replace("T", " ") if re.match(r"\d{4}-\d\d-\d\dT", date) else date)
        body.append(f'<tr><td><a href="{html.escape(r.href)}">{html.escape(r.name)}</a></td><td>{hypo}</td>{cells}'
                    f"<td><code>{h}</code></td><td>{date}</td><td>{_other_versions(r)}</td></tr>")
    if not rows:
        body.append(f'<tr><td colspan="{5 + len(names)}">No experiment has a summary yet: '
                    "run <code>dbkit run params/&lt;experiment&gt;.yaml</code>.</td></tr>")
    return (f"<table><thead><tr><th>experiment</th><th>hypothesis</th>{head}<th>version</th><th>date</th>"
            f"<th>other versions</th></tr></thead><tbody>{''.join(body)}</tbody></table>")


def write_versions_page(folder: Path) -> Path | None:
    """``reports/<experiment>/index.html``: the experiment's report versions, newest first,
    failed attempts marked. Not written over an older dbkit's flat report (its index.html
    is the report page), nor for a folder without versions."""
    versions = _versions(folder)
    if not versions or any((folder / f"{nb}.html").exists() for nb in NOTEBOOKS):
        return None
    latest = next((v["dir"] for v in versions if v["status"] == "ok"), None)
    body = "".join(_version_row(folder, v, v["dir"] == latest) for v in versions)
    name = html.escape(folder.name)
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{name} · versions</title><style>{_INDEX_CSS}</style></head><body>"
        f'<h1>{name}</h1><p class="sub">{len(versions)} report version(s), newest first · '
        '<a href="../index.html">all experiments</a></p>'
        "<table><thead><tr><th>version</th><th>status</th><th>published</th><th>params</th><th>pages</th>"
        f"<th>metrics</th></tr></thead><tbody>{body}</tbody></table></body></html>\n"
    )
    out = folder / "index.html"
    files.atomic_write_text(out, page)
    return out


def _version_row(folder: Path, v: dict, latest: bool) -> str:
    d = html.escape(v["dir"])
    entry = _entry(folder / v["dir"])
    link = f'<a href="{d}/{entry}"><code>{d}</code></a>' if entry else f"<code>{d}</code>"
    status = "latest" if latest else ("failed in " + html.escape(str(v.get("failed", "?")))
                                      if v["status"] == "failed" else "earlier")
    when = html.escape(v["shown"])
    params = " ".join([str(v.get("params_file") or ""), *(f"-p {o}" for o in v.get("overrides") or [])])
    pages = ", ".join(TITLES.get(nb, str(nb)) for nb in v.get("notebooks") or [])
    m = v["summary"].get("metrics")
    metrics = ", ".join(f"{html.escape(str(k))} {_fmt_metric(x)}" for k, x in m.items()) if isinstance(m, dict) else ""
    return (f"<tr><td>{link}</td><td>{status}</td><td>{when}</td><td><code>{html.escape(params)}</code></td>"
            f"<td>{html.escape(pages)}</td><td>{metrics}</td></tr>")


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
    # Chromium's helper processes (crashpad, utility) can outlive the browser and keep writing
    # into the profile; they run in their own session so they can be ended together before the
    # profile is removed, and a file one of them still creates must not fail a finished screenshot.
    with tempfile.TemporaryDirectory(prefix="dbkit-chromium-", ignore_cleanup_errors=True) as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--screenshot={png_path}", f"--window-size={size[0]},{size[1]}",
               Path(html_path).resolve().as_uri()]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env={**os.environ, "TMPDIR": profile})
        try:
            _, stderr = proc.communicate(timeout=timeout)
        finally:
            end_process_group(proc)
    if proc.returncode != 0 or not png_path.is_file():
        raise RuntimeError(f"chromium failed (exit {proc.returncode}): {stderr.strip()[-2000:]}")
    return png_path


def end_process_group(proc: subprocess.Popen) -> None:
    """Kill a process started with ``start_new_session=True`` and every process it spawned."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def is_blank(png_path: Path) -> bool:
    """True when the image is a single colour (nothing rendered)."""
    from PIL import Image

    with Image.open(png_path) as im:
        extrema = im.convert("RGB").getextrema()
    return all(lo == hi for lo, hi in extrema)

"""Drawing and summarising helpers that the report notebooks call.

The notebooks run headless under papermill and are rendered to static HTML without their
code (see :mod:`dbkit.runner`), so everything here produces plain outputs that survive that
trip: PIL images and matplotlib figures are displayed as embedded PNGs (a photo grid as
JPEG when that is smaller; each image in a grid is at most THUMB px), tables as Markdown.

- :func:`image_grid` lays samples out as in the research notes: one row per model or
  variant (label on the left), one column per seed or prompt (labels on top).
- :func:`plot_curves` draws a training log (JSONL) as smoothed + raw loss with the LR.
- :func:`markdown_table` and :func:`params_diff_markdown` format tables.
- :func:`write_summary` writes ``reports/<experiment>/<version>/summary.json``, which
  :func:`dbkit.runner.build_index` turns into the cross-experiment index.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from . import conclusions, hardware, intervals, metric_registry

PAD = 4                      # pixels between cells and around labels in image_grid
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
# Long side of one image in a grid: a report grows with the number of images, not their
# pixels (six 12-MP photos drawn at full size made a 248 MB page). Toy-world 64-px samples
# at scale 3 (192 px) stay as they were.
THUMB = 256
MAX_SHOWN = 4096             # px, long side of any picture show() embeds (a wide grid fits)
PNG_BUDGET = 256 * 1024      # bytes: a larger PNG is embedded as JPEG when that is smaller
JPEG_QUALITY = 85


# ----------------------------------------------------------------------------- images


def _font(scale: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's bundled font (never a download); sized with the grid when FreeType is there."""
    try:
        return ImageFont.load_default(size=max(10, 5 * scale + 2))
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    if not text:
        return 0, 0
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
    return math.ceil(right - min(left, 0)), math.ceil(bottom - min(top, 0))


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """Greedy word wrap to ``width`` pixels (prompts as column labels are longer than a cell)."""
    lines: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split(" "):
            trial = f"{line} {word}" if line else word
            if line and _text_size(draw, trial, font)[0] > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return "\n".join(lines)


def image_grid(rows: list[tuple[str, list[Image.Image]]], col_labels: list[str], *, scale: int = 2,
               title: str = "") -> Image.Image:
    """One row per model/variant (label left), one column per seed/prompt (labels on top).

    Images are upscaled by ``scale`` with nearest-neighbour so 64×64 samples stay crisp, as
    far as ``THUMB`` px on the long side; larger images are shrunk to that (see :func:`grid_cell`).
    Cells are sized to the largest image and a missing image leaves its cell blank; column
    labels wrap at word boundaries to the cell width.
    Without labels or a title, for images up to THUMB/scale px, the size is exactly
    ``(ncols·(w·scale + PAD) + PAD, nrows·(h·scale + PAD) + PAD)``; labels add a left
    column and a top band sized to the text.
    """
    if scale < 1:
        raise ValueError(f"scale must be ≥ 1, got {scale}")
    rows = [(label, [grid_cell(im, scale) for im in ims]) for label, ims in rows]
    images = [im for _, ims in rows for im in ims]
    cell_w = max((im.width for im in images), default=0)
    cell_h = max((im.height for im in images), default=0)
    ncols = max([len(col_labels), *(len(ims) for _, ims in rows)], default=0)

    font = _font(scale)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    col_labels = [_wrap(probe, c, font, cell_w) for c in col_labels]
    label_w = max((_text_size(probe, label, font)[0] for label, _ in rows), default=0)
    label_w = label_w + 2 * PAD if label_w else 0
    header_h = max((_text_size(probe, c, font)[1] for c in col_labels), default=0)
    header_h = header_h + 2 * PAD if header_h else 0
    title_h = _text_size(probe, title, font)[1]
    title_h = title_h + 2 * PAD if title_h else 0

    width = label_w + ncols * (cell_w + PAD) + PAD
    height = title_h + header_h + len(rows) * (cell_h + PAD) + PAD
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((PAD, PAD), title, fill=TEXT, font=font)
    x0, y0 = label_w + PAD, title_h + header_h + PAD
    for j, label in enumerate(col_labels):
        tw, th = _text_size(draw, label, font)
        # centred over its column and sitting on it; a label wider than the cell starts at its left edge
        x = x0 + j * (cell_w + PAD) + max(0, (cell_w - tw) // 2)
        draw.multiline_text((x, title_h + header_h - PAD - th), label, fill=TEXT, font=font, align="center")
    for i, (label, ims) in enumerate(rows):
        y = y0 + i * (cell_h + PAD)
        _, th = _text_size(draw, label, font)
        draw.multiline_text((PAD, y + max(0, (cell_h - th) // 2)), label, fill=TEXT, font=font)
        for j, im in enumerate(ims):
            canvas.paste(im, (x0 + j * (cell_w + PAD), y))
    return canvas


def grid_cell(im: Image.Image, scale: int) -> Image.Image:
    """An image as one grid cell, RGB, at most THUMB px on its long side: enlarged by a whole
    factor up to `scale` (nearest-neighbour keeps small samples crisp), or, when larger than
    THUMB, shrunk to it (Lanczos after a fast reduce)."""
    im = im.convert("RGB")
    long = max(im.size)
    k = min(scale, max(1, THUMB // long))
    if long * k <= THUMB:
        return im.resize((im.width * k, im.height * k), Image.Resampling.NEAREST)
    im.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
    return im


def open_image(path: Path) -> Image.Image:
    """An image file as RGB, read fully (the file is closed on return)."""
    with Image.open(path) as im:
        return im.convert("RGB")


def sample_browser(run_dir: Path, *, scale: int = 4) -> None:
    """Flip through the training previews (step × prompt × seed) with widgets.

    Live in JupyterLab; in the static HTML report the widgets are frozen at their initial
    values (see :func:`dbkit.runner.render_html`), so the preview grids carry the story
    there. Displays, returns nothing (a returned widget would display twice).
    """
    from IPython.display import Markdown, display

    steps = sorted((Path(run_dir) / "samples").glob("step_*"))
    if not steps:
        display(Markdown("_No preview samples were saved during training._"))
        return
    idx = json.loads((steps[0] / "index.json").read_text(encoding="utf-8"))
    try:
        import ipywidgets as w
    except ImportError:
        display(Markdown("_Install ipywidgets to browse samples interactively._"))
        return
    step = w.SelectionSlider(options=[(str(int(d.name.split("_")[1])), d) for d in steps], value=steps[-1],
                             description="step")
    prompt = w.Dropdown(options=[(t, i) for i, t in enumerate(idx["prompts"])], description="prompt")
    seed = w.SelectionSlider(options=list(idx["seeds"]), description="seed")
    img = w.Image(format="png")

    def update(_: Any = None) -> None:
        path = step.value / f"p{prompt.value}_s{seed.value}.png"
        if path.is_file():
            # upscaled here, nearest-neighbour: the browser would blur a 64×64 image
            big = open_image(path)
            big = big.resize((big.width * scale, big.height * scale), Image.Resampling.NEAREST)
            img.value = _png_bytes(big) or b""

    for control in (step, prompt, seed):
        control.observe(update, names="value")
    update()
    display(w.VBox([w.HBox([step, seed]), prompt, img]))


def _png_bytes(obj: Any) -> bytes | None:
    """PNG of a PIL image or matplotlib figure; None for anything else."""
    buf = io.BytesIO()
    if isinstance(obj, Image.Image):
        obj.save(buf, format="PNG")
        return buf.getvalue()
    if hasattr(obj, "savefig"):  # a matplotlib Figure, without importing matplotlib here
        obj.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        return buf.getvalue()
    return None


def embed_bytes(im: Image.Image) -> tuple[bytes, str]:
    """(bytes, format) of a PIL image for a report, at most MAX_SHOWN px on the long side:
    PNG up to PNG_BUDGET bytes (small pictures and crisp toy-world pixels stay lossless),
    else JPEG when that is smaller (a grid of photo thumbnails: a fraction of its PNG)."""
    if max(im.size) > MAX_SHOWN:
        im = im.copy()
        im.thumbnail((MAX_SHOWN, MAX_SHOWN), Image.Resampling.LANCZOS)
    png = _png_bytes(im) or b""
    if len(png) <= PNG_BUDGET or "A" in im.mode or "transparency" in im.info:
        return png, "png"
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    return (png, "png") if len(png) <= buf.tell() else (buf.getvalue(), "jpeg")


def show(img_or_fig: Any) -> None:
    """Display a PIL image (see :func:`embed_bytes`: PNG or JPEG, bounded) or a matplotlib
    figure (PNG) in the notebook, embedded.

    Figures are closed after display: the inline backend would otherwise draw every open
    figure a second time at the end of the cell.
    """
    from IPython.display import Image as IPImage
    from IPython.display import display

    if isinstance(img_or_fig, Image.Image):
        data, fmt = embed_bytes(img_or_fig)
        display(IPImage(data=data, format=fmt))
        return
    png = _png_bytes(img_or_fig)
    if png is None:
        display(img_or_fig)
        return
    display(IPImage(data=png, format="png"))
    if hasattr(img_or_fig, "savefig"):
        import matplotlib.pyplot as plt

        plt.close(img_or_fig)


# ----------------------------------------------------------------------------- curves


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL log; a torn last line (a run still writing) is skipped; no file = []."""
    out: list[dict] = []
    path = Path(path)
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def smooth(values: Sequence[float], weight: float | None = None) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard-style).

    The default weight follows the length so that a 50-step log and a 5000-step log are
    both readable: about 1/20 of the points contribute to each smoothed value.
    """
    if weight is None:
        weight = 1.0 - 1.0 / max(1.0, len(values) / 20)
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        avg = weight * avg + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(avg / norm if norm else v)
    return out


def plot_curves(log_path: Path, keys: Sequence[str] = ("loss",)) -> Any:
    """Loss curves from a JSONL log of ``{"step": …, "loss": …, "lr": …}`` lines.

    Each key is drawn raw (faint) and smoothed; the learning rate, when logged, goes on a
    twin axis. Returns the matplotlib Figure (pass it to :func:`show`).
    """
    import matplotlib.pyplot as plt

    records = [r for r in read_jsonl(Path(log_path)) if isinstance(r.get("step"), (int, float))]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, key in enumerate(keys):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if not pts:
            continue
        steps, vals = zip(*pts)
        color = colors[i % len(colors)]
        ax.plot(steps, vals, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth(vals), color=color, linewidth=1.8, label=f"{key} (smoothed)")
    ax.set_xlabel("step")
    ax.set_ylabel(", ".join(keys))
    ax.grid(alpha=0.3)
    lr = [(r["step"], r["lr"]) for r in records if isinstance(r.get("lr"), (int, float))]
    handles, labels = ax.get_legend_handles_labels()
    if lr:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lr), color="0.4", linestyle="--", linewidth=1.0, label="lr")
        ax2.set_ylabel("lr")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, loc="upper right", fontsize="small")
    else:
        _no_data(ax, f"no {', '.join(keys)} in {Path(log_path).name}")
    fig.tight_layout()
    return fig


def _no_data(ax: Any, text: str) -> None:
    # an empty plot with a reason beats a failing cell: a report still renders for partial runs
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")




def plot_steps_curve(path: Path) -> Any:
    """Metrics measured during training (``steps_curve.jsonl``: step → subject_fidelity, pres, …), 0–1."""
    import matplotlib.pyplot as plt

    records = [r for r in read_jsonl(Path(path)) if isinstance(r.get("step"), (int, float))]
    keys = list(dict.fromkeys(k for r in records for k, v in r.items()
                              if k not in ("step", "n") and isinstance(v, (int, float)) and not isinstance(v, bool)))
    fig, ax = plt.subplots(figsize=(7, 3.2))
    banded = False
    for key in keys:
        pts = [(r["step"], r[key], r.get("n")) for r in records if isinstance(r.get(key), (int, float))]
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, linewidth=1.5, label=key)
        if key in metric_registry.RATES and all(isinstance(p[2], int) for p in pts):
            lows, highs = zip(*(intervals.wilson(p[1], p[2]) for p in pts))
            ax.fill_between([p[0] for p in pts], lows, highs, color=line.get_color(), alpha=0.15, linewidth=0)
            banded = True
    if banded:
        ax.set_title(f"shaded: Wilson 95% interval over the {records[-1]['n']} preview images per step",
                     fontsize="small")
    ax.set_xlabel("step")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    if keys:
        ax.legend(loc="best", fontsize="small")
    else:
        _no_data(ax, f"no metrics logged during training ({Path(path).name} is missing or empty)")
    fig.tight_layout()
    return fig


def plot_weight_heatmap(cells: list[dict], grid: list[float], keys: Sequence[str]) -> Any:
    """One heat map per metric over a wA × wB weight grid (rows wA, columns wB), values written in."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.0))
    for ax, key in zip(np.atleast_1d(axes), keys):
        values = np.array([[next((c.get(key) for c in cells if c["wA"] == a and c["wB"] == b), np.nan)
                            for b in grid] for a in grid], dtype=float)
        ax.imshow(values, vmin=0, vmax=1, cmap="viridis", origin="upper")
        for i in range(len(grid)):
            for j in range(len(grid)):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center",
                        color="white" if values[i, j] < 0.6 else "black", fontsize=8)
        ax.set_xticks(range(len(grid)), [str(g) for g in grid])
        ax.set_yticks(range(len(grid)), [str(g) for g in grid])
        ax.set_xlabel("wB (style)")
        ax.set_ylabel("wA (subject)")
        ax.set_title(key)
    fig.tight_layout()
    return fig


def figure_png(fig: Any) -> bytes:
    """A matplotlib figure (or PIL image) as PNG bytes, closed afterwards."""
    out = _png_bytes(fig)
    if out is None:
        raise TypeError(f"not a figure or image: {type(fig).__name__}")
    if hasattr(fig, "savefig"):
        import matplotlib.pyplot as plt

        plt.close(fig)
    return out


def plot_tag_frequencies(freqs: Mapping[str, int] | None, top: int = 30) -> Any:
    """Horizontal bars of the ``top`` most frequent caption tags (``tag_frequencies.json``)."""
    import matplotlib.pyplot as plt

    items = sorted((freqs or {}).items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    fig, ax = plt.subplots(figsize=(7, max(1.6, 0.25 * len(items) + 0.8)))
    if items:
        tags, counts = zip(*reversed(items))  # most frequent on top
        ax.barh(range(len(tags)), counts, color="#4c72b0")
        ax.set_yticks(range(len(tags)), tags, fontsize="small")
        ax.set_xlabel("captions containing the tag")
        ax.grid(axis="x", alpha=0.3)
    else:
        ax.set_axis_off()
        _no_data(ax, "no tags (captions in sentence form only)")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- tables


def _cell(value: Any, floatfmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return format(value, floatfmt)
    if isinstance(value, str):
        text = value
    else:
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    # a raw '|' or newline would break the row
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict], columns: list[str] | None = None, floatfmt: str = ".3f") -> str:
    """A GitHub-style Markdown table; columns default to every key in order of appearance.

    Floats use ``floatfmt``; None and missing keys are empty cells. No trailing newline.
    """
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(_cell(c, floatfmt) for c in columns) + " |",
             "|" + "|".join(" --- " for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c), floatfmt) for c in columns) + " |")
    return "\n".join(lines)


CAPTION_COLUMNS = (("tagger", "tagger tags"), ("sentence", "captioner sentence"), ("caption", "final caption"))


def captions_html(rows: list[dict]) -> str:
    """The 02_captions table: per photo its thumbnail (``thumb``, a PIL image), name and what
    each caption model said (``tagger``, ``sentence``) next to the ``caption`` training uses.
    Columns no row fills are left out. HTML, because Markdown cannot hold the thumbnails; they
    are embedded, so the page stays self-contained."""
    import base64
    import html

    cols = [(k, title) for k, title in CAPTION_COLUMNS if any(r.get(k) for r in rows)]
    head = "".join(f"<th>{html.escape(t)}</th>" for t in ["photo", *(t for _, t in cols)])
    body = []
    for r in rows:
        data, fmt = embed_bytes(r["thumb"])
        img = (f'<img alt="{html.escape(r["name"])}" style="max-width:128px" '
               f'src="data:image/{fmt};base64,{base64.b64encode(data).decode()}">')
        cells = [f"{img}<br><code>{html.escape(r['name'])}</code>",
                 *(html.escape(r.get(k) or "") for k, _ in cols)]
        body.append("<tr>" + "".join(f'<td style="text-align:left;vertical-align:top">{c}</td>' for c in cells)
                    + "</tr>")
    return f'<table class="dbkit-captions"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def metrics_markdown(rows: list[dict], floatfmt: str = ".3f") -> str:
    """Metrics of several models (``{"model": …, "subject_fidelity": …, …}``) with a legend.

    Rows without metrics (user photos, no oracle) keep their model name and empty cells.
    """
    if not rows:
        return "_No metrics._"
    keys = metric_registry.ordered(k for r in rows for k in r if k != "model" and k not in metric_registry.NOT_METRICS)
    shown = [_with_intervals(r, floatfmt) for r in rows]
    table = markdown_table(shown, ["model", *keys], floatfmt)
    backend = next((str(r["backend"]) for r in rows if r.get("backend")), None)
    legend = [f"- `{k}`: {metric_registry.legend(k, backend)}" for k in keys if metric_registry.legend(k, backend)]
    if shown != rows:
        legend.append("- `[low, high]`: the rate's Wilson 95% interval over the images (prompt fidelity: the "
                      "requested attributes) it was measured on: evaluation sampling only, not training variance "
                      "(each row is one training); rows whose intervals overlap may differ by noise alone")
    backends = sorted({str(r["backend"]) for r in rows if r.get("backend")})
    if backends:
        legend.append(f"- backend: {', '.join(backends)}")
    return table + ("\n\n" + "\n".join(legend) if legend else "")


def _with_intervals(row: dict, floatfmt: str) -> dict:
    """The row with each rate metric as ``value [low, high]`` (dbkit.intervals); other cells as they are."""
    n = intervals.denominators(row)
    if not n:
        return row
    out = dict(row)
    for name, count in n.items():
        value = row.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            low, high = intervals.wilson(float(value), count)
            out[name] = f"{format(float(value), floatfmt)} [{low:.2f}, {high:.2f}]"
    return out


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """The report's head: hypothesis, conclusion, key metrics, params diff and the ablation."""
    notes = summary.get("notes") or {}
    parts = [f"## {summary.get('experiment', '')}".rstrip()]
    hypothesis = str(summary.get("hypothesis") or notes.get("hypothesis") or "").strip()
    parts.append(f"**Hypothesis.** {hypothesis or '_not written_'}")
    parts.append(conclusion_markdown(summary))
    metrics = summary.get("metrics") or {}
    if metrics:
        rank_by = summary.get("rank_by")
        rows = [{"metric": f"**{k}**" if k == rank_by else k, "value": v} for k, v in metrics.items()]
        parts.append("### Key metrics\n\n" + markdown_table(rows, ["metric", "value"]))
    parts.append("### Params diff against the parent\n\n" + params_diff_markdown(summary.get("diff") or {}))
    vary = summary.get("vary") or {}
    lines = [f"- `{k}`: {', '.join(_value(v) for v in vals)}" for k, vals in vary.items()]
    for name, overrides in (summary.get("variants") or {}).items():
        lines.append(f"- **{name}**: " + ", ".join(f"`{k}` = {_value(v)}" for k, v in overrides.items()))
    if lines:
        parts.append("### What was varied\n\n" + "\n".join(lines))
    data = summary.get("data") or {}
    if data:
        klass = f"{data.get('n_class', 0)} class images, {data.get('class_source')}" if data.get("class_dir") else \
            "no prior preservation"
        parts.append(f"**Data.** {data.get('n_instance')} instance images from `{data.get('instance_dir')}`; {klass}.")
    return "\n\n".join(parts)


def conclusion_markdown(summary: Mapping[str, Any]) -> str:
    """The written conclusion with its ``{metric@row}`` references filled in from this run's
    table, and a warning above it when a reference does not resolve, a figure is copied in
    bare, or nothing is written (``summary["conclusion_check"]``, :mod:`dbkit.conclusions`)."""
    notes = summary.get("notes") or {}
    text = str(summary.get("conclusion") or notes.get("conclusion") or "").strip()
    text = conclusions.render(text, summary.get("rows") or [])
    check = summary.get("conclusion_check") or {}
    out = f"**Conclusion.** {text or '_not written_'}"
    if check.get("message"):
        out = f"> ⚠ **{check['message']}**\n\n" + out
    return out


def provenance_markdown(summary: Mapping[str, Any]) -> str:
    """What produced this report: training's code, environment and start time (the model's
    provenance, not the report's), the report's own code and time, the params hash, the data
    fingerprint, the seed, and each stage's record and wall time."""
    stages = _stages(summary.get("provenance"))
    train, own = stages.get("train") or {}, stages.get("report") or {}
    env = train or own or next(iter(stages.values()), {})  # the environment that trained, when known
    packages = ", ".join(f"{k} {v}" for k, v in (env.get("packages") or {}).items() if v)
    rows = [
        {"": "params file", "value": f"`{summary.get('params_file') or env.get('params_file', '')}`"},
        {"": "params hash", "value": f"`{summary.get('hash') or env.get('params_hash', '')}`"},
        # the report version: the run hash plus ablation, merge and report (config.version_hash)
        {"": "report version", "value": f"`{summary['version']}`" if summary.get("version") else None},
        {"": "data fingerprint", "value": f"`{summary.get('data_fingerprint') or env.get('data_fingerprint') or ''}`"},
        {"": "seed", "value": env.get("seed")},
        {"": "run folder", "value": f"`{summary.get('run_dir', '')}`"},
        {"": "training code", "value": _code(train)},
        {"": "training started", "value": (train.get("earlier") or [train])[0].get("timestamp")},
        {"": "resumed from", "value": train.get("resumed_from")},
        # a finished identical run copied, not retrained here (dbkit.reuse): the rows above are its
        {"": "training reused from", "value": f"`{train['reused_from']}`" if train.get("reused_from") else None},
        {"": "training finished", "value": train.get("finished")},
        {"": "report code", "value": _code(own)},
        {"": "report made", "value": own.get("timestamp")},
        {"": "python", "value": env.get("python")},
        {"": "packages", "value": packages or None},
        {"": "device", "value": env.get("device")},
        # toy training is chaotic in float rounding: a figure is exact only on this hardware
        {"": "hardware", "value": hardware.summary(env["hardware"]) if env.get("hardware") else None},
        {"": "platform", "value": env.get("platform")},
    ]
    out = markdown_table([r for r in rows if r["value"] not in (None, "", "``")], ["", "value"])
    if stages:
        srows = [{"stage": name, "code": _code(rec) or "—", "recorded": rec.get("timestamp"),
                  "device": rec.get("device")} for name, rec in stages.items()]
        out += "\n\n" + markdown_table(srows, ["stage", "code", "recorded", "device"])
    timings = summary.get("timings") or {}
    if timings:
        trows = [{"stage": k, "wall time": _duration(v)} for k, v in timings.items()]
        out += "\n\n" + markdown_table(trows, ["stage", "wall time"])
    return out


def _stages(prov: Mapping[str, Any] | None) -> dict[str, dict]:
    """Stage → provenance record, in notebook order; an older dbkit's single record (which
    every notebook restamped) is shown as stage "unknown"."""
    from .runs import STAGES

    if not prov:
        return {}
    stages = dict(prov["stages"]) if "stages" in prov else {"unknown": dict(prov)}
    order = {s: k for k, s in enumerate(STAGES)}
    return dict(sorted(stages.items(), key=lambda kv: order.get(kv[0], len(order))))


def _code(rec: Mapping[str, Any]) -> str | None:
    commit = rec.get("git_commit")
    if not commit:
        return None
    return f"`{commit[:12]}`" + (" (uncommitted changes)" if rec.get("git_dirty") else "")


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return str(seconds)
    m, s = divmod(float(seconds), 60)
    return f"{int(m)} min {s:.0f} s" if m else f"{s:.1f} s"


def _value(v: Any) -> str:
    if v is None:
        return "—"
    # JSON shows strings quoted, so an empty string or "no" reads unambiguously
    return "`" + json.dumps(v, ensure_ascii=False).replace("|", "\\|") + "`"


def params_diff_markdown(diff: Mapping[str, tuple]) -> str:
    """``config.diff(parent, params)`` (key → (parent value, this value)) as a Markdown table."""
    if not diff:
        return "_No differences from the parent._"
    lines = ["| param | parent | this run |", "| --- | --- | --- |"]
    for key, pair in diff.items():
        parent, this = (tuple(pair) + (None, None))[:2]
        lines.append(f"| `{key}` | {_value(parent)} | {_value(this)} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- summary


def reports_dir(exp_name: str, root: Path | None = None) -> Path:
    """``<root>/<experiment>/`` (created); ``root`` defaults to ``$DBKIT_REPORTS``, else ``reports``.

    ``dbkit run --reports X`` sets ``$DBKIT_REPORTS`` for the notebooks' kernel, so a notebook
    calling ``reports_dir(exp.name)`` writes where the runner publishes.
    """
    if root is None:
        root = Path(os.environ.get("DBKIT_REPORTS") or "reports")
    d = Path(root) / exp_name
    d.mkdir(parents=True, exist_ok=True)
    return d


def write_summary(report_dir: Path, summary: dict) -> Path:
    """Write ``<report_dir>/summary.json`` atomically for :func:`dbkit.runner.build_index`.

    Keys the index reads: ``experiment``, ``hypothesis`` (or ``notes.hypothesis``),
    ``metrics`` (name → number; a text value such as the best variant's label is shown
    as is), ``rank_by`` (a metric name; the index sorts on it, descending; experiments
    lacking it go last), ``hash`` and ``date`` (now, UTC, when missing). Other keys are
    kept for the record.
    """
    from . import files

    metrics = summary.get("metrics", {})
    if not isinstance(metrics, Mapping):
        raise TypeError(f"summary['metrics'] must map names to values, got {type(metrics).__name__}")
    out = dict(summary)
    out.setdefault("date", _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    path = Path(report_dir) / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write_json(path, out)
    return path

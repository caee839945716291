"""A report page renders in a real browser, offline: headless Chromium screenshots it.

Skipped where Chromium is not installed (``apt-get install -y chromium``). Users run the
same check with ``dbkit check-report reports/<experiment>/index.html``.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import nbformat
import pytest
from PIL import Image

from dbkit import cli, runner

CHROMIUM = "/usr/bin/chromium"
MAGENTA = (255, 0, 255)

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} not installed "
                                "(apt-get install -y chromium)")


def _png_b64(color: tuple[int, int, int], size: int = 160) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _report_html(tmp_path: Path) -> Path:
    """An executed-looking notebook (outputs filled in, no kernel needed) rendered as a report."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Browser check\nSome *text* and a [link](https://example.com)."),
        nbformat.v4.new_code_cell("show(grid)", execution_count=1, outputs=[
            nbformat.v4.new_output("display_data",
                                   data={"image/png": _png_b64(MAGENTA), "text/plain": "<Image>"}),
            nbformat.v4.new_output("display_data", data={
                "application/vnd.jupyter.widget-view+json": {"model_id": "abc", "version_major": 2,
                                                             "version_minor": 0},
                "text/plain": "HBox(children=(FloatProgress(value=1.0),))"}),
        ]),
    ]
    nb_path = tmp_path / "05_report.ipynb"
    nbformat.write(nb, str(nb_path))
    return runner.render_html(nb_path, tmp_path / "index.html", title="browser check",
                              nav=runner.nav_html("browser-check", "05_report"))


def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    html_path = _report_html(tmp_path)
    assert runner.external_refs(html_path.read_text(encoding="utf-8")) == []

    png = runner.screenshot(html_path, tmp_path / "shot.png", chromium=CHROMIUM)

    assert png.is_file() and not runner.is_blank(png)
    with Image.open(png) as shot:
        colors = shot.convert("RGB").getcolors(maxcolors=1 << 20) or []
    # the embedded PNG was decoded and drawn (allowing for colour management)
    assert any(n > 1000 and abs(c[0] - 255) < 8 and c[1] < 8 and abs(c[2] - 255) < 8 for n, c in colors)


def test_check_report_cli_prints_the_screenshot(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    html_path = _report_html(tmp_path)
    assert cli.main(["check-report", str(html_path), "--out", str(tmp_path / "cli.png")]) == 0
    assert capsys.readouterr().out.strip() == str((tmp_path / "cli.png").resolve())

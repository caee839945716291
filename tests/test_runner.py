"""`dbkit run`: papermill execution, code-free self-contained HTML, failure reporting, the index.

The notebooks here are tiny throwaways built with nbformat; each test starts as few
kernels as it can (kernel start-up dominates the run time).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest
from PIL import Image

from dbkit import cli, config, report, runner

PARAMS_CELL = 'params_path = "params/demo.yaml"\noverrides = []\nrun_dir = ""'

DATA_CODE = """\
from pathlib import Path
import matplotlib.pyplot as plt
from dbkit import report
SECRET_MARKER_01 = 41 + 1
Path(run_dir, "from_01.txt").write_text(str(SECRET_MARKER_01))
fig, ax = plt.subplots(figsize=(2, 2))
ax.plot([0, 1], [1, 0])
report.show(fig)
from tqdm.auto import tqdm
for _ in tqdm(range(5), desc="steps"):
    pass
"""

REPORT_CODE = """\
from pathlib import Path
from IPython.display import Markdown, display
from PIL import Image
from dbkit import config, report
SECRET_MARKER_05 = int(Path(run_dir, "from_01.txt").read_text())
exp = config.load(params_path, overrides)
tile = Image.new("RGB", (8, 8), (200, 30, 30))
report.show(report.image_grid([("base", [tile, tile])], ["s0", "s1"]))
display(Markdown(report.markdown_table([{"value": SECRET_MARKER_05}])))
_ = report.write_summary(report.reports_dir(exp.name), {"experiment": exp.name, "hypothesis": "it works",
                         "metrics": {"value": SECRET_MARKER_05}, "rank_by": "value", "hash": exp.hash})
"""

# A start tag other than <a> whose src/href points at the network: the page would not be self-contained.
EXTERNAL = re.compile(r"""<(?!a\b)[a-zA-Z][^>]*\s(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.IGNORECASE)


def make_notebook(path: Path, *codes: str, markdown: str = "") -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell(PARAMS_CELL)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params]
    if markdown:
        nb.cells.append(nbformat.v4.new_markdown_cell(markdown))
    nb.cells += [nbformat.v4.new_code_cell(c) for c in codes]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


def make_params(tmp: Path, name: str, extra: str = "") -> Path:
    images = tmp / "photos"
    images.mkdir(exist_ok=True)
    Image.new("RGB", (8, 8), (0, 128, 255)).save(images / "one.png")
    path = tmp / "params" / f"{name}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(f"extends: {config.BASE_PATH}\nexperiment: {name}\n"
                    f"data:\n  instance_images: {images}\n{extra}")
    return path


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # runs/ and reports/ are relative to the cwd: keep them out of the repo
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_run_experiment_writes_code_free_self_contained_html(workdir: Path) -> None:
    nbs = workdir / "nbs"
    make_notebook(nbs / "01_data.ipynb", DATA_CODE,
                  markdown="# Data\n![remote](https://example.com/x.png) [docs](https://example.com/docs)")
    make_notebook(nbs / "05_report.ipynb", REPORT_CODE)
    params = make_params(workdir, "exp-ok")
    reports = workdir / "out" / "reports"

    out = runner.run_experiment(params, [], notebooks_dir=nbs, reports_root=reports,
                                only=["01_data", "05_report"], progress=False)

    exp = config.load(params)
    assert out == reports / "exp-ok" / exp.version[:12]  # one version folder per version hash
    pages = {p.name: p.read_text(encoding="utf-8") for p in
             (out / "01_data.html", out / "05_report.html", out / "index.html")}
    for name, page in pages.items():
        assert "data:image/png;base64," in page, name
        for code in ("SECRET_MARKER", "write_text", "params_path =", "import matplotlib"):
            assert code not in page, (name, code)
        assert not EXTERNAL.findall(page), (name, EXTERNAL.findall(page)[:3])
        assert runner.external_refs(page) == [], name
    assert 'href="https://example.com/docs"' in pages["01_data.html"]  # plain links stay
    assert "width:100.0%" in pages["01_data.html"]  # the tqdm widget shows its final state
    assert '<a href="01_data.html"' in pages["index.html"]
    assert '<a href="04_ablations.html"' in pages["index.html"]
    assert (out / "01_data.ipynb").is_file() and not list(out.parent.rglob(".*"))  # no staging or temp left
    assert '<a href="../../index.html">All experiments</a>' in pages["index.html"]

    rdir = workdir / "runs" / "exp-ok" / exp.hash[:12]
    assert (rdir / "from_01.txt").read_text() == "42"
    assert set(json.loads((rdir / "timings.json").read_text())) == {"01_data", "05_report"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"] == {"value": 42} and summary["hash"] == exp.hash
    index = (reports / "index.html").read_text(encoding="utf-8")
    assert f'href="exp-ok/{exp.version[:12]}/index.html"' in index and "it works" in index
    assert not EXTERNAL.findall(index)
    versions = (reports / "exp-ok" / "index.html").read_text(encoding="utf-8")  # the experiment's versions
    assert f'<a href="{exp.version[:12]}/index.html">' in versions and "latest" in versions


def test_failing_cell_stops_the_run_and_is_reported(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    nbs = workdir / "nbs"
    make_notebook(nbs / "03_train.ipynb", "print('training')",
                  "x = 1\nraise ValueError('loss is nan at step 7')")
    make_notebook(nbs / "04_ablations.ipynb", "open('ablations_ran.txt', 'w').write('yes')")
    params = make_params(workdir, "exp-fail")

    code = cli.main(["run", str(params), "--notebooks", str(nbs), "--reports", "reports",
                     "--only", "03_train", "04_ablations", "--no-progress"])

    assert code == 1
    err = capsys.readouterr().err
    m = re.search(r"FAILED: 03_train\.ipynb, cell (\d+): ValueError: loss is nan at step 7", err)
    assert m, err
    failed = Path("reports") / "exp-fail" / f"failed-{config.load(params).version[:12]}"
    assert f"see {failed / '03_train.html'}" in err  # failed pages go aside, named
    page = (workdir / failed / "03_train.html").read_text(encoding="utf-8")
    assert "training" in page and "loss is nan at step 7" in page  # the partial outputs and the error
    assert not (workdir / "ablations_ran.txt").exists()
    assert not (workdir / failed / "04_ablations.ipynb").exists()
    assert sorted(p.name for p in (workdir / "reports" / "exp-fail").iterdir()) == [failed.name, "index.html"]
    assert "Traceback (most recent call last)" not in err


def test_config_error_stops_before_any_notebook(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    nbs = workdir / "nbs"
    make_notebook(nbs / "01_data.ipynb", "open('ran.txt', 'w').write('yes')")
    params = make_params(workdir, "exp-bad", extra="train:\n  lora:\n    rnak: 4\n")

    with pytest.raises(config.ConfigError):
        runner.run_experiment(params, notebooks_dir=nbs, reports_root=workdir / "reports", progress=False)
    code = cli.main(["run", str(params), "-p", "train.steps=10", "--notebooks", str(nbs),
                     "--only", "01_data"])

    assert code == 2
    err = capsys.readouterr().err
    assert "rnak" in err and "Traceback" not in err
    assert not (workdir / "ran.txt").exists() and not (workdir / "reports").exists()


def test_only_accepts_short_names_and_rejects_unknown() -> None:
    assert runner._select(["03", "report", "01_data.ipynb"]) == ["01_data", "03_train", "05_report"]
    assert runner._select(None) == list(runner.NOTEBOOKS)
    with pytest.raises(ValueError, match="03_training"):
        runner._select(["03_training"])


def test_build_index_sorts_by_rank_by(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    for name, score in (("mid", 0.5), ("best", 0.9), ("worst", 0.1)):
        report.write_summary(report.reports_dir(name, reports), {
            "experiment": name, "hypothesis": f"<{name}> hypothesis", "rank_by": "fidelity",
            "metrics": {"fidelity": score, "diversity": 1 - score}, "hash": "abcdef0123456789",
            "date": "2024-05-01"})
    report.write_summary(report.reports_dir("unranked", reports), {
        "experiment": "unranked", "notes": {"hypothesis": "from the notes"}, "metrics": {"best": "rank 8"},
        "rank_by": "fidelity"})
    (reports / "no-summary").mkdir()

    page = runner.build_index(reports).read_text(encoding="utf-8")

    order = [m.group(1) for m in re.finditer(r'<a href="([\w-]+)/index\.html"', page)]
    assert order == ["best", "mid", "worst", "unranked"]
    assert "&lt;best&gt; hypothesis" in page and "abcdef012345" in page and "2024-05-01" in page
    assert "from the notes" in page and "rank 8" in page
    assert page.index("fidelity") < page.index("diversity")  # the ranking metric is the first column
    assert not EXTERNAL.findall(page)
    assert cli.main(["report", "--reports", str(reports)]) == 0  # `dbkit report` rebuilds the same page
    assert (reports / "index.html").read_text(encoding="utf-8") == page


def test_widgets_are_frozen_at_their_final_state(tmp_path: Path) -> None:
    png = ("iVBORw0KGgoAAAANSUhEUgAAAAQAAAAECAIAAAAmkwkpAAAAEElEQVR4nGP8z4AATAxEcQAz0QEHOoQ+"
           "uAAAAABJRU5ErkJggg==")
    models = {
        "box": {"model_name": "VBoxModel",
                "state": {"children": ["IPY_MODEL_bar", "IPY_MODEL_sel", "IPY_MODEL_img"]}},
        "bar": {"model_name": "FloatProgressModel",
                "state": {"value": 30, "max": 60, "bar_style": "success"}},
        "sel": {"model_name": "SelectionSliderModel",
                "state": {"description": "step", "_options_labels": ["100", "200"], "index": 1}},
        "img": {"model_name": "ImageModel", "state": {"format": "png", "width": "128"},
                "buffers": [{"path": ["value"], "data": png, "encoding": "base64"}]},
    }
    nb = nbformat.v4.new_notebook()
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": models}}
    view = "application/vnd.jupyter.widget-view+json"
    nb.cells = [nbformat.v4.new_code_cell("secret()", outputs=[
        nbformat.v4.new_output("display_data", data={view: {"model_id": "box"}, "text/plain": "VBox()"}),
        nbformat.v4.new_output("display_data", data={view: {"model_id": "gone"}, "text/plain": "Gone()"}),
    ])]
    nbformat.write(nb, str(tmp_path / "w.ipynb"))

    page = runner.render_html(tmp_path / "w.ipynb", tmp_path / "w.html").read_text(encoding="utf-8")

    assert "width:50.0%" in page and "<code>200</code>" in page and f"base64,{png}" in page
    assert "Gone()" in page and "VBox()" not in page and "secret()" not in page
    assert "widget-state+json" not in page and runner.external_refs(page) == []


def test_strip_external_removes_network_references_only() -> None:
    page = """<html><head>
<script src="https://cdn.example.com/require.js"></script>
<link rel="stylesheet" href="//fonts.example.com/css">
<style>@import url("https://fonts.example.com/x.css");
body { background: url(https://x.example/bg.png) }</style>
<script>var ok = 1;</script></head><body>
<img alt="remote" src='http://example.com/a.png'><img src="data:image/png;base64,AAAA">
<a href="https://example.com">a link</a><iframe src=https://example.com/embed></iframe>
</body></html>"""
    assert len(runner.external_refs(page)) == 6
    clean = runner.strip_external(page)
    assert runner.external_refs(clean) == [] and not EXTERNAL.findall(clean)
    assert "var ok = 1;" in clean and "data:image/png;base64,AAAA" in clean
    assert '<a href="https://example.com">a link</a>' in clean and 'alt="remote"' in clean

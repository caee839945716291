"""dbkit.report: the grid layout, tables, curves and the summary the index is built from."""

from __future__ import annotations

import io
import json
from pathlib import Path

import matplotlib
import pytest
from PIL import Image

from dbkit import config, report

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the headless backend

RED, BLUE = (255, 0, 0), (0, 0, 255)


def checker(size: int = 8) -> Image.Image:
    """Left half red, right half blue: nearest-neighbour scaling keeps the edge sharp."""
    im = Image.new("RGB", (size, size), RED)
    im.paste(BLUE, (size // 2, 0, size, size))
    return im


def test_image_grid_size_without_labels_is_exact_and_scaling_is_nearest() -> None:
    rows = [("", [checker(), checker(), checker()]), ("", [checker(), checker()])]
    grid = report.image_grid(rows, [], scale=3)

    pad = report.PAD
    assert grid.size == (3 * (8 * 3 + pad) + pad, 2 * (8 * 3 + pad) + pad)
    x0 = y0 = pad
    assert grid.getpixel((x0, y0)) == RED and grid.getpixel((x0 + 11, y0 + 23)) == RED
    assert grid.getpixel((x0 + 12, y0)) == BLUE and grid.getpixel((x0 + 23, y0 + 23)) == BLUE
    assert grid.getpixel((x0 + 2 * (24 + pad) + 5, y0 + 24 + pad + 5)) == report.BACKGROUND  # missing image


def test_image_grid_labels_add_a_left_column_and_a_top_band() -> None:
    rows = [("base model", [checker(64)] * 4), ("lora r=8", [checker(64)] * 4)]
    plain = report.image_grid([("", ims) for _, ims in rows], [])
    labelled = report.image_grid(rows, ["seed 0", "seed 1", "seed 2", "seed 3"])
    titled = report.image_grid(rows, ["seed 0", "seed 1", "seed 2", "seed 3"], title="samples")

    assert plain.size == (4 * (128 + report.PAD) + report.PAD, 2 * (128 + report.PAD) + report.PAD)
    assert labelled.width > plain.width and labelled.height > plain.height
    assert titled.width == labelled.width and titled.height > labelled.height
    # the label column holds dark text pixels
    left = labelled.crop((0, 0, labelled.width - plain.width, labelled.height)).convert("L")
    assert left.getextrema()[0] < 100
    with pytest.raises(ValueError):
        report.image_grid(rows, [], scale=0)


def test_markdown_table_exact() -> None:
    rows = [{"variant": "rank 4", "fidelity": 0.81234, "steps": 300},
            {"variant": "a|b", "fidelity": None, "tags": ["x", "y"]}]
    assert report.markdown_table(rows) == (
        "| variant | fidelity | steps | tags |\n"
        "| --- | --- | --- | --- |\n"
        "| rank 4 | 0.812 | 300 |  |\n"
        '| a\\|b |  |  | ["x", "y"] |'
    )
    assert report.markdown_table(rows[:1], ["fidelity", "variant"], floatfmt=".1%") == (
        "| fidelity | variant |\n| --- | --- |\n| 81.2% | rank 4 |")


def test_params_diff_markdown_from_config_diff() -> None:
    diff = config.diff({"train": {"lora": {"rank": 8}, "lr": 0.002}, "captions": {"identifier": "sks"}},
                       {"train": {"lora": {"rank": 32}, "lr": 0.002}, "captions": {"identifier": ""}})
    assert report.params_diff_markdown(diff) == (
        "| param | parent | this run |\n"
        "| --- | --- | --- |\n"
        '| `captions.identifier` | `"sks"` | `""` |\n'
        "| `train.lora.rank` | `8` | `32` |"
    )
    assert report.params_diff_markdown({"new.key": (None, 1)}).endswith("| `new.key` | — | `1` |")
    assert report.params_diff_markdown({}) == "_No differences from the parent._"


def test_plot_curves_reads_jsonl_with_lr_on_a_twin_axis(tmp_path: Path) -> None:
    log = tmp_path / "train.log.jsonl"
    lines = [json.dumps({"step": i, "loss": 1.0 / (i + 1), "lr": 1e-3}) for i in range(50)]
    lines += [json.dumps({"phase": "done"}), '{"step": 50, "lo']  # a non-step record and a torn last line
    log.write_text("\n".join(lines))

    fig = report.plot_curves(log)

    ax, ax2 = fig.axes
    assert len(ax.lines) == 2 and len(ax2.lines) == 1  # raw + smoothed loss; lr
    raw, smoothed = ax.lines
    assert list(raw.get_xdata()) == list(range(50))
    assert smoothed.get_ydata()[0] == pytest.approx(1.0) and smoothed.get_ydata()[-1] > raw.get_ydata()[-1]
    plt.close(fig)

    log.write_text(json.dumps({"step": 0, "loss": 0.5}) + "\n")
    fig = report.plot_curves(log)
    assert len(fig.axes) == 1  # no lr logged: no twin axis
    plt.close(fig)


def test_show_displays_png_and_closes_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    import IPython.display

    shown: list = []
    monkeypatch.setattr(IPython.display, "display", shown.append)
    fig, _ = plt.subplots()
    report.show(fig)
    report.show(checker())

    assert [type(o).__name__ for o in shown] == ["Image", "Image"]
    assert all(o.format == "png" and o.data[:8] == b"\x89PNG\r\n\x1a\n" for o in shown)
    assert not plt.fignum_exists(fig.number)


def test_write_summary_validates_and_dates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBKIT_REPORTS", str(tmp_path / "elsewhere"))
    d = report.reports_dir("exp1")
    assert d == tmp_path / "elsewhere" / "exp1" and d.is_dir()
    assert report.reports_dir("exp1", tmp_path / "r") == tmp_path / "r" / "exp1"

    path = report.write_summary(d, {"hypothesis": "h", "metrics": {"fid": 0.5, "steps": 3, "best": "rank 8"},
                                    "rank_by": "fid", "rows": [{"label": "base", "metrics": None}]})

    saved = json.loads(path.read_text())
    assert saved["metrics"] == {"fid": 0.5, "steps": 3, "best": "rank 8"} and saved["date"][:2] == "20"
    assert saved["rows"] == [{"label": "base", "metrics": None}]  # everything else is kept
    assert [p.name for p in d.iterdir()] == ["summary.json"]  # no temp file left behind
    with pytest.raises(TypeError, match="metrics"):
        report.write_summary(d, {"metrics": [0.5]})


def test_metrics_markdown_orders_known_metrics_and_adds_a_legend() -> None:
    rows = [{"model": "base", "pres": 0.25, "subject_fidelity": 0.0, "backend": "toy-oracle", "n_images": 40},
            {"model": "demo (this run)"}]
    text = report.metrics_markdown(rows)
    assert text.startswith(
        "| model | subject_fidelity | pres |\n"
        "| --- | --- | --- |\n"
        "| base | 0.000 [0.00, 0.10] | 0.250 [0.05, 0.70] |\n"
        "| demo (this run) |  |  |\n\n")
    # 4 seeds (40 images): subject fidelity is a rate over 36 images, PRES over 4. Wilson by
    # hand for 0/36: the upper end is 2·(z²/72)/(1 + z²/36) = 0.096
    z2 = 1.959963984540054 ** 2
    assert round(2 * (z2 / 72) / (1 + z2 / 36), 2) == 0.10
    assert "- `pres`: " in text and "Wilson 95% interval" in text and text.endswith("- backend: toy-oracle")
    assert report.metrics_markdown([]) == "_No metrics._"


def test_summary_and_provenance_markdown() -> None:
    summary = {
        "experiment": "demo", "hash": "f" * 64, "params_file": "params/demo.yaml",
        "run_dir": "runs/demo/ffff",
        "notes": {"hypothesis": "LoRA learns the duo star.", "conclusion": ""},
        "metrics": {"subject_fidelity": 0.9, "best": "demo"}, "rank_by": "subject_fidelity",
        "diff": {"train.lora.rank": [8, 32]}, "vary": {"prior.enabled": [False]},
        "data_fingerprint": "d" * 16,
        "provenance": {"stages": {
            "report": {"git_commit": "fedcba9876543210", "git_dirty": False, "timestamp": "2024-02-02T00:00:00+00:00",
                       "python": "3.12.1", "device": "cpu"},
            "train": {"git_commit": "0123456789abcdef", "git_dirty": True, "python": "3.11.9", "seed": 0,
                      "packages": {"torch": "2.4.0", "peft": None}, "device": "NVIDIA H100",
                      "timestamp": "2024-01-01T00:00:00+00:00", "finished": "2024-01-01T01:00:00+00:00"}}},
        "timings": {"01_data": 1.25, "train": 125.0},
    }
    head = report.summary_markdown(summary)
    assert "**Hypothesis.** LoRA learns the duo star." in head and "**Conclusion.** _not written_" in head
    assert "| **subject_fidelity** | 0.900 |" in head and "| best | demo |" in head
    assert "| `train.lora.rank` | `8` | `32` |" in head and "- `prior.enabled`: `false`" in head

    prov = report.provenance_markdown(summary)
    # the model's provenance is training's, not the report's; the report's own is shown beside it
    assert "| training code | `0123456789ab` (uncommitted changes) |" in prov
    assert "| training started | 2024-01-01T00:00:00+00:00 |" in prov
    assert "| training finished | 2024-01-01T01:00:00+00:00 |" in prov
    assert "| report code | `fedcba987654` |" in prov and "| report made | 2024-02-02T00:00:00+00:00 |" in prov
    assert "| python | 3.11.9 |" in prov and "| device | NVIDIA H100 |" in prov
    assert "| data fingerprint | `dddddddddddddddd` |" in prov
    assert "| packages | torch 2.4.0 |" in prov and "| seed | 0 |" in prov
    assert prov.index("| train | `0123456789ab`") < prov.index("| report | `fedcba987654`")  # stages in order
    assert "| 01_data | 1.2 s |" in prov and "| train | 2 min 5 s |" in prov
    assert "| `" not in report.provenance_markdown({})  # nothing known: no empty code cells
    # a provenance.json from an older dbkit (one record, restamped by every notebook)
    old = report.provenance_markdown({"provenance": {"git_commit": "0123456789abcdef", "timestamp": "t0"}})
    assert "| unknown | `0123456789ab` | t0 |" in old and "training code" not in old


def test_curves_of_missing_logs_and_tag_frequencies_still_draw(tmp_path: Path) -> None:
    for fig in (report.plot_curves(tmp_path / "none.jsonl"), report.plot_steps_curve(tmp_path / "none.jsonl"),
                report.plot_tag_frequencies(None)):
        assert fig.axes[0].texts  # the reason it is empty
        plt.close(fig)
    (tmp_path / "steps.jsonl").write_text(
        "\n".join(json.dumps({"step": s, "subject_fidelity": s / 300, "pres": None})
                  for s in (100, 200, 300)))
    fig = report.plot_steps_curve(tmp_path / "steps.jsonl")
    assert [ln.get_label() for ln in fig.axes[0].lines] == ["subject_fidelity"]
    assert not fig.axes[0].collections  # an older log without n: no band it could justify
    plt.close(fig)
    (tmp_path / "steps.jsonl").write_text(
        "\n".join(json.dumps({"step": s, "subject_fidelity": 0.5, "n": 4}) for s in (100, 200)))
    fig = report.plot_steps_curve(tmp_path / "steps.jsonl")
    assert [ln.get_label() for ln in fig.axes[0].lines] == ["subject_fidelity"]  # n is no curve
    band = fig.axes[0].collections[0].get_paths()[0].vertices[:, 1]
    # 2 of 4 images: Wilson's interval by hand, centre 0.5, half z·sqrt(1/16 + z²/64) / (1 + z²/4)
    z = 1.959963984540054
    half = z * (1 / 16 + z * z / 64) ** 0.5 / (1 + z * z / 4)
    assert min(band) == pytest.approx(0.5 - half) and max(band) == pytest.approx(0.5 + half)
    plt.close(fig)
    fig = report.plot_tag_frequencies({"star": 5, "red": 2, "small": 3}, top=2)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["small", "star"]
    plt.close(fig)


def test_sample_browser_shows_the_last_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import IPython.display

    for step, color in ((100, RED), (200, BLUE)):
        folder = tmp_path / "samples" / f"step_{step:06d}"
        folder.mkdir(parents=True)
        index = {"step": step, "prompts": ["a sks star"], "seeds": [0, 1]}
        (folder / "index.json").write_text(json.dumps(index))
        for seed in (0, 1):
            Image.new("RGB", (8, 8), color).save(folder / f"p0_s{seed}.png")
    shown: list = []
    monkeypatch.setattr(IPython.display, "display", shown.append)

    report.sample_browser(tmp_path, scale=2)

    (box,) = shown
    img = box.children[-1]
    with Image.open(io.BytesIO(img.value)) as im:
        assert im.size == (16, 16) and im.convert("RGB").getpixel((0, 0)) == BLUE
    step_slider = box.children[0].children[0]
    step_slider.value = tmp_path / "samples" / "step_000100"
    with Image.open(io.BytesIO(img.value)) as im:
        assert im.convert("RGB").getpixel((0, 0)) == RED

    shown.clear()
    report.sample_browser(tmp_path / "nothing")
    assert "No preview samples" in shown[0].data

"""A figure without its record is not a figure: every figure README.md, docs/*.md and the toy
base's model card quote must be in a committed evidence record (benchmarks/*.json, a committed
report's summary.json; the card's pretraining figures in the recipe.json `dbkit pretrain-toyworld`
wrote). The rule for what counts as a figure is in dbkit/evidence.py's docstring."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dbkit import evidence

ROOT = Path(__file__).resolve().parent.parent
CARD = ROOT / "dbkit" / "toyworld" / "base" / "README.md"
# the pages whose figures are checked: the README and the manual it links to
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _report(missing: list[evidence.Figure], name: str) -> str:
    return "\n".join(f"{name}:{f.line}: {f.text} is in no committed record (re-measure it with "
                     f"`dbkit bench … --save`, or drop it; see docs/evidence.md)" for f in missing)


@pytest.fixture(scope="module")
def committed() -> dict[str, list[tuple[str, float]]]:
    return evidence.load_records(evidence.committed_records(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_figure_of_the_readme_and_docs_has_a_record(page, committed):
    missing = evidence.unmatched(page.read_text(encoding="utf-8"), committed)
    assert not missing, "\n" + _report(missing, page.relative_to(ROOT).as_posix())


def test_the_readme_links_every_docs_page_and_every_link_resolves():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)(?:#[\w-]*)?\)", readme))
    assert linked == {p.relative_to(ROOT).as_posix() for p in PAGES[1:]}, "README.md's manual and docs/ differ"
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[\w-]*)?\)", page.read_text(encoding="utf-8")):
            assert (page.parent / target).is_file(), f"{page.relative_to(ROOT)}: link to {target} leads nowhere"


def test_every_model_card_figure_has_a_record():
    records = evidence.load_records(sorted((ROOT / "benchmarks").glob("*.json")))
    # the pretraining's seconds and the recipe are what `dbkit pretrain-toyworld` wrote beside the weights
    recipe = json.loads((CARD.parent / "recipe.json").read_text())
    records["recipe.json"] = list(evidence.record_values(recipe))
    missing = evidence.unmatched(CARD.read_text(encoding="utf-8"), records)
    assert not missing, "\n" + _report(missing, str(CARD.relative_to(ROOT)))


def test_an_edited_figure_fails_naming_it_and_its_line():
    records = {"benchmarks/bench-threads-x.json": [("figures.settings[0].steps_per_s[0]", 20.74),
                                                   ("figures.settings[1].throughput_x", 1.65)]}
    text = "intro\n\nalone 20.7 steps/s, two at once 1.65× (`benchmarks/bench-threads-x.json`)\n"
    assert evidence.unmatched(text, records) == []
    edited = text.replace("1.65×", "1.75×")
    [fig] = evidence.unmatched(edited, records)
    assert (fig.text, fig.line) == ("1.75×", 3)
    # and in the real pages: a recorded figure, edited, fails (and nothing else changes)
    records = evidence.load_records(evidence.committed_records(ROOT))
    recorded: list[evidence.Figure] = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        before = {(f.text, f.line) for f in evidence.unmatched(text, records)}
        recorded = [f for f in evidence.figures_in(text) if (f.text, f.line) not in before]
        if recorded:
            break
    assert recorded, "neither README.md nor docs/*.md quotes a recorded figure"
    fig = recorded[0]
    lines = text.split("\n")
    lines[fig.line - 1] = lines[fig.line - 1].replace(fig.text, "987654.321", 1)
    after = {(f.text, f.line) for f in evidence.unmatched("\n".join(lines), records)}
    assert after - before == {("987654.321", fig.line)}


def test_what_counts_as_a_figure():
    text = "\n".join([
        "Signature 0.86, ratio 1.35× and 0.01x, 9.3 min, 20.7 steps/s, 84% and 14 %, 286 s, 47 ms, 1–10 µs.",  # 1
        "Range 0.58–0.75; list 88/97%.",                                                                  # 2
        "Not: 1500 steps, rank 8, 64×64 px, 16×16×4, v2.5, SD1.5, 3.11.7, 2026-11-30, 10:00:00, 2e-3.",  # 3
        "Not: 5531647, p0.png, 90-minute, a 95% interval, `1.5×` (settings in backticks); 80 minutes.",  # 4
        "```yaml",                                                                                       # 5
        "crop_margin: 0.3   # 8% of the frame",                                                          # 6
        "```",                                                                                           # 7
        "| setting | train s | rate |",                                                                  # 8
        "|---|---|---|",                                                                                 # 9
        "| alone | 272 | 0.50 |",                                                                        # 10
    ])
    got = [(f.text, f.value, f.unit, f.line) for f in evidence.figures_in(text)]
    assert got == [
        ("0.86", 0.86, "", 1), ("1.35×", 1.35, "×", 1), ("0.01x", 0.01, "×", 1), ("9.3 min", 9.3, "min", 1),
        ("20.7 steps/s", 20.7, "steps/s", 1), ("84%", 84, "%", 1), ("14 %", 14, "%", 1), ("286 s", 286, "s", 1),
        ("47 ms", 47, "ms", 1), ("1–10 µs", 1, "µs", 1), ("1–10 µs", 10, "µs", 1),
        ("0.58–0.75", 0.58, "", 2), ("0.58–0.75", 0.75, "", 2), ("88/97%", 88, "%", 2), ("88/97%", 97, "%", 2),
        ("80 minutes", 80, "min", 4),
        ("272", 272, "", 10), ("0.50", 0.5, "", 10),
    ]


def test_matching_at_the_quoted_precision_and_unit():
    def ok(text: str, key: str, value: float) -> bool:
        [fig] = evidence.figures_in(text)
        return evidence.matches(fig, key, value)

    assert ok("0.86", "rows[0].metrics.style_rate", 0.8625) and not ok("0.86", "m", 0.8651)
    assert not ok("0.863", "m", 0.8620) and ok("0.863", "m", 0.8634)
    assert ok("84%", "figures.accuracy.pattern", 0.84) and ok("84%", "pct", 84.0) and not ok("84%", "a", 0.846)
    assert ok("9.3 min", "figures.wall_s", 558.0) and not ok("9.3 min", "figures.wall_s", 600.0)
    assert ok("47 ms", "figures.step_s", 0.047) and ok("286 s", "timings.03_train", 286.2)
    # a timing matches only a value named as a time; a rate only a rate
    assert not ok("286 s", "rows[0].metrics.n_images", 286) and not ok("20.7 steps/s", "figures.x", 20.7)
    assert ok("20.7 steps/s", "figures.settings[0].steps_per_s[0]", 20.74)


def test_a_report_is_a_record_of_its_metrics_and_timings_not_its_params():
    summary = {"rows": [{"label": "base", "metrics": {"subject_fidelity": 0.45, "nested": {"x": 0.12}},
                         "params": {"train": {"lr": 0.0004}}}],
               "metrics": {"pres": 0.88}, "timings": {"03_train": 117.8}, "hash": 123456,
               "provenance": {"stages": {"data": {"seed": 7}}}}
    values = dict(evidence.figures_of_record(summary))
    assert values == {"rows[0].metrics.subject_fidelity": 0.45, "rows[0].metrics.nested.x": 0.12,
                      "metrics.pres": 0.88, "timings.03_train": 117.8}


def test_a_paragraph_naming_its_record_is_checked_against_it_alone():
    records = {"benchmarks/a.json": [("figures.x", 0.42)], "reports/e/h/summary.json": [("metrics.y", 0.77)]}
    text = "Measured 0.77 (`benchmarks/a.json`).\n\nElsewhere 0.77.\n\n| r |\n|---|\n| 0.42 |\n"
    assert [(f.text, f.line) for f in evidence.unmatched(text, records)] == [("0.77", 1)]
    named = "Measured (`benchmarks/a.json`):\n\n| r |\n|---|\n| 0.42 |\n| 0.77 |\n"
    assert [(f.text, f.line) for f in evidence.unmatched(named, records)] == [("0.77", 6)]
    report = "In `reports/e`: 0.77 and 0.42.\n\nIn reports/e/abcdef012345 and `reports/index.html`: 0.77.\n"
    assert [(f.text, f.line) for f in evidence.unmatched(report, records)] == [("0.42", 1), ("0.77", 3)]

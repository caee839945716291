"""The written conclusion: references filled in from the run's table, with intervals; bare figures refused."""

from __future__ import annotations

import pytest

from dbkit import conclusions, config, report

# a hand-made ablation.json "rows": base, the main run, two variants
ROWS = [
    {"label": "base", "run_dir": None, "metrics": {"subject_fidelity": 0.0, "prompt_fidelity": 0.7421875,
                                                  "pres": 0.0, "div": 0.3912, "n_images": 80}},
    {"label": "notes-lora-rank (this run)", "metrics": {"subject_fidelity": 0.5, "prompt_fidelity": 0.828125,
                                                        "pres": 0.0, "div": 0.4163, "n_images": 80}},
    {"label": "rank-4", "metrics": {"subject_fidelity": 0.671875, "prompt_fidelity": 0.765625, "div": 0.3301,
                                   "n_images": 80}},
    {"label": "rank-128", "metrics": None},
]


def test_quoted_figures_follow_the_documented_rule() -> None:
    text = ("Measured 2026-11-22 at 127f737 with diffusers 0.42.1, 600 steps, lr 2e-3 and 0.0004, weight 0.3, "
            "84% of seeds: rank 4 reads 0.67 and .83, rank 8 1.00 and 0.668; 1.25 is no fraction; "
            "earlier `0.08 / 0.47` and 0.67 again.")
    assert conclusions.quoted_figures(text) == ["0.67", ".83", "1.00", "0.668"]


def test_references_are_filled_in_from_the_table_with_intervals() -> None:
    text = ("rank 4 reads {subject_fidelity@rank-4}, rank 8 {subject_fidelity@main|ci}; "
            "rank 4 minus the base: {subject_fidelity@rank-4 - base}; DIV {div@base}.")
    # main: 0.5 over 9 x 8 = 72 images (n_images 80 = 10 per seed, 8 seeds). Wilson by hand:
    # centre (0.5 + z²/144) / (1 + z²/72), half z·sqrt(0.25/72 + z²/(4·72²)) / (1 + z²/72)
    z = 1.959963984540054
    centre = (0.5 + z * z / 144) / (1 + z * z / 72)
    half = z * (0.25 / 72 + z * z / (4 * 72 * 72)) ** 0.5 / (1 + z * z / 72)
    assert (round(centre - half, 2), round(centre + half, 2)) == (0.39, 0.61)
    out = conclusions.render(text, ROWS)
    assert out.startswith("rank 4 reads 0.67, rank 8 0.50 [0.39, 0.61]; ")
    assert out.endswith("DIV 0.39.")
    assert "(within noise)" not in out  # 43/72 against 0/72
    assert conclusions.check(text, ROWS) == {"status": "ok", "figures": [r.text for r in conclusions.references(text)],
                                             "missing": [], "message": ""}


def test_a_difference_inside_its_interval_is_called_noise() -> None:
    # masked_loss's case: background leak 7/8 against 6/8
    rows = [{"label": "a", "metrics": {"background_leak": 0.875, "subject_fidelity": 0.5, "n_images": 80}},
            {"label": "b", "metrics": {"background_leak": 0.75, "subject_fidelity": 0.5, "n_images": 80}}]
    out = conclusions.render("{background_leak@a - b}", rows)
    assert out.startswith("+0.12 [") and out.endswith("(within noise)")
    # Newcombe's hybrid interval by hand from the two Wilson intervals
    la, ua = conclusions.intervals.wilson(0.875, 8)
    lb, ub = conclusions.intervals.wilson(0.75, 8)
    low = 0.125 - ((0.875 - la) ** 2 + (ub - 0.75) ** 2) ** 0.5
    high = 0.125 + ((ua - 0.875) ** 2 + (0.75 - lb) ** 2) ** 0.5
    assert out == f"+0.12 [{low:+.2f}, {high:+.2f}] (within noise)"


def test_prior_yaml_case_a_bare_figure_is_stale_and_refused_at_load(tmp_path) -> None:
    # the table says 0.6146; another row's 0.625 used to let "0.62" pass
    rows = [{"label": "base", "metrics": {"background_leak": 0.625}},
            {"label": "prior.enabled=False", "metrics": {"prompt_fidelity": 0.6145833}}]
    check = conclusions.check("without the prior 0.62", rows)
    assert check["status"] == "stale" and check["missing"] == ["0.62"]
    assert conclusions.render("without the prior {prompt_fidelity@prior.enabled=False}", rows) == \
        "without the prior 0.61"
    f = tmp_path / "x.yaml"
    f.write_text(f"extends: {config.BASE_PATH}\nnotes: {{conclusion: 'without the prior 0.62'}}\n")
    with pytest.raises(config.ConfigError, match=r"x\.yaml: 'notes\.conclusion' copies figure\(s\) 0\.62 into"):
        config.load(f, [])
    f.write_text(f"extends: {config.BASE_PATH}\nnotes: {{conclusion: 'without the prior "
                 "{prompt_fidelity@prior.enabled=False}, earlier `0.62`'}\n")
    config.load(f, [])


def test_a_reference_to_a_missing_row_or_metric_is_stale() -> None:
    check = conclusions.check("{subject_fidelity@rank-16} and {clip_i@main}", ROWS)
    assert check["status"] == "stale"
    assert check["missing"] == ["{subject_fidelity@rank-16}", "{clip_i@main}"]
    assert "no row 'rank-16'" in check["message"] and "has no metric 'clip_i'" in check["message"]
    assert conclusions.render("{subject_fidelity@rank-16}", ROWS) == "⚠{subject_fidelity@rank-16}"


def test_params_values_and_backticked_figures_are_ignored() -> None:
    ignore = conclusions.params_figures({"captions.dropout": [0.1, 0.3]}, {"r4": {"train.lora.rank": 4}},
                                        {"train.lr": (0.002, 0.0001)})
    assert ignore == [0.1, 0.3, 4, 0.0001]
    text = "dropout 0.10 gives {subject_fidelity@main}; the older export read `0.08`."
    assert conclusions.check(text, ROWS, ignore)["status"] == "ok"
    assert conclusions.check(text, ROWS)["missing"] == ["0.10"]


def test_empty_and_figureless_conclusions() -> None:
    for text in ("", "   \n", None):
        check = conclusions.check(text, ROWS)
        assert check["status"] == "empty" and check["message"] == "no measured conclusion yet"
    assert conclusions.check("Rank 4 is enough.", ROWS)["status"] == "unchecked"


def test_the_report_fills_references_and_shows_the_flag_above_the_conclusion() -> None:
    text = "rank 4 reads 0.66."
    summary = {"experiment": "x", "notes": {"hypothesis": "h", "conclusion": text}, "rows": ROWS,
               "conclusion_check": conclusions.check(text, ROWS)}
    md = report.conclusion_markdown(summary)
    assert md.startswith("> ⚠ **conclusion may be stale: 0.66 copied in bare")
    assert md.endswith("**Conclusion.** rank 4 reads 0.66.")
    assert md in report.summary_markdown(summary)
    text = "{subject_fidelity@main}"
    ok = {"notes": {"conclusion": text}, "rows": ROWS, "conclusion_check": conclusions.check(text, ROWS)}
    assert report.conclusion_markdown(ok) == "**Conclusion.** 0.50"


def test_first_sentence_and_verdict() -> None:
    assert conclusions.first_sentence("Measured 2026-11-22: rank 4 reads 0.67. It differs, e.g. here.") == \
        "Measured 2026-11-22: rank 4 reads 0.67."
    assert conclusions.first_sentence("No full stop") == "No full stop"
    assert conclusions.verdict({"conclusion": "So rank 128 does not look best — it differs from the notes."}) == \
        "differs"
    assert conclusions.verdict({"conclusion": "This agrees with the notes."}) == "agrees"
    assert conclusions.verdict({"conclusion": "Rank 4 works.", "verdict": "partly"}) == "partly"
    assert conclusions.verdict({"conclusion": "Rank 4 works."}) == ""


def test_notes_verdict_is_validated(tmp_path) -> None:
    f = tmp_path / "x.yaml"
    f.write_text(f"extends: {config.BASE_PATH}\nnotes: {{verdict: agreez}}\n", encoding="utf-8")
    with pytest.raises(config.ConfigError, match=r"'notes\.verdict' must be one of agrees, differs, partly"):
        config.load(f, [])
    f.write_text(f"extends: {config.BASE_PATH}\nnotes: {{verdict: differs}}\n", encoding="utf-8")
    assert config.load(f, []).params["notes"]["verdict"] == "differs"


def test_saved_run_params_with_the_prose_of_their_day_still_load(tmp_path) -> None:
    """A run folder's params.yaml keeps the conclusion as it read then (bare figures included):
    dbkit evaluate/checkpoints and merge sources read it, they do not publish it."""
    f = tmp_path / "params.yaml"
    f.write_text(f"extends: {config.BASE_PATH}\nnotes: {{conclusion: 'rank 4 reads 0.67'}}\n")
    with pytest.raises(config.ConfigError, match="copies figure"):
        config.load(f)
    assert config.load(f, check_prose=False).params["notes"]["conclusion"] == "rank 4 reads 0.67"


def test_edge_cases_of_references_and_bare_figures() -> None:
    # the table cell copied whole is as bare as its rounding; a learning rate is no figure
    assert conclusions.bare_figures("prompt fidelity 0.6146 at lr 0.0004") == ["0.6146"]
    rows = [{"label": "merge: weighted (subject + style prompts)", "metrics": {"subject_fidelity": 0.45}},
            {"label": "a - b", "metrics": {"subject_fidelity": 0.25}},
            {"label": "a", "metrics": {"subject_fidelity": 0.5}}]
    # a reference wrapped across lines of a YAML block renders as check() reads it
    wrapped = "{subject_fidelity@merge: weighted (subject +\n  style prompts)}"
    assert conclusions.render(wrapped, rows) == "0.45" and conclusions.check(wrapped, rows)["status"] == "ok"
    assert conclusions.render("{subject_fidelity@a - b}", rows) == "0.25"  # a label holding " - "
    check = conclusions.check("{subject_fidelity@a - merge: weighted (subject + style prompts) - a}", rows)
    assert check["status"] == "stale" and "two rows, not 3" in check["message"]

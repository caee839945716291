"""The written conclusion checked against the run's metrics table (dbkit.conclusions)."""

from __future__ import annotations

import pytest

from dbkit import conclusions, config, report

# a hand-made ablation.json "rows": base, the main run, two variants
ROWS = [
    {"label": "base", "run_dir": None, "metrics": {"subject_fidelity": 0.0, "prompt_fidelity": 0.7421875,
                                                  "pres": 0.0, "div": 0.3912}},
    {"label": "notes-lora-rank (this run)", "metrics": {"subject_fidelity": 0.5, "prompt_fidelity": 0.828125,
                                                        "pres": 0.0, "div": 0.4163, "n_images": 8}},
    {"label": "rank-4", "metrics": {"subject_fidelity": 0.671875, "prompt_fidelity": 0.765625, "div": 0.3301}},
    {"label": "rank-128", "metrics": None},
]


def test_quoted_figures_follow_the_documented_rule() -> None:
    text = ("Measured 2026-11-22 at 127f737 with diffusers 0.42.1, 600 steps, lr 2e-3 and 0.0004, weight 0.3, "
            "84% of seeds: rank 4 reads 0.67 and .83, rank 8 1.00 and 0.668; 1.25 is no fraction; "
            "earlier `0.08 / 0.47` and 0.67 again.")
    assert conclusions.quoted_figures(text) == ["0.67", ".83", "1.00", "0.668"]


def test_a_conclusion_matching_the_table_is_not_flagged() -> None:
    text = ("rank 4 subject fidelity 0.67, prompt fidelity 0.77, DIV 0.33; rank 8 (the parent) 0.50, 0.83, 0.42 "
            "(base: 0.00, 0.74, 0.39). With lr 2e-3 and 600 steps.")
    check = conclusions.check(text, ROWS)
    assert check == {"status": "ok", "figures": ["0.67", "0.77", "0.33", "0.50", "0.83", "0.42", "0.00", "0.74",
                                                 "0.39"], "missing": [], "message": ""}


def test_a_mismatching_conclusion_lists_exactly_the_missing_figures() -> None:
    # 0.66 is 0.671875 rounded wrongly; 0.91 and 0.12 appear nowhere; 0.828 is the prompt fidelity to 3 places
    text = "rank 4 reads 0.66 and 0.91; rank 8 reads 0.50 and 0.828; rank 128 collapses to 0.12."
    check = conclusions.check(text, ROWS)
    assert check["status"] == "stale"
    assert check["missing"] == ["0.66", "0.91", "0.12"]
    assert check["message"] == "conclusion may be stale: 0.66, 0.91, 0.12 not in this run's table"


def test_rounding_at_the_quoted_precision_accepts_either_side_of_a_half() -> None:
    rows = [{"metrics": {"m": 0.625}}]
    assert conclusions.check("0.62 or 0.63", rows)["status"] == "ok"
    assert conclusions.check("0.61", rows)["missing"] == ["0.61"]
    assert conclusions.check("0.625", rows)["status"] == "ok"
    assert conclusions.check("0.626", rows)["missing"] == ["0.626"]


def test_params_values_and_backticked_figures_are_ignored() -> None:
    ignore = conclusions.params_figures({"captions.dropout": [0.1, 0.3]}, {"r4": {"train.lora.rank": 4}},
                                        {"train.lr": (0.002, 0.0001)})
    assert ignore == [0.1, 0.3, 4, 0.0001]
    text = "dropout 0.10 gives 0.50; the older export read `0.08`."
    assert conclusions.check(text, ROWS, ignore) == {"status": "ok", "figures": ["0.50"], "missing": [],
                                                    "message": ""}
    assert conclusions.check(text, ROWS)["missing"] == ["0.10"]


def test_empty_and_figureless_conclusions() -> None:
    for text in ("", "   \n", None):
        check = conclusions.check(text, ROWS)
        assert check["status"] == "empty" and check["message"] == "no measured conclusion yet"
    assert conclusions.check("Rank 4 is enough.", ROWS)["status"] == "unchecked"


def test_the_report_shows_the_flag_above_the_conclusion() -> None:
    text = "rank 4 reads 0.66."
    summary = {"experiment": "x", "notes": {"hypothesis": "h", "conclusion": text},
               "conclusion_check": conclusions.check(text, ROWS)}
    md = report.conclusion_markdown(summary)
    assert md == "> ⚠ **conclusion may be stale: 0.66 not in this run's table**\n\n**Conclusion.** rank 4 reads 0.66."
    assert md in report.summary_markdown(summary)
    ok = {"notes": {"conclusion": "0.50"}, "conclusion_check": conclusions.check("0.50", ROWS)}
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

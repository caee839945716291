"""Every committed research-notes conclusion cites its committed table, and every citation
resolves: the acceptance of "Every figure has its evidence" for conclusions.

A notes file loads only when its conclusion copies no figure bare (config refuses it), and
each ``{metric@row}`` must name a row and metric of the experiment's committed report
(``reports/<experiment>/<version>/summary.json``, the newest one).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dbkit import conclusions, config

ROOT = Path(__file__).resolve().parent.parent
NOTES = sorted(p for p in (ROOT / "params" / "notes").glob("*.yaml") if p.name != "parent.yaml")


def committed_summary(exp: config.Experiment) -> dict | None:
    """The committed summary of these params' own report version; else (a file edited or
    re-pinned since it was last published) the newest one, the table a reader sees beside it."""
    own = ROOT / "reports" / exp.name / exp.version[:12] / "summary.json"
    if own.is_file():
        return json.loads(own.read_text())
    found = [json.loads(p.read_text()) for p in (ROOT / "reports" / exp.name).glob("*/summary.json")]
    return max(found, key=lambda s: str(s.get("date"))) if found else None


@pytest.mark.parametrize("path", NOTES, ids=[p.stem for p in NOTES])
def test_a_committed_conclusion_cites_its_committed_table(path: Path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    exp = config.load(path.relative_to(ROOT))  # refuses a figure copied in bare
    text = exp.params["notes"].get("conclusion", "")
    summary = committed_summary(exp)
    if summary is None:
        pytest.fail(f"{exp.name}: no committed report under reports/{exp.name}/")
    check = conclusions.check(text, summary["rows"])
    assert check["status"] in ("ok", "unchecked"), check["message"]
    assert conclusions.references(text), f"{path.name}: the conclusion cites no figure of its table"

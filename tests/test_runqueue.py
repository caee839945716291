"""`dbkit run a.yaml b.yaml …`: in order, published ones skipped, failures do not stop the queue."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dbkit import cli, config, runner, runqueue


def write_params(root: Path, name: str, seed: int) -> str:
    path = root / "params" / "q" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"extends: ../base.yaml\nexperiment: {name}\nseed: {seed}\n")
    return str(path.relative_to(root))


def publish(root: Path, params: str, notebooks=runner.NOTEBOOKS, status: str = "ok") -> None:
    exp = config.load(params, [])
    version = root / "reports" / exp.name / exp.version[:12]
    version.mkdir(parents=True)
    (version / runner.VERSION_FILE).write_text(json.dumps({"status": status, "notebooks": list(notebooks)}))


@pytest.fixture()
def project(in_tmp: Path) -> tuple[Path, list[str]]:
    (in_tmp / "params").unlink()  # a real params/ folder: the queue's files live in it
    (in_tmp / "params").mkdir()
    (in_tmp / "params" / "base.yaml").symlink_to(Path(__file__).resolve().parent.parent / "params" / "base.yaml")
    files = [write_params(in_tmp, n, s) for n, s in [("done", 1), ("boom", 2), ("partial", 3), ("fresh", 4)]]
    publish(in_tmp, files[0])
    publish(in_tmp, files[2], notebooks=runner.NOTEBOOKS[:3])  # `--only` left it incomplete
    return in_tmp, files


def test_queue_skips_published_goes_on_after_a_failure_and_summarises(project, capsys) -> None:
    root, files = project
    calls = []

    def fake_run(params, overrides, *, reports_root, **kw):
        calls.append(params)
        if "boom" in params:
            raise runner.RunError("boom.yaml: the disk is full")
        exp = config.load(params, overrides)
        return Path(reports_root) / exp.name / exp.version[:12]

    outcomes = runqueue.run_queue(files, [], reports_root=Path("reports"), run_one=fake_run)
    assert calls == [files[1], files[2], files[3]]  # in order; the published one not run again
    assert [(o.experiment, o.status) for o in outcomes] == [
        ("done", "skipped"), ("boom", "failed"), ("partial", "ran"), ("fresh", "ran")]
    assert "the disk is full" in outcomes[1].message
    table = runqueue.summary(outcomes)
    assert table.splitlines()[-1] == "2 ran, 1 skipped, 1 failed"
    assert "boom.yaml: the disk is full" in table and "reports/done/" in table


def test_cli_runs_several_params_files_as_a_queue(project, monkeypatch, capsys) -> None:
    root, files = project
    seen = []

    def fake_run(params, overrides, *, reports_root, **kw):
        seen.append((params, overrides))
        if "boom" in str(params):
            raise ValueError("cell 3 failed")
        return Path(reports_root) / "x" / "y"

    monkeypatch.setattr(runner, "run_experiment", fake_run)
    monkeypatch.chdir(root / "params")  # typed from a subfolder: the paths are still found
    code = cli.main(["run", *(str(Path("..") / f) for f in files)])
    assert code == 1  # one failed
    assert [p for p, _ in seen] == files[1:] and all(o == [] for _, o in seen)
    out = capsys.readouterr().out
    assert "skipped" in out and "failed" in out and out.strip().endswith("2 ran, 1 skipped, 1 failed")

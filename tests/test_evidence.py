"""Evidence records: `dbkit bench … --save` writes every figure it printed, with the command,
commit, hardware and load that produced them, and never overwrites a record."""

from __future__ import annotations

import json
import os

import pytest

from dbkit import bench, cli, evidence


@pytest.fixture()
def bench_dir(tmp_path, monkeypatch):
    folder = tmp_path / "benchmarks"
    monkeypatch.setattr(evidence, "BENCHMARKS", folder)
    return folder


def test_record_holds_the_command_its_context_and_every_figure():
    rec = evidence.record("dbkit bench load", {"load_s": 0.06, "nested": {"x": [1, 2]}},
                          load_avg_start=[2.5, 1.0, 0.5], note="hand-made")
    assert rec["command"] == "dbkit bench load"
    assert rec["figures"] == {"load_s": 0.06, "nested": {"x": [1, 2]}}
    assert rec["load_avg_start"] == [2.5, 1.0, 0.5] and rec["note"] == "hand-made"
    assert len(rec["git_commit"]) == 40 and isinstance(rec["git_dirty"], bool)
    assert rec["date"].endswith("+00:00")  # UTC
    assert {"cpu_model", "cores", "cpu_capability", "threads", "gpu"} <= set(rec["hardware"])
    assert rec["packages"]["torch"] and "numpy" in rec["packages"]


def test_save_is_atomic_and_never_overwrites(tmp_path):
    rec = evidence.record("dbkit bench load", {"load_s": 1.0})
    first = evidence.save(rec, "bench-load", tmp_path)
    assert first.name == f"bench-load-{rec['date'][:10].replace('-', '')}-{rec['git_commit'][:7]}.json"
    before = first.read_bytes()
    second = evidence.save(dict(rec, figures={"load_s": 2.0}), "bench-load", tmp_path)
    assert second != first and second.name.endswith("-2.json")
    assert first.read_bytes() == before  # the first record is untouched
    assert json.loads(second.read_text())["figures"] == {"load_s": 2.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, second.name])  # no temp files left


def test_bench_load_save_records_what_it_printed(tiny_base, bench_dir, capsys):
    # the real --save path on a fast configuration: the tiny random base, one thread (two
    # OpenMP threads on a shared 2-core machine stall each other, see docs/benchmarks.md)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    argv = ["bench", "load", "--model", str(tiny_base), "--save"]
    try:
        assert cli.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    printed = json.loads(out.out)
    [path] = bench_dir.glob("*.json")
    assert f"record: {path}" in out.err
    rec = json.loads(path.read_text())
    assert rec["figures"] == printed
    assert rec["command"] == f"dbkit bench load --model {tiny_base} --save"
    assert rec["load_avg_start"] is None or len(rec["load_avg_start"]) == 3


def _fake(result: dict):
    def run(*args, **kwargs):
        return json.loads(json.dumps(result))
    return run


@pytest.mark.parametrize("what,extra,target", [
    ("threads", [], "dbkit.bench_threads.bench_threads"),
    ("trainer", ["--diffusers-script", "x.py"], "dbkit.bench_trainer.bench_trainer"),
    ("dreambooth", ["-p", "prior.enabled=false"], "dbkit.bench.bench_dreambooth"),
    ("base", [], "dbkit.bench.bench_base"),
])
def test_every_bench_saves_its_printed_figures(what, extra, target, bench_dir, capsys, monkeypatch):
    # hand-made measurements: the record must hold exactly what the command printed
    result = {"steps": 300, "settings": [{"setting": "alone, 2 threads", "steps_per_s": [20.7],
                                          "throughput_x": 1.0, "identical_to_alone": [True]}]}
    monkeypatch.setattr(target, _fake(result))
    assert cli.main(["bench", what, *extra, "--save"]) == 0
    printed = json.loads(capsys.readouterr().out)
    [path] = bench_dir.glob(f"bench-{what}-*.json")
    rec = json.loads(path.read_text())
    assert rec["figures"] == printed == result
    assert rec["command"] == " ".join(["dbkit", "bench", what, *extra, "--save"])
    # the same command again: a second record beside the first, which stays as it was
    before = path.read_bytes()
    assert cli.main(["bench", what, *extra, "--save"]) == 0
    assert len(list(bench_dir.glob(f"bench-{what}-*.json"))) == 2 and path.read_bytes() == before


def test_without_save_nothing_is_written(bench_dir, capsys, monkeypatch):
    monkeypatch.setattr("dbkit.bench_threads.bench_threads", _fake({"steps": 1}))
    assert cli.main(["bench", "threads"]) == 0
    assert not bench_dir.exists()


def test_base_card_names_its_record(bench_dir, capsys, monkeypatch):
    result = {"accuracy": {"background": 1.0}, "load": {"load_s": 0.1}}
    monkeypatch.setattr(bench, "bench_base", _fake(result))
    cards = []
    monkeypatch.setattr(bench, "write_card", lambda model, res, record=None, hardware=None:
                        cards.append((model, res, record, hardware)))
    assert cli.main(["bench", "base", "--card", "--save"]) == 0
    [path] = bench_dir.glob("bench-base-*.json")
    [(model, res, record, hardware)] = cards
    assert model == "toyworld" and res == result
    assert record == evidence.relative_name(path) and hardware


def test_model_card_quotes_its_record_and_marks_targets_as_settings(tmp_path):
    from dbkit.toyworld import base_model_path, recipe

    src = base_model_path()
    (tmp_path / "recipe.json").write_text((src / "recipe.json").read_text())
    for part in ("unet", "text_encoder"):
        os.symlink(src / part, tmp_path / part)
    acc = {"background": 1.0, "colour": 1.0, "size": 0.99, "shape": 0.92, "pattern": 0.84, "position": 0.31,
           "n": 100, "steps": 25, "guidance": 4.0}
    result = {"accuracy": acc, "subject_signature_rate": {"eyed_heart": 0.0}, "vae_ceiling": {"eyed_heart": 1.0}}
    load = {"load_s": 0.06, "sample_4_images_25_steps_s": 0.67, "weights_mb": 9.59}
    card = recipe.model_card(tmp_path, result, load, record="benchmarks/bench-base-x.json", hardware="a CPU")
    assert "Record: `benchmarks/bench-base-x.json`, measured on a CPU." in card
    targets = [f for f in evidence.figures_in(card) if f.value in (90, 80)]
    assert not targets, targets  # `90%` is a target, not a measurement

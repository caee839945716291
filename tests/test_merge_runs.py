"""Merges in the workbench: sources trained, merged files written, scored through the loader."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dbkit import config, export, merge, merge_runs, methods, runs, workflow

TINY = ["train.steps=2", "train.sample_every=0", "train.save_every=0", "metrics.num_per_prompt=1",
        "sample.steps=2", "sample.seeds=[0]", "prior.enabled=false", "train.batch_size=1"]


def test_merge_rows_files_and_identity(in_tmp: Path) -> None:
    style = in_tmp / "style.yaml"
    style.write_text("extends: params/notes/style.yaml\nexperiment: tiny-style\ntrain:\n  steps: 2\n  batch_size: 1\n"
                     "  sample_every: 0\n  save_every: 0\nmetrics:\n  num_per_prompt: 1\nsample:\n  steps: 2\n"
                     "  seeds: [0]\nablation:\n  variants: {}\n")
    exp = config.load("params/notes/merge.yaml", [*TINY, f"merge.loras=[this, {style}]",
                                                  "merge.methods=[weighted, cat, ties, ziplora]",
                                                  "merge.weights=[0.8, 1.2]", "merge.weight_grid=[1.0]",
                                                  "merge.ziplora_steps=2"])
    rd = runs.run_dir(exp)
    workflow.train_variant(exp, progress=False)  # the main run, as 01–03 would make it
    result = merge_runs.extend_ablation(exp, rd, workflow.run_ablations(exp, rd, progress=False), progress=False)
    assert json.loads((rd / "ablation.json").read_text())["rows"] == result["rows"]  # what the report reads
    labels = [r["label"] for r in result["rows"]]
    assert labels[:2] == ["base", f"{exp.name} (this run)"]
    assert labels[2] == "tiny-style (its own prompts)" and "style_rate" in result["rows"][2]["metrics"]
    merged_rows = [r for r in result["rows"] if "subject + style" in r["label"]]
    assert [r["label"].split(" (")[0] for r in merged_rows] == [
        f"{exp.name} alone", "tiny-style alone", "merge: weighted", "merge: cat", "merge: ties", "merge: ziplora"]
    assert all({"subject_fidelity", "style_rate", "both_rate"} <= set(r["metrics"]) for r in merged_rows)
    assert all((rd / g["file"]).is_file() for g in result["grids"])
    folder = Path(result["merge"]["folder"])
    meta = json.loads((folder / "cat" / "training_metadata.json").read_text())
    assert meta["merge"]["method"] == "cat" and meta["merge"]["weights"] == [0.8, 1.2]
    assert [s["label"] for s in meta["merge"]["sources"]] == [exp.name, "tiny-style"]
    assert (folder / "cat" / export.KOHYA_FILE).is_file()

    # the saved cat file, loaded by diffusers, is the runtime weighted sum of the two sources
    p = exp.params
    sources = merge_runs.resolve_sources(exp, rd, progress=False)
    live = merge_runs.runtime_pipeline(p, sources, [0.8, 1.2])
    path, family = workflow.base_of(p)
    saved = methods.load_trained(folder / "cat", path, family)
    torch.manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    ids = saved.tokenizer(["a sks heart, ohwx style"], padding="max_length", return_tensors="pt",
                          max_length=saved.tokenizer.model_max_length).input_ids
    with torch.no_grad():
        outs = [pipe.unet(x, t, pipe.text_encoder(ids)[0]).sample for pipe in (live, saved)]
    assert torch.allclose(*outs, atol=1e-4)
    # … and the cached result is reused (no retraining, same rows)
    again = merge_runs.run_merges(exp, rd, progress=False)
    assert again["rows"] == result["merge"]["rows"]
    assert merge.read_lora(folder / "cat").rank() == 16

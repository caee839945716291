"""`dbkit checkpoints RUN`: every kept checkpoint sampled through its exported files, checked
against plain diffusers code loading those files, and checkpoint metrics against an
independent run stopped at the checkpoint's step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dbkit import checkpoints, cli, report, workflow

ROOT = Path(__file__).resolve().parent.parent
TINY = ("train: {steps: 4, batch_size: 2, save_every: 2, sample_every: 0, lr: 0.01, text_encoder_lr: 0.01}\n"
        "prior: {enabled: false}\nsample: {steps: 2, seeds: [0, 1]}\nmetrics: {num_per_prompt: 1}\n")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_base: Path):
    """A 4-step run keeping a checkpoint at step 2, the same params stopped at step 2, and the
    same params evaluated on metrics.seed 200."""
    tmp = tmp_path_factory.mktemp("ckpt")
    (tmp / "params").mkdir()
    (tmp / "params" / "base.yaml").symlink_to(ROOT / "params" / "base.yaml")
    (tmp / "params" / "exp.yaml").write_text(f"extends: base.yaml\nexperiment: ck\nbase: {{model: {tiny_base}}}\n"
                                             + TINY)
    out = []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mp.setenv("DBKIT_CACHE", str(tmp / ".cache"))
        for extra in ([], ["train.steps=2", "experiment=ck2"], ["metrics.seed=200", "experiment=ck3"]):
            exp, rd = workflow.open_experiment(str(tmp / "params" / "exp.yaml"), extra)
            workflow.prepare_data(exp, rd)
            workflow.prepare_captions(exp, rd)
            workflow.run_training(exp, rd, progress=False)
            out.append((exp, tmp / rd))
    return out, tmp


def plain_diffusers(base: Path, lora_dir: Path, prompt: str, seeds: list[int]) -> list[Image.Image]:
    """What a user's own code draws from an exported LoRA at the params' sample settings."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(lora_dir), weight_name="pytorch_lora_weights.safetensors")
    pipe.set_progress_bar_config(disable=True)
    return [Image.fromarray(np.round(pipe(prompt, num_inference_steps=2, guidance_scale=4.0, height=64, width=64,
                                          output_type="np", generator=torch.Generator().manual_seed(s)
                                          ).images[0] * 255).astype(np.uint8)) for s in seeds]


def _close(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def test_grid_rows_are_the_checkpoints_files_as_diffusers_loads_them(trained, tiny_base: Path, tmp_path: Path,
                                                                     monkeypatch) -> None:
    (exp, rd), _, _ = trained[0]
    rows = checkpoints.checkpoint_rows(exp, rd, "a {subject}", [0, 1])
    assert [label for label, _ in rows] == ["step 2", "final"]
    refs = [("step 2", plain_diffusers(tiny_base, rd / "checkpoints" / "checkpoint-000002" / "output",
                                       "a sks star", [0, 1])),
            ("final", plain_diffusers(tiny_base, rd / "output", "a sks star", [0, 1]))]
    for (_, ims), (_, ref) in zip(rows, refs):
        assert all(_close(im, r) for im, r in zip(ims, ref))
    assert not _close(rows[0][1][0], rows[1][1][0])  # step 2 and step 4 are different models

    out = tmp_path / "grid.png"
    monkeypatch.chdir(tmp_path)  # the command finds the project root from the run folder
    assert cli.main(["checkpoints", str(rd), "--prompt", "a {subject}", "--seeds", "0", "1", "--out", str(out)]) == 0
    expected = report.image_grid(refs, ["seed 0", "seed 1"], title="a {subject}", scale=2)
    assert _close(report.open_image(out), expected)


def test_checkpoint_metrics_equal_a_run_stopped_at_that_step(trained, monkeypatch) -> None:
    (exp, rd), (exp2, rd2), _ = trained[0]
    monkeypatch.chdir(trained[1])
    got = checkpoints.evaluate_checkpoints(exp, rd)
    reference = workflow.evaluate_run(exp2, rd2)
    assert [r["step"] for r in got] == [2]
    assert {k: v for k, v in got[0].items() if k != "step"} == reference
    lines = (rd / checkpoints.CHECKPOINT_METRICS).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2]

    def fail(*_a, **_k):
        raise AssertionError("measured again")

    monkeypatch.setattr(workflow, "evaluate_model", fail)
    assert checkpoints.evaluate_checkpoints(exp, rd) == got  # cached by step


def test_evaluate_on_other_seeds_equals_a_run_whose_params_name_those_seeds(trained, monkeypatch, capsys) -> None:
    (exp, rd), _, (exp3, rd3) = trained[0]
    monkeypatch.chdir(trained[1])
    reference = workflow.evaluate_run(exp3, rd3)  # trained and evaluated with metrics.seed 200 in its params
    own = workflow.evaluate_run(exp, rd)
    assert reference != own  # the seed changes the figures, so the comparison below can fail
    assert cli.main(["evaluate", str(rd), "--seed", "200", "100"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == [{"seed": 200, **reference}, {"seed": 100, **own}]


def test_evaluate_refuses_a_run_without_final_output_rather_than_measure_the_base(trained, tmp_path: Path,
                                                                                  monkeypatch, capsys) -> None:
    (_, rd), _, _ = trained[0]
    monkeypatch.chdir(tmp_path)  # the command moves to the run's project root; this restores the cwd
    unfinished = tmp_path / "runs" / "ck" / rd.name
    unfinished.mkdir(parents=True)
    (unfinished / "params.yaml").write_bytes((rd / "params.yaml").read_bytes())  # checkpoints at most, no output/
    assert cli.main(["evaluate", str(unfinished), "--seed", "200"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"{unfinished}: no final output (training has not finished)" in captured.err


def test_a_folder_that_is_no_run_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    assert cli.main(["checkpoints", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path}: not a run folder (no params.yaml): pass "
                                               "runs/<experiment>/<hash>")

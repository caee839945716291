"""The toy base's pretraining recipe, run at a tiny size: it is seeded end to end, saves a
pipeline diffusers loads offline, and `--start-from` continues only a matching phase-2 model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dbkit.toyworld import recipe

TINY = {"vae_steps": 2, "vae_batch": 2, "n_scenes": 8, "unet_steps": 2, "unet_batch": 2, "warmup": 1,
        "decoder_steps": 1, "decoder_batch": 2, "continue_steps": 2, "continue_scenes": 8, "continue_warmup": 1}


def _unet(path: Path) -> dict[str, torch.Tensor]:
    return load_file(next((path / "unet").glob("*.safetensors")))


@pytest.fixture(scope="module")
def phase2(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pt") / "base"
    recipe.pretrain(out, {**TINY, "continue_steps": 0}, log=lambda d: None)
    return out


def test_recipe_is_seeded_and_saves_a_loadable_pipeline(phase2: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    again = tmp_path / "base"
    recipe.pretrain(again, {**TINY, "continue_steps": 0}, log=lambda d: None)
    a, b = _unet(phase2), _unet(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((phase2 / "recipe.json").read_text())
    assert info["unet_steps"] == 2 and "continue_seconds" not in info
    pipe = StableDiffusionPipeline.from_pretrained(phase2, local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_start_from_runs_only_phase_3(phase2: Path, tmp_path: Path) -> None:
    logged: list[dict] = []
    out = tmp_path / "more"
    info = recipe.pretrain(out, TINY, log=logged.append, start_from=phase2)
    phases = {d["phase"] for d in logged}
    assert "continue" in phases and not phases & {"vae", "decoder", "unet"}
    assert info["continue_steps"] == 2 and info["continue_seconds"] >= 0
    before, after = _unet(phase2), _unet(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # the VAE is phase 1's, untouched
    vae = next((phase2 / "vae").glob("*.safetensors")).name
    assert load_file(phase2 / "vae" / vae).keys() == load_file(out / "vae" / vae).keys()


def test_start_from_refuses_a_model_of_another_recipe(phase2: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"recipe\.json: phase 1–2 entries differ.*unet_steps"):
        recipe.pretrain(tmp_path / "x", {**TINY, "unet_steps": 3}, log=lambda d: None, start_from=phase2)

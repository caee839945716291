"""Real-metric backends on tiny randomly initialised CLIP / ViT / DINOv2 folders (offline, seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dbkit import metric_backends as mb
from dbkit.toyworld.tokenizer import save_tokenizer

transformers = pytest.importorskip("transformers")


def _save_tiny_clip(path: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    save_tokenizer(path)
    tok = CLIPTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=32, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _save_tiny_vit(path: Path) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(1)
    cfg = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32,
                    patch_size=8)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(path)
    return path


def _save_tiny_dinov2(path: Path) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(2)
    cfg = Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                       patch_size=8, mlp_ratio=2)
    Dinov2Model(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight a busy machine's other jobs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("metric_models")
    return {"clip": _save_tiny_clip(root / "tiny-clip"), "vit": _save_tiny_vit(root / "tiny-dino"),
            "dinov2": _save_tiny_dinov2(root / "tiny-dinov2")}


def _params(clip: Path | str, dino: Path | str = "", lpips: Path | str = "") -> dict:
    return {"metrics": {"backend": "clip", "num_per_prompt": 2, "clip_model": str(clip), "dino_model": str(dino),
                        "lpips_model": str(lpips)}}


def _image(seed: int, size: tuple[int, int] = (40, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# ----------------------------------------------------------------------------- prompts


def test_prompt_lists_match_the_paper_counts() -> None:
    assert len(mb.RECONTEXT_PROMPTS) == 20 and len(mb.ACCESSORY_PROMPTS) == 10 and len(mb.PROPERTY_PROMPTS) == 5
    objects = mb.dreambooth_prompts("sks backpack", live=False)
    live = mb.dreambooth_prompts("sks dog", live=True)
    assert len(objects) == len(live) == 25
    assert len(set(objects)) == len(set(live)) == 25
    assert all("sks backpack" in t for t in objects) and all("sks dog" in t for t in live)
    assert objects[:20] == [t.format("sks backpack") for t in mb.RECONTEXT_PROMPTS]
    assert live[10:20] == [t.format("sks dog") for t in mb.ACCESSORY_PROMPTS]
    assert objects[20:] == [t.format("sks backpack") for t in mb.PROPERTY_PROMPTS] and live[20:] == [
        t.format("sks dog") for t in mb.PROPERTY_PROMPTS]
    assert live[:10] == [t.format("sks dog") for t in mb.RECONTEXT_PROMPTS[:10]]
    assert "a sks dog wearing a santa hat" in live and "a sks dog wearing a santa hat" not in objects
    assert mb.is_live("dog") and mb.is_live("cats") and not mb.is_live("stuffed animal") and not mb.is_live("glasses")
    assert set(mb.PAPER_SD) == {"dino", "clip_i", "clip_t"}


# ----------------------------------------------------------------------------- early errors


def test_missing_clip_path_fails_early_naming_the_key(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-clip"
    with pytest.raises(mb.BackendError) as e:
        mb.check_backends(_params(missing))
    msg = str(e.value)
    assert "metrics.clip_model" in msg and str(missing) in msg and "huggingface-cli download" in msg
    with pytest.raises(mb.BackendError, match="metrics.clip_model.*empty"):
        mb.check_backends(_params(""))
    mb.check_backends({"metrics": {"backend": "oracle", "clip_model": ""}})  # oracle needs no model


def test_unreadable_folders_fail_with_the_key(tmp_path: Path, models: dict[str, Path]) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(mb.BackendError, match="metrics.clip_model"):
        mb.check_backends(_params(broken))
    with pytest.raises(mb.BackendError, match="metrics.dino_model.*not a DINO"):
        mb.check_backends(_params(models["clip"], dino=models["clip"]))
    with pytest.raises(mb.BackendError, match="metrics.lpips_model"):
        mb.check_backends(_params(models["clip"], lpips=tmp_path / "none.safetensors"))


# ----------------------------------------------------------------------------- metrics


def test_loads_offline_and_identical_images_score_one(models: dict[str, Path]) -> None:
    b = mb.load_backends(_params(models["clip"], models["vit"]))
    assert b.clip.name == "clip:tiny-clip" and b.dino is not None and b.dino.name == "dino:tiny-dino"
    im = _image(0)
    for backbone in (b.clip, b.dino):
        same = mb.image_similarity(backbone, [im] * 3, [im.copy(), im.copy()])
        assert same["value"] == pytest.approx(1.0, abs=1e-5) and same["backend"] == backbone.name
        other = mb.image_similarity(backbone, [_image(1, (32, 32))], [im])
        assert other["value"] < 0.99999
    text = mb.text_similarity(b.clip, [im, _image(1)], ["a red star", "a sks star in the jungle"])
    assert -1.0 <= text["value"] <= 1.0 and text["backend"] == "clip:tiny-clip"
    dinov2 = mb.load_dino(models["dinov2"])
    assert mb.image_similarity(dinov2, [im], [im])["value"] == pytest.approx(1.0, abs=1e-5)


def test_div_is_zero_for_identical_images_and_positive_otherwise(models: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    b = mb.load_backends(_params(models["clip"], models["vit"]))
    assert b.lpips.name.startswith("lpips-vit:dino:tiny-dino") and "lpips-alex" not in b.lpips.name
    im = _image(3)
    same = mb.diversity(b.lpips, [[im, im.copy(), im.copy()]])
    assert same["value"] == pytest.approx(0.0, abs=1e-6)
    diff = mb.diversity(b.lpips, [[im, _image(4), _image(5)]])
    assert 0.0 < diff["value"] <= 4.0
    # learned weights: zero weights give zero, a file of the wrong size fails with the key
    save_file({f"lin{k}": torch.zeros(32) for k in range(3)}, str(tmp_path / "zero.safetensors"))
    zero = mb.load_lpips(b.dino, str(tmp_path / "zero.safetensors"))
    assert zero.mean_pairwise([im, _image(4)]) == 0.0
    # LPIPS's own key names and shape, on a chosen subset of blocks
    save_file({"lin0.model.1.weight": torch.ones(1, 32, 1, 1), "layers": torch.tensor([2])},
              str(tmp_path / "last.safetensors"))
    last = mb.load_lpips(b.dino, str(tmp_path / "last.safetensors"))
    assert last.layers == (2,) and last.name.endswith(":last.safetensors") and last.mean_pairwise([im, _image(4)]) > 0
    save_file({"lin0": torch.ones(7)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(mb.BackendError, match="metrics.lpips_model"):
        mb.load_lpips(b.dino, str(tmp_path / "bad.safetensors"))
    # no DINO: LPIPS falls back to CLIP's vision tower
    clip_only = mb.load_backends(_params(models["clip"]))
    assert clip_only.lpips.name.startswith("lpips-vit:clip:tiny-clip")
    assert mb.diversity(clip_only.lpips, [[im, _image(4)]])["value"] > 0


def test_evaluate_real_returns_every_metric_with_its_backend(models: dict[str, Path]) -> None:
    calls: list[tuple[list[str], list[int]]] = []
    palette = [_image(10 + k, (32, 32)) for k in range(3)]

    def generate(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        calls.append((prompts, seeds))
        return [palette[(i + s) % 3] for i in range(len(prompts)) for s in seeds]

    real = [_image(20), _image(21)]
    out = mb.evaluate_real(generate, _params(models["clip"], models["vit"]), real, "sks dog", "dog", seeds=[0, 1])
    assert len(calls[0][0]) == 25 and "a sks dog wearing a santa hat" in calls[0][0]
    assert calls[1][0] == ["a dog"] and out["prompt_set"] == "dreambooth-live"
    assert out["n_images"] == 25 * 2 + 2
    for key in mb.METRICS:
        entry = out[key]
        assert isinstance(entry["value"], float) and entry["backend"] and entry["scale"], (key, entry)
    assert out["dino"]["backend"] == "dino:tiny-dino" and out["pres"]["backend"] == "dino:tiny-dino"
    assert out["clip_i"]["backend"] == out["clip_t"]["backend"] == "clip:tiny-clip"
    assert out["div"]["backend"].startswith("lpips-vit:") and out["div"]["value"] > 0
    assert out["pres"]["better"] == "lower" and out["paper_sd"] == mb.PAPER_SD
    row = mb.flatten(out)
    assert row["dino"] == out["dino"]["value"] and "clip:tiny-clip" in row["backend"] and row["n_images"] == 52


def test_evaluate_real_without_dino_says_so(models: dict[str, Path]) -> None:
    im = _image(30, (32, 32))
    out = mb.evaluate_real(lambda prompts, seeds: [im for _ in prompts for _ in seeds], _params(models["clip"]), [im],
                           "sks backpack", "backpack", seeds=[0, 1], prompts=["a sks backpack on the beach"])
    assert out["dino"]["value"] is None and "metrics.dino_model" in out["dino"]["backend"]
    assert out["pres"]["backend"] == "clip:tiny-clip" and out["pres"]["value"] == pytest.approx(1.0, abs=1e-5)
    assert out["div"]["value"] == pytest.approx(0.0, abs=1e-6) and out["prompt_set"] == "custom"
    with pytest.raises(ValueError, match="generate returned"):
        mb.evaluate_real(lambda prompts, seeds: [im], _params(models["clip"]), [im], "sks backpack", "backpack",
                         seeds=[0, 1])

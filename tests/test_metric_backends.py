"""Real-metric backends on tiny randomly initialised CLIP / ViT / DINOv2 folders (offline, seconds).

Every score is held against a reference computed here without dbkit: CLIP-I / CLIP-T with plain
transformers (its own processor, ``get_image_features`` / ``get_text_features``, normalise,
cosine), DINO with transformers' BiT image processor (the Resize(256) + CenterCrop(224) +
ImageNet transform that torchvision also implements) and the model's CLS token, and LPIPS-ViT
with torchmetrics' LPIPS head (see :func:`_ref_lpips`).
"""

from __future__ import annotations

import functools
import shutil
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
    found = {"clip": _save_tiny_clip(root / "tiny-clip"), "vit": _save_tiny_vit(root / "tiny-dino"),
             "dinov2": _save_tiny_dinov2(root / "tiny-dinov2")}
    # the same ViT evaluated at another size than its config's, as DINOv2's 518-px configs are at 224
    found["vit-crop24"] = Path(shutil.copytree(found["vit"], root / "tiny-dino-crop24"))
    (found["vit-crop24"] / "preprocessor_config.json").write_text('{"crop_size": {"height": 24, "width": 24}}')
    return found


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


# ----------------------------------------------------------------------------- independent references
#
# Plain transformers (and torchmetrics) code: nothing here calls dbkit, so a metric that drifts
# from the paper's definition (wrong token, wrong layer, wrong preprocessing, wrong pairing)
# fails against it. dbkit rounds every value to 6 decimals; float32 sums in another order
# differ by ~1e-7, so cosines and distances are compared within TOL.

TOL = 1e-5


@functools.cache
def _ref_clip(path: str):
    from transformers import AutoProcessor, CLIPModel

    return CLIPModel.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _pooled(out) -> torch.Tensor:
    # get_*_features returns the projected tensor in transformers 4 and an output object
    # carrying it as pooler_output in 5
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _ref_clip_images(path: Path, images: list[Image.Image]) -> torch.Tensor:
    model, processor = _ref_clip(str(path))
    with torch.no_grad():
        return _unit_rows(_pooled(model.get_image_features(**processor(images=images, return_tensors="pt"))))


def _ref_clip_texts(path: Path, texts: list[str]) -> torch.Tensor:
    model, processor = _ref_clip(str(path))
    tok = processor.tokenizer
    # longer prompts are truncated (keeping the end token) to what the text tower can embed
    limit = min(tok.model_max_length, model.config.text_config.max_position_embeddings)
    enc = tok(texts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
    with torch.no_grad():
        return _unit_rows(_pooled(model.get_text_features(input_ids=enc["input_ids"],
                                                          attention_mask=enc["attention_mask"])))


@functools.cache
def _ref_dino(path: str, crop: int):
    """The model and the standard DINO evaluation transform at `crop`: shorter side to
    crop·256/224 (Resize(256) at 224), centre crop, ImageNet mean/std, from transformers' own
    BiT processor and constants (DINOv2's own preprocessor is exactly this at 224)."""
    from transformers import AutoModel, ViTConfig, ViTModel
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

    proc_cls = getattr(transformers, "BitImageProcessorPil", None) or transformers.BitImageProcessor
    processor = proc_cls(do_resize=True, size={"shortest_edge": round(crop * 256 / 224)},
                         resample=PILImageResampling.BICUBIC, do_center_crop=True,
                         crop_size={"height": crop, "width": crop}, do_rescale=True, rescale_factor=1 / 255,
                         do_normalize=True, image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD,
                         do_convert_rgb=True)
    if isinstance(transformers.AutoConfig.from_pretrained(path), ViTConfig):
        model = ViTModel.from_pretrained(path, add_pooling_layer=False)  # DINO ships no pooler
    else:
        model = AutoModel.from_pretrained(path)
    return model.eval(), processor


def _dino_pixels(path: Path, crop: int, images: list[Image.Image]) -> torch.Tensor:
    return _ref_dino(str(path), crop)[1](images=images, return_tensors="pt")["pixel_values"]


def _dino_out(path: Path, crop: int, px: torch.Tensor, **kw):
    model = _ref_dino(str(path), crop)[0]
    # a ViT at a size other than its config's needs its position table interpolated
    if crop != model.config.image_size and isinstance(model, transformers.ViTModel):
        kw["interpolate_pos_encoding"] = True
    with torch.no_grad():
        return model(pixel_values=px, **kw)


def _ref_dino_images(path: Path, crop: int, images: list[Image.Image]) -> torch.Tensor:
    # DINO's image embedding: the CLS token of the last layer (after the final layer norm)
    return _unit_rows(_dino_out(path, crop, _dino_pixels(path, crop, images)).last_hidden_state[:, 0])


def _clip_blocks(path: Path, px: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(_ref_clip(str(path))[0].vision_model(pixel_values=px, output_hidden_states=True).hidden_states[1:])


def _dino_blocks(path: Path, crop: int, px: torch.Tensor) -> list[torch.Tensor]:
    return list(_dino_out(path, crop, px, output_hidden_states=True).hidden_states[1:])


def _ref_lpips(blocks, weights: dict[int, torch.Tensor]):
    """LPIPS (Zhang et al. 2018) as torchmetrics implements it, on a ViT's blocks.

    torchmetrics' own LPIPS needs torchvision's AlexNet/VGG, which cannot be installed here,
    so only its head is used: ``_LPIPS.forward`` (unit-normalise each position's channel
    vector, squared difference, 1×1-conv linear weights, spatial mean, sum over layers). Its
    backbone is replaced by the transformer blocks (``hidden_states[1:]``, CLS dropped, patch
    tokens laid out as a (C, h, w) map) and its lin layers by `weights` ({block: (C,)}).
    Returns ``distance(px_i, px_j)``.
    """
    pytest.importorskip("torchmetrics", reason="torchmetrics (requirements.txt) is the LPIPS reference")
    from torchmetrics.functional.image.lpips import _LPIPS, NetLinLayer

    layers = sorted(weights)

    class Blocks(torch.nn.Module):
        def forward(self, px: torch.Tensor) -> list[torch.Tensor]:
            hidden = blocks(px)
            maps = []
            for k in layers:
                tokens = hidden[k][:, 1:]  # the CLS token is not a spatial position
                n, p, c = tokens.shape
                side = int(round(p ** 0.5))
                maps.append(tokens.transpose(1, 2).reshape(n, c, side, side))
            return maps

    class ViTLpips(_LPIPS):
        def __init__(self) -> None:
            torch.nn.Module.__init__(self)  # not _LPIPS.__init__: it would build a torchvision net
            self.scaling_layer = torch.nn.Identity()  # pixels come normalised by the model's processor
            self.resize, self.spatial, self.L = None, False, len(layers)
            self.net = Blocks()
            self.lins = torch.nn.ModuleList()
            for k in layers:
                lin = NetLinLayer(weights[k].numel(), use_dropout=False)
                lin.model[0].weight.data = weights[k].reshape(1, -1, 1, 1).float()
                self.lins.append(lin)

    ref = ViTLpips().eval()

    def distance(a: torch.Tensor, b: torch.Tensor) -> float:
        with torch.no_grad():
            return float(ref(a[None], b[None]))

    return distance


def _mean_pairwise(distance, px: torch.Tensor) -> float:
    n = len(px)
    return float(np.mean([distance(px[i], px[j]) for i in range(n) for j in range(i + 1, n)]))


# Images of several sizes and aspect ratios: 45×40 resizes to a long side of 37·45/40 = 41.6,
# where truncating (torchvision, transformers) and rounding differ by a pixel.
GENERATED = [_image(0), _image(1, (32, 32)), _image(2, (45, 40)), _image(3, (29, 61))]
REAL = [_image(4), _image(5, (64, 33))]


# ----------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("backbone", ["clip", "vit", "vit-crop24", "dinov2"])
def test_clip_i_and_dino_equal_plain_transformers_cosines(models: dict[str, Path], backbone: str) -> None:
    if backbone == "clip":
        b = mb.load_clip(models["clip"])
        ref_g, ref_r = _ref_clip_images(models["clip"], GENERATED), _ref_clip_images(models["clip"], REAL)
    else:
        b = mb.load_dino(models[backbone])
        crop = 24 if backbone == "vit-crop24" else 32  # the crop the folder's preprocessor_config names
        ref_g = _ref_dino_images(models[backbone], crop, GENERATED)
        ref_r = _ref_dino_images(models[backbone], crop, REAL)
    cos = ref_g @ ref_r.T  # every generated × every real image
    got = mb.image_similarity(b, GENERATED, REAL)
    assert got["value"] == pytest.approx(float(cos.mean()), abs=TOL) and got["backend"] == b.name
    # the reference tells images apart far beyond TOL, so a wrong image or token would show
    assert float(cos.max() - cos.min()) > 1000 * TOL
    for i, g in enumerate(GENERATED):
        for j, r in enumerate(REAL):
            assert mb.image_similarity(b, [g], [r])["value"] == pytest.approx(float(cos[i, j]), abs=TOL), (i, j)
    assert mb.image_similarity(b, [REAL[1]], [REAL[1].copy()])["value"] == pytest.approx(1.0, abs=TOL)


def test_clip_t_equals_plain_transformers_image_text_cosines(models: dict[str, Path]) -> None:
    b = mb.load_clip(models["clip"])
    # the last prompt is longer than the tiny text tower's 32 positions: truncated, not an error
    texts = ["a red star", "a sks star in the jungle", "a blue heart on a white rug", "a star " * 30]
    got = mb.text_similarity(b, GENERATED, texts)
    ref = _ref_clip_images(models["clip"], GENERATED) @ _ref_clip_texts(models["clip"], texts).T
    assert got["value"] == pytest.approx(float(ref.diagonal().mean()), abs=TOL) and got["backend"] == "clip:tiny-clip"
    # image i is scored with text i only: any other pairing gives another value
    assert abs(float(ref.diagonal().mean()) - float(ref.flip(1).diagonal().mean())) > 100 * TOL
    assert abs(float(ref.diagonal().mean()) - float(ref.mean())) > 100 * TOL


def test_lpips_vit_equals_torchmetrics_lpips_on_the_same_blocks(models: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    dino = mb.load_dino(models["vit"])
    px = _dino_pixels(models["vit"], 32, GENERATED)
    blocks = functools.partial(_dino_blocks, models["vit"], 32)
    # uniform weights: 1/L per channel on every block (the module's default)
    uniform = mb.load_lpips(dino)
    ref = _ref_lpips(blocks, {k: torch.full((32,), 1 / 3) for k in range(3)})
    want = _mean_pairwise(ref, px)
    assert mb.diversity(uniform, [GENERATED])["value"] == pytest.approx(want, rel=TOL)
    assert uniform.mean_pairwise(GENERATED[:2]) == pytest.approx(ref(px[0], px[1]), rel=TOL)
    # … which is the documented scale: the mean over blocks of 2 - 2·cos between patch features
    feats = [torch.nn.functional.normalize(h[:, 1:], dim=-1) for h in blocks(px[:2])]
    two_minus_cos = float(np.mean([float((2 - 2 * (f[0] * f[1]).sum(-1)).mean()) for f in feats]))
    assert ref(px[0], px[1]) == pytest.approx(two_minus_cos, rel=TOL)
    assert mb.diversity(uniform, [[GENERATED[0], GENERATED[0].copy()]])["value"] == pytest.approx(0.0, abs=1e-6)
    # learned weights on a subset of blocks, in LPIPS's own key names and (1, C, 1, 1) shape
    gen = torch.Generator().manual_seed(7)
    w0, w2 = torch.rand(32, generator=gen), torch.rand(32, generator=gen) * 3
    save_file({"lin0.model.1.weight": w0.reshape(1, 32, 1, 1), "lin1.model.1.weight": w2.reshape(1, 32, 1, 1),
               "layers": torch.tensor([0, 2])}, str(tmp_path / "learned.safetensors"))
    learned = mb.load_lpips(dino, str(tmp_path / "learned.safetensors"))
    ref = _ref_lpips(blocks, {0: w0, 2: w2})
    groups = [GENERATED[:3], GENERATED[2:]]  # DIV: the mean over prompts of each prompt's mean pair distance
    want = np.mean([_mean_pairwise(ref, px[:3]), _mean_pairwise(ref, px[2:])])
    assert mb.diversity(learned, groups)["value"] == pytest.approx(want, rel=TOL)
    # no DINO model: the same formula on CLIP's vision tower, preprocessed by CLIP's processor
    clip_only = mb.load_backends(_params(models["clip"])).lpips
    clip_px = _ref_clip(str(models["clip"]))[1](images=GENERATED, return_tensors="pt")["pixel_values"]
    ref = _ref_lpips(functools.partial(_clip_blocks, models["clip"]), {k: torch.full((32,), 1 / 2) for k in range(2)})
    assert clip_only.name.startswith("lpips-vit:clip:tiny-clip")
    assert mb.diversity(clip_only, [GENERATED])["value"] == pytest.approx(_mean_pairwise(ref, clip_px), rel=TOL)


def test_lpips_weight_files_are_checked(models: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    dino = mb.load_dino(models["vit"])
    save_file({f"lin{k}": torch.zeros(32) for k in range(3)}, str(tmp_path / "zero.safetensors"))
    assert mb.load_lpips(dino, str(tmp_path / "zero.safetensors")).mean_pairwise(GENERATED[:2]) == 0.0
    save_file({"lin0": torch.ones(7), "layers": torch.tensor([1])}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(mb.BackendError, match="metrics.lpips_model.*sizes"):
        mb.load_lpips(dino, str(tmp_path / "bad.safetensors"))
    with pytest.raises(mb.BackendError, match="metrics.lpips_model.*1 lin.* vectors for 3 layers"):
        save_file({"lin0": torch.ones(32)}, str(tmp_path / "short.safetensors"))
        mb.load_lpips(dino, str(tmp_path / "short.safetensors"))
    save_file({"lin0": -torch.ones(32), "layers": torch.tensor([1])}, str(tmp_path / "neg.safetensors"))
    with pytest.raises(mb.BackendError, match="metrics.lpips_model.*negative"):
        mb.load_lpips(dino, str(tmp_path / "neg.safetensors"))
    save_file({"lin0": torch.ones(32), "layers": torch.tensor([3])}, str(tmp_path / "deep.safetensors"))
    with pytest.raises(mb.BackendError, match="metrics.lpips_model.*blocks 0..2"):
        mb.load_lpips(dino, str(tmp_path / "deep.safetensors"))


def test_evaluate_real_scores_each_metric_as_the_references_do(models: dict[str, Path]) -> None:
    calls: list[tuple[list[str], list[int]]] = []
    palette = [_image(10 + k, (32, 32)) for k in range(3)]

    def generate(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        calls.append((prompts, seeds))
        return [palette[(i + s) % 3] for i in range(len(prompts)) for s in seeds]

    real = [_image(20), _image(21)]
    out = mb.evaluate_real(generate, _params(models["clip"], models["vit"]), real, "sks dog", "dog", seeds=[0, 1])
    prompts = calls[0][0]
    assert prompts == mb.dreambooth_prompts("sks dog", live=True) and "a sks dog wearing a santa hat" in prompts
    assert calls[1][0] == ["a dog"] and out["prompt_set"] == "dreambooth-live" and out["n_images"] == 25 * 2 + 2
    generated = [palette[(i + s) % 3] for i in range(25) for s in (0, 1)]
    klass = [palette[s % 3] for s in (0, 1)]
    clip, vit = models["clip"], models["vit"]
    dino_real = _ref_dino_images(vit, 32, real)
    want = {
        "dino": _ref_dino_images(vit, 32, generated) @ dino_real.T,
        "clip_i": _ref_clip_images(clip, generated) @ _ref_clip_images(clip, real).T,
        # CLIP-T: each image with its own prompt, the identifier replaced by the class noun
        "clip_t": (_ref_clip_images(clip, generated)
                   * _ref_clip_texts(clip, [p.replace("sks dog", "dog") for p in prompts for _ in (0, 1)])).sum(-1),
        "pres": _ref_dino_images(vit, 32, klass) @ dino_real.T,  # the class noun's images vs the subject
    }
    for key, cos in want.items():
        assert out[key]["value"] == pytest.approx(float(cos.mean()), abs=TOL), key
    ref = _ref_lpips(functools.partial(_dino_blocks, vit, 32), {k: torch.full((32,), 1 / 3) for k in range(3)})
    px = _dino_pixels(vit, 32, palette)
    pair = {(a, b): ref(px[a], px[b]) for a in range(3) for b in range(3)}
    # each prompt's two seeds draw palette[i % 3] and palette[(i + 1) % 3]
    assert out["div"]["value"] == pytest.approx(np.mean([pair[i % 3, (i + 1) % 3] for i in range(25)]), rel=TOL)
    assert out["div_class"]["value"] == pytest.approx(pair[0, 1], rel=TOL)
    assert out["dino"]["backend"] == out["pres"]["backend"] == "dino:tiny-dino"
    assert out["clip_i"]["backend"] == out["clip_t"]["backend"] == "clip:tiny-clip"
    assert out["div"]["backend"].startswith("lpips-vit:dino:tiny-dino")
    assert out["pres"]["better"] == "lower" and out["paper_sd"] == mb.PAPER_SD
    assert all(out[k]["scale"] for k in mb.METRICS)
    row = mb.flatten(out)
    assert row["dino"] == out["dino"]["value"] and "clip:tiny-clip" in row["backend"] and row["n_images"] == 52


def test_evaluate_real_without_dino_uses_clip_for_pres(models: dict[str, Path]) -> None:
    real = [_image(30, (32, 32))]
    klass = [_image(31, (32, 32)), _image(32, (32, 32))]
    calls = iter([[real[0], real[0]], klass])  # the subject prompt's two seeds, then the class prompt's
    out = mb.evaluate_real(lambda prompts, seeds: next(calls), _params(models["clip"]), real, "sks backpack",
                           "backpack", seeds=[0, 1], prompts=["a sks backpack on the beach"])
    assert out["dino"]["value"] is None and "metrics.dino_model" in out["dino"]["backend"]
    ref = _ref_clip_images(models["clip"], klass) @ _ref_clip_images(models["clip"], real).T
    assert out["pres"]["backend"] == "clip:tiny-clip" and out["pres"]["value"] == pytest.approx(float(ref.mean()),
                                                                                                  abs=TOL)
    assert out["clip_i"]["value"] == pytest.approx(1.0, abs=TOL)  # generated = the real image
    assert out["div"]["value"] == pytest.approx(0.0, abs=1e-6) and out["prompt_set"] == "custom"
    with pytest.raises(ValueError, match="generate returned"):
        mb.evaluate_real(lambda prompts, seeds: real, _params(models["clip"]), real, "sks backpack", "backpack",
                         seeds=[0, 1])

"""Toy-world styles: the oracle reads them exactly, independently of content and subject."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from PIL import Image

from dbkit import captions, data, metrics
from dbkit.toyworld import base_model_path, oracle, scenes, styles, subjects


def _fresh(n: int, seed: int) -> list[scenes.Scene]:
    return list(itertools.islice(scenes.scenes(seed, held_out=None), n))


@pytest.mark.parametrize("name", list(styles.STYLES))
def test_style_oracle_reads_fresh_renders_at_least_98_percent(name):
    style = styles.get(name)
    truth, said = [], []
    for k, scene in enumerate(_fresh(200, seed=41)):
        img = scenes.render(scene)
        styled = k % 2 == 0
        if styled:
            # painted here, by hand, not by styles.apply: the region is what the docstring says
            a = np.array(img)
            if name == "letterbox":
                a[:8], a[-8:] = style.rgb, style.rgb
            else:
                for ys in (slice(0, 12), slice(52, 64)):
                    for xs in (slice(0, 12), slice(52, 64)):
                        a[ys, xs] = style.rgb
            img = Image.fromarray(a)
        truth.append(styled)
        said.append(oracle.has_style(img, style))
    assert np.mean(np.array(truth) == np.array(said)) >= 0.98


@pytest.mark.parametrize("name", list(styles.STYLES))
def test_style_survives_the_toy_vae(name):
    from diffusers import AutoencoderKL

    style = styles.get(name)
    vae = AutoencoderKL.from_pretrained(base_model_path() / "vae").eval()
    imgs = [styles.apply(scenes.render(s), style) for s in _fresh(32, seed=5)]
    with torch.no_grad():
        x = torch.stack([data.to_tensor(i) for i in imgs])
        back = vae.decode(vae.encode(x).latent_dist.mode()).sample
    assert np.mean([oracle.has_style(data.to_image(t), style) for t in back]) >= 0.98


@pytest.mark.parametrize("name", list(styles.STYLES))
def test_unstyled_scenes_through_the_toy_vae_never_read_as_styled(name):
    """False positives: every background, decoded by the VAE (a few RGB units off its palette
    value, as generated images are), is not the style. Orange corners once read yellow
    backgrounds as painted."""
    from diffusers import AutoencoderKL

    style = styles.get(name)
    vae = AutoencoderKL.from_pretrained(base_model_path() / "vae").eval()
    rng = np.random.default_rng(3)
    imgs = []
    for bg in scenes.BACKGROUNDS:
        for o in [scenes.random_object(random.Random(int(s))) for s in rng.integers(0, 10**6, 4)]:
            if o.colour != bg:
                imgs.append(scenes.render(scenes.Scene(bg, (o,))))
    assert {scenes.BACKGROUNDS[b] for b in scenes.BACKGROUNDS} <= {im.getpixel((0, 0)) for im in imgs}
    with torch.no_grad():
        back = vae.decode(vae.encode(torch.stack([data.to_tensor(i) for i in imgs])).latent_dist.mode()).sample
    said = [oracle.has_style(data.to_image(t), style) for t in back]
    assert not any(said), [imgs[k].getpixel((0, 0)) for k, s in enumerate(said) if s]


def test_style_is_independent_of_content_and_subject():
    for style in styles.STYLES.values():
        for scene in _fresh(40, seed=9):
            img = scenes.render(scene)
            assert oracle.read(styles.apply(img, style)) == oracle.read(img)
            for other in styles.STYLES.values():
                if other is not style:  # one style does not read as another
                    assert not oracle.has_style(styles.apply(img, style), other)
        for subject in subjects.SUBJECTS.values():
            for img, _ in subjects.photos(subject):
                styled = styles.apply(img, style)
                assert oracle.has_style(styled, style)
                assert abs(oracle.signature_score(styled, subject) - oracle.signature_score(img, subject)) < 0.02


@pytest.mark.parametrize("name", list(styles.STYLES))
def test_no_object_reaches_a_style_region(name):
    """A style paints over a region no object touches, even by one antialiased pixel: every
    shape, size, position and jitter the renderer draws (random_object's ranges), and every
    subject photo. So a style never covers the content it is applied to."""
    region = styles.region(name)
    layouts = itertools.product(scenes.SHAPES, scenes.SIZES, scenes.POSITIONS, range(-2, 3), range(-3, 4))
    imgs = [(scenes.render(scenes.Scene("black", (scenes.SceneObject(shape, "yellow", "plain", size, pos, dx, dy),))),
             scenes.BACKGROUNDS["black"]) for shape, size, pos, dx, dy in layouts]
    assert len(imgs) == 1050
    for subject in subjects.SUBJECTS.values():
        imgs += [(img, img.getpixel((0, 0))) for img, _ in subjects.photos(subject)]
    for img, bg in imgs:
        off_background = (np.array(img) != np.array(bg, np.uint8)).any(-1)
        assert not off_background[region].any()


def test_style_folder_describes_its_content_and_carries_the_style(tmp_path):
    style = styles.get("letterbox")
    folder = styles.write_folder(style, tmp_path / "letterbox")
    meta = data.read_metadata(folder)
    assert len(meta) == style.n_images
    shapes = set()
    for name, rec in meta.items():
        img = Image.open(folder / name).convert("RGB")
        assert oracle.has_style(img, style)
        r = oracle.read(img)
        assert (r.shape, r.colour, r.background, r.position, r.size) == (
            rec["class_noun"], rec["colour"], rec["background"], rec["position"], rec["size"])
        shapes.add(rec["class_noun"])
        # the caption: the content as the renderer describes it, then the trigger
        scene = scenes.Scene(rec["background"], (scenes.SceneObject(rec["class_noun"], rec["colour"], rec["pattern"],
                                                                     rec["size"], rec["position"]),))
        p = {"captions": {"source": "toyworld", "form": "sentence", "identifier": "ohwx", "class_noun": "style",
                          "trigger": "identifier"}}
        got = captions.caption_for({"file": str(folder / name), "record": rec}, p)["caption"]
        assert got == scenes.caption_sentence(scene) + ", ohwx style"
    assert shapes == set(scenes.SHAPES)  # varied content: the style is not one object


def test_the_base_model_never_draws_a_style():
    from dbkit import models, sample

    pipe = models.load_pipeline(base_model_path(), "sd15")
    sample.set_scheduler(pipe, "ddim")

    def gen(prompts, seeds):
        return sample.generate(pipe, prompts, seeds, steps=15, guidance=4.0, negative_prompt="", size=64)

    for style in styles.STYLES.values():
        # 8 content prompts: the last two ask for yellow backgrounds (orange corners once read them as styled)
        m = metrics.evaluate_style(gen, style, f"{style.trigger} style", seeds=[0, 1], n_prompts=8)
        assert m["style_rate"] <= 0.05 and m["style_drift"] <= 0.05

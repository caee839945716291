"""The toy world: renderer, captions, tokenizer, subjects, oracle accuracy."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from dbkit.toyworld import oracle, scenes, subjects, tokenizer


def test_render_is_deterministic_and_shows_the_object():
    s = scenes.Scene("blue", (scenes.SceneObject("star", "red", "striped", "large", "left"),))
    a, b = np.asarray(scenes.render(s)), np.asarray(scenes.render(s))
    assert a.shape == (64, 64, 3) and (a == b).all()
    assert tuple(a[0, 63]) == scenes.BACKGROUNDS["blue"]
    # the left half holds the object, the right edge is background
    assert (np.abs(a[:, :32].astype(int) - scenes.BACKGROUNDS["blue"]).sum(-1) > 40).sum() > 200
    assert (np.abs(a[:, 56:].astype(int) - scenes.BACKGROUNDS["blue"]).sum(-1) > 40).sum() == 0


def test_captions_sentence_and_tags():
    s = scenes.Scene("blue", (scenes.SceneObject("star", "red", "striped", "small", "left"),))
    assert scenes.caption_sentence(s) == "a small red striped star on a blue background, on the left"
    assert scenes.caption_tags(s) == ["star", "red", "striped", "small", "blue background", "left"]
    assert scenes.caption_sentence(s, noun="sks star") == "a sks star on a blue background, on the left"
    two = scenes.Scene("gray", (s.main, scenes.SceneObject("circle", "blue", "plain", "small", "right")))
    assert scenes.caption_sentence(two).endswith("and a small blue plain circle on the right")
    assert json.loads(json.dumps(two.record()))["objects"][1]["shape"] == "circle"


def test_held_out_split_is_deterministic_and_about_a_tenth():
    rng = random.Random(0)
    flags = [scenes.is_held_out(scenes.random_scene(rng)) for _ in range(2000)]
    assert 0.05 < np.mean(flags) < 0.16
    assert all(scenes.is_held_out(s) for s, _ in zip(scenes.scenes(1, held_out=True), range(50)))


def test_tokenizer_keeps_world_words_whole(tmp_path):
    from transformers import CLIPTokenizer

    tokenizer.save_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    for w in tokenizer.world_words():
        assert len(tok(w).input_ids) == 3, w
    ids = tok("a photo of sks star in the jungle").input_ids
    assert tok.convert_ids_to_tokens(ids)[4] == "sks</w>"
    assert len(ids) > 9  # unknown words still tokenize, letter by letter


@pytest.mark.parametrize("name", list(subjects.SUBJECTS))
def test_subject_photos_carry_the_signature_and_ordinary_scenes_do_not(name):
    sub = subjects.SUBJECTS[name]
    shots = subjects.photos(sub)
    assert 3 <= len(shots) <= 6
    assert all(oracle.has_signature(im, sub) for im, _ in shots)
    rng = random.Random(1)
    for _ in range(60):
        s = scenes.random_scene(rng)
        obj = scenes.SceneObject(sub.class_noun, s.main.colour, s.main.pattern, s.main.size, s.main.position)
        assert not oracle.has_signature(scenes.render(scenes.Scene(s.background, (obj,))), sub)
    for other in subjects.SUBJECTS.values():
        if other is not sub:
            assert not any(oracle.has_signature(im, sub) for im, _ in subjects.photos(other))


def test_subject_folder_is_an_ordinary_image_folder(tmp_path):
    folder = subjects.write_folder(subjects.get("duo_star"), tmp_path / "duo")
    pngs = sorted(folder.glob("*.png"))
    meta = [json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [m["file_name"] for m in meta] == [p.name for p in pngs]
    assert meta[0]["class_noun"] == "star"
    with pytest.raises(KeyError, match="known subjects"):
        subjects.get("nope")


def test_oracle_reads_fresh_scenes_at_least_98_percent():
    rng = random.Random(2024)
    keys = ("background", "colour", "shape", "pattern", "size", "position")
    hits = {k: 0 for k in keys}
    n = 300
    for _ in range(n):
        s = scenes.random_scene(rng)
        r = oracle.read(scenes.render(s))
        want = {"background": s.background, "colour": s.main.colour, "shape": s.main.shape,
                "pattern": s.main.pattern, "size": s.main.size, "position": s.main.position}
        for k in keys:
            hits[k] += getattr(r, k) == want[k]
    acc = {k: v / n for k, v in hits.items()}
    assert min(acc.values()) >= 0.98, acc


def test_oracle_on_an_empty_image_finds_no_object():
    img = np.full((64, 64, 3), scenes.BACKGROUNDS["gray"], np.uint8)
    r = oracle.read(img)
    assert r.background == "gray" and r.shape is None and r.object_pixels == 0
    assert oracle.signature_score(img, subjects.get("duo_star")) == 0.0

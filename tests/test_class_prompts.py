"""prior.class_prompt "{caption}": class images from each instance caption without its subject."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dbkit import captions, config, models, sample, train


def _p(**captions_over) -> dict:
    p = config.load(Path(__file__).resolve().parent.parent / "params" / "base.yaml", check_files=False).params
    p["captions"] |= captions_over
    return p


def test_class_caption_drops_a_trailing_trigger_and_renames_a_subject():
    style = _p(identifier="ohwx", class_noun="style")
    assert captions.class_caption("a red star on a blue background, in the center, ohwx style", style) == \
        "a red star on a blue background, in the center"
    subject = _p(identifier="sks", class_noun="heart")
    assert captions.class_caption("a sks heart on a gray background", subject) == "a heart on a gray background"
    subject["prior"]["class_prompt"] = "{caption}"
    recs = [{"caption": "a sks heart on a gray background"}, {"caption": "a sks heart, on the left"},
            {"caption": "a sks heart on a gray background"}]
    assert captions.class_prompts(subject, recs) == ["a heart on a gray background", "a heart, on the left"]


def test_class_images_follow_their_prompts_and_train_with_them(tiny_base, in_tmp):
    p = _p(identifier="ohwx", class_noun="style")
    p["prior"] |= {"class_prompt": "{caption}", "num_images": 3, "steps": 2, "seed": 7}
    prompts = ["a red star", "a blue heart on a white background"]
    pipe = models.load_pipeline(tiny_base, "sd15")
    folder, hit = sample.class_images(lambda: pipe, "tiny", p, prompts)
    assert not hit
    # image k is prompts[k mod 2] at seed 7 + k: drawn again here, one at a time (a batch of
    # one rounds differently by a level or two), and not the other prompt's picture
    def draw(prompt: str, seed: int) -> np.ndarray:
        return np.asarray(sample.generate(pipe, [prompt], [seed], steps=2, guidance=p["prior"]["guidance"],
                                          negative_prompt="", size=p["data"]["resolution"])[0], np.int16)

    for k, want_prompt in enumerate(["a red star", "a blue heart on a white background", "a red star"]):
        got = np.asarray(sample.Image.open(folder / f"{7 + k:06d}.png"), np.int16)
        other = prompts[1 - prompts.index(want_prompt)]
        assert np.abs(got - draw(want_prompt, 7 + k)).max() <= 2
        assert np.abs(got - draw(other, 7 + k)).max() > 10
    p["prior"]["enabled"] = True
    _, klass, _ = train.load_training_examples(p, pipe.vae, [], folder)
    assert [e.record["caption"] for e in klass] == ["a red star", "a blue heart on a white background", "a red star"]
    assert sample.class_images(lambda: None, "tiny", p, prompts) == (folder, True)

"""The oracle metrics on hand-made images with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from dbkit import metrics
from dbkit.toyworld import scenes, subjects

DUO = subjects.get("duo_star")


def _photo(bg="white", pos="left", size="large"):
    return subjects.render_subject(DUO, bg, pos, size)


def _scene(colour="red", bg="blue", pos="center", shape="star", size="large"):
    return scenes.render(scenes.Scene(bg, (scenes.SceneObject(shape, colour, "plain", size, pos),)))


def test_subject_fidelity_counts_the_subject_and_not_a_plain_star():
    assert metrics.signature_rate([_photo(), _photo("gray", "right")], DUO) == 1.0
    assert metrics.signature_rate([_photo(), _scene()], DUO) == 0.5
    assert metrics.signature_rate([_scene("yellow"), _scene("green", "white")], DUO) == 0.0


def test_prompt_fidelity_checks_each_requested_attribute():
    wants = [{"background": "gray", "position": "right"}, {"background": "blue", "size": "small"}]
    right = [_photo("gray", "right"), _photo("blue", "center", "small")]
    assert metrics.prompt_fidelity(right, wants) == 1.0
    wrong_bg = [_photo("white", "right"), _photo("blue", "center", "small")]
    assert metrics.prompt_fidelity(wrong_bg, wants) == 0.75
    assert metrics.prompt_fidelity([_photo("white", "left"), _photo("black", "left", "large")], wants) == 0.0


def test_pres_is_the_signature_rate_of_class_images():
    drifted = [_photo(), _photo("blue", "center"), _scene()]
    assert metrics.signature_rate(drifted, DUO) == pytest.approx(2 / 3)


def test_diversity_is_zero_for_copies_and_grows_with_difference():
    same = [_scene(), _scene()]
    assert metrics.diversity(same) == 0.0
    near = metrics.diversity([_scene(pos="left"), _scene(pos="center")])
    far = metrics.diversity([_scene(bg="white"), _scene(bg="black", colour="yellow")])
    assert 0 < near < far <= 1


def test_toy_prompts_request_what_they_say():
    for text, want in metrics.toy_prompts("sks star", 8):
        assert text.startswith("a ") and "sks star" in text
        if "background" in want:
            assert f"on a {want['background']} background" in text
        if "position" in want:
            assert scenes.POSITION_PHRASES[want["position"]] in text


def test_evaluate_on_a_perfect_and_a_useless_model():
    def perfect(prompts, seeds):
        out = []
        for prompt in prompts:
            want = {k: v for _, w in metrics.toy_prompts("sks star", 8) if _ == prompt for k, v in w.items()}
            bg, pos, size = want.get("background", "gray"), want.get("position", "center"), want.get("size", "large")
            for s in seeds:
                if prompt == "a star":
                    out.append(_scene(list(scenes.OBJECT_COLOURS)[s % 6], pos=scenes.POSITIONS[s % 3]))
                else:
                    out.append(_photo(bg, pos, size))
        return out

    m = metrics.evaluate(perfect, DUO, "sks star", "star", seeds=[0, 1, 2])
    assert m["subject_fidelity"] == 1.0 and m["prompt_fidelity"] == 1.0 and m["pres"] == 0.0 and m["div"] > 0.05
    blank = np.full((64, 64, 3), 128, np.uint8)
    useless = metrics.evaluate(lambda p, s: [blank] * (len(p) * len(s)), DUO, "sks star", "star", seeds=[0, 1])
    assert useless["subject_fidelity"] == 0.0 and useless["div"] == 0.0


def test_background_leak_counts_the_backgrounds_of_the_subjects_own_photos():
    own = {bg for bg, _, _ in DUO.photos}
    other = next(b for b in scenes.BACKGROUNDS if b not in own)
    images = [_photo(bg) for bg in sorted(own)] + [_photo(other)]
    assert metrics.background_leak(images, DUO) == len(own) / (len(own) + 1)
    assert metrics.background_leak([_scene(bg=other)], DUO) == 0.0


def test_metrics_seed_moves_every_evaluation_image(monkeypatch):
    """metrics.seed picks the evaluation's seeds (a hold-out check draws other images): the
    generator sees exactly seed … seed+num_per_prompt−1, for a subject run and for a merge row."""
    from PIL import Image

    from dbkit import config, merge_runs, workflow

    seen: list[int] = []

    def fake_generator(pipe, p):
        def gen(prompts, seeds):
            seen.extend(seeds)
            return [Image.new("RGB", (64, 64), (128, 128, 128)) for _ in prompts for _ in seeds]
        return gen

    monkeypatch.setattr(workflow, "generator_for", fake_generator)
    p = config.load("params/notes/merge.yaml", ["metrics.seed=200", "metrics.num_per_prompt=3"]).params
    workflow.evaluate_model(p, pipe=None)
    assert seen and set(seen) == {200, 201, 202}
    seen.clear()
    style_p = config.load("params/notes/style.yaml").params
    pair = (workflow.subject_of(p), "sks heart", workflow.style_of(style_p), "ohwx style")
    merge_runs.score(p, None, pair)
    assert seen and set(seen) == {200, 201, 202}


def test_a_style_run_is_evaluated_like_its_metrics_json(monkeypatch):
    """evaluate_model (what `dbkit checkpoints --metrics` calls per checkpoint) measures a toy
    style with the style metrics, as the run's own evaluation does; it used to answer None
    ("user photos need metrics.backend: clip") for every style."""
    from PIL import Image

    from dbkit import config, workflow
    from dbkit.toyworld import styles

    letterbox = styles.get("letterbox")
    painted = styles.apply(Image.new("RGB", (64, 64), (128, 128, 128)), letterbox)  # the renderer's own paint

    def fake_generator(pipe, p):
        return lambda prompts, seeds: [painted.copy() for _ in prompts for _ in seeds]

    monkeypatch.setattr(workflow, "generator_for", fake_generator)
    p = config.load("params/notes/style.yaml", ["metrics.num_per_prompt=2"]).params
    m = workflow.evaluate_model(p, pipe=None)
    # every image carries the style, with and without the trigger
    assert m is not None and m["style_rate"] == 1.0 and m["style_drift"] == 1.0


def test_recontext_fidelity_is_the_subject_on_context_prompts_only():
    """A model that draws the subject for the bare prompt but a plain star in every new
    context: subject fidelity, over bare + context prompts, is 1/9; recontextualisation 0.
    The reverse gives 8/9 and 1. Counted by hand from what each prompt returns."""
    def draws(subject_on_bare: bool):
        def generate(prompts, seeds):
            bare = prompts == ["a sks star"]
            show = subject_on_bare if bare else not subject_on_bare
            return [_photo() if show else _scene() for _ in prompts for _ in seeds]
        return generate

    bare_only = metrics.evaluate(draws(True), DUO, "sks star", "star", seeds=[0, 1])
    assert bare_only["subject_fidelity"] == pytest.approx(1 / 9) and bare_only["recontext_fidelity"] == 0.0
    context = metrics.evaluate(draws(False), DUO, "sks star", "star", seeds=[0, 1])
    assert context["subject_fidelity"] == pytest.approx(8 / 9) and context["recontext_fidelity"] == 1.0


def test_every_computed_metric_is_registered_and_every_rate_has_its_images():
    """A metric the tables cannot explain, or a rate without its denominator, is a gap: each
    evaluate* key is in dbkit.metric_registry, and intervals finds n for every registered rate."""
    from dbkit import intervals, metric_registry

    blank = np.full((64, 64, 3), 128, np.uint8)
    m = metrics.evaluate(lambda p, s: [blank] * (len(p) * len(s)), DUO, "sks star", "star", seeds=[0, 1])
    assert set(m) - set(metric_registry.BY_NAME) == set(metric_registry.NOT_METRICS)
    rates = {k for k in m if k in metric_registry.RATES}
    assert rates and set(intervals.denominators(m)) == rates | {"prompt_fidelity"}
    assert intervals.denominators(m)["recontext_fidelity"] == 8 * 2  # 8 context prompts × 2 seeds

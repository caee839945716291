"""Every method × family pair trains a few steps and its output generates (tiny random models)."""

from __future__ import annotations

import pytest

from dbkit import captions, config, data, export, methods, models, sample, train

METHODS = {
    "lora": [],
    "dora": ["train.method=dora", "train.lora.unet_targets=[to_q,to_k,to_v,to_out.0]"],
    "full": ["train.method=full"],
    "pivotal": ["train.pivotal.enabled=true"],
}


@pytest.fixture(scope="module")
def family_bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: models.build_random(f, root / f) for f in models.FAMILIES}


@pytest.mark.parametrize("family", models.FAMILIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_method_family_pair_trains_and_generates(in_tmp, family_bases, family, method):
    base = family_bases[family]
    p = config.load("params/base.yaml", [
        f"base.model={base}", "data.resolution=32", "base.resolution=32", "train.steps=2", "train.batch_size=1",
        "train.save_every=0", "train.sample_every=0", "prior.enabled=true", "prior.num_images=1", "prior.steps=2",
        "experiment=fam", *METHODS[method]]).params
    assert models.detect_family(base) == family
    recs = captions.build_captions(data.build_manifest(data.resolve_folder(p["data"]["instance_images"])),
                                   captions.effective_params(p))
    class_dir, _ = sample.class_images(lambda: models.load_pipeline(base, family), str(base), p, "a star")
    out = train.train(p, in_tmp / "run", recs, base_path=base, family=family, class_dir=class_dir, progress=False)
    meta = export.read_metadata(out)
    expected = {"sd15": "epsilon", "sd2": "v_prediction", "sdxl": "epsilon", "playground": "edm"}[family]
    assert meta["objective"] == expected and meta["family"] == family
    pipe = methods.load_trained(out, base, family)
    prompt = captions.expand("a {subject}", captions.effective_params(p))
    images = sample.generate(pipe, [prompt], [0], steps=2, guidance=2.0, size=32)
    assert images[0].size == (32, 32)


def test_edm_on_an_sd15_base_fails_before_training(in_tmp, family_bases):
    overrides = [f"base.model={family_bases['sd15']}", "train.prediction=edm", "experiment=x"]
    with pytest.raises(config.ConfigError, match=r"'train\.prediction' is edm but base\.model is a sd15"):
        config.load("params/base.yaml", overrides)  # at params load, before any data work
    p = config.load("params/base.yaml", overrides, check_files=False).params  # the base unread: the trainer refuses
    with pytest.raises(train.TrainingError, match="EDM"):
        train.load_parts(family_bases["sd15"], "sd15", p)


def test_family_mismatch_is_an_early_error(family_bases):
    with pytest.raises(models.ModelError, match="base.family"):
        models.family_of({"base": {"family": "sdxl"}}, family_bases["sd15"])

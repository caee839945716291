"""data.class_images: toyworld:class:<shape>[@n], the toy world's own pictures of a class (real class images)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dbkit import config, data, train, workflow
from dbkit.config import ConfigError
from dbkit.toyworld import classes, oracle, subjects


def _images(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


def test_class_folder_holds_ordinary_varied_hearts_with_their_caption(in_tmp: Path) -> None:
    folder = data.resolve_folder("toyworld:class:heart@32")
    assert folder == Path("data/toyworld/class/heart@32")
    files = _images(folder)
    assert len(files) == 32 and len({f.read_bytes() for f in files}) == 32
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    meta = {json.loads(line)["file_name"]: json.loads(line) for line in lines}
    assert sorted(meta) == [f.name for f in files]
    readings = [oracle.read(Image.open(f)) for f in files]
    assert all(r.shape == "heart" for r in readings)
    # what the oracle reads off the pixels is the scene the metadata records
    for f, r in zip(files, readings):
        obj = meta[f.name]["objects"][0]
        assert (r.background, r.colour, r.size, r.position) == (meta[f.name]["background"], obj["colour"], obj["size"],
                                                                obj["position"])
        assert meta[f.name]["text"] == "a heart"
    assert len({r.background for r in readings}) >= 5 and len({r.colour for r in readings}) >= 5
    assert {r.size for r in readings} == {"small", "large"} and len({r.position for r in readings}) == 3
    assert {r.pattern for r in readings} == {"plain", "striped", "dotted"}
    # ordinary hearts: no picture carries any subject's paint (eyed_heart is the one that could)
    assert not any(oracle.has_signature(Image.open(f), s) for f in files for s in subjects.SUBJECTS.values())


def test_class_folder_is_deterministic_and_a_prefix_of_a_larger_one(in_tmp: Path) -> None:
    small = data.resolve_folder("toyworld:class:star@4")
    first = [f.read_bytes() for f in _images(small)]
    classes.folder_files.cache_clear()
    again = data.resolve_folder("toyworld:class:star@4")
    assert [f.read_bytes() for f in _images(again)] == first
    big = _images(data.resolve_folder("toyworld:class:star@6"))
    assert [f.read_bytes() for f in big[:4]] == first
    assert [oracle.read(Image.open(f)).shape for f in big] == ["star"] * 6


def test_class_images_spec_is_validated_and_its_content_is_in_the_run_hash(in_tmp: Path, monkeypatch) -> None:
    with pytest.raises(ConfigError, match=r"'data\.class_images' names unknown toy-world shape 'hexagon'; "
                                          r"known shapes: circle, square, triangle, star, heart"):
        config.load("params/base.yaml", ["data.class_images=toyworld:class:hexagon"])
    with pytest.raises(ConfigError, match=r"'data\.class_images' 'toyworld:heart' is not toyworld:class:<shape>"):
        config.load("params/base.yaml", ["data.class_images=toyworld:heart"])
    h4 = config.load("params/base.yaml", ["data.class_images=toyworld:class:heart@4"]).hash
    assert not Path("data").exists()  # loading params renders nothing to disk
    assert config.load("params/base.yaml", ["data.class_images=toyworld:class:heart@5"]).hash != h4
    # the spec's fingerprint is its folder's: a copy of the written folder hashes the same
    spec_fp = data.folder_fingerprint("toyworld:class:heart@4")
    assert spec_fp == data.folder_fingerprint(str(data.resolve_folder("toyworld:class:heart@4")))
    # the hash follows the pictures' bytes, not only the spec: one repainted pixel makes a new run
    files = dict(classes.folder_files("heart", 4))
    im = Image.open(io.BytesIO(files["001.png"]))
    im.putpixel((0, 0), (0, 0, 0))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    monkeypatch.setattr(classes, "folder_files", lambda shape, n=None: files | {"001.png": buf.getvalue()})
    assert config.load("params/base.yaml", ["data.class_images=toyworld:class:heart@4"]).hash != h4


def test_training_reads_the_class_folder_as_its_prior_examples(in_tmp: Path, tiny_base: Path, monkeypatch) -> None:
    exp = config.load("params/base.yaml", [f"base.model={tiny_base}", "data.instance_images=toyworld:eyed_heart",
                                           "data.class_images=toyworld:class:heart@4", "captions.class_noun=heart",
                                           "train.batch_size=2", "experiment=t"])
    rd = in_tmp / "run"
    rd.mkdir()
    info = workflow.prepare_data(exp, rd)
    assert info["n_class"] == 4 and Path(info["class_dir"]) == Path("data/toyworld/class/heart@4")
    records = workflow.prepare_captions(exp, rd)
    seen = {}
    real = train.load_training_examples

    def spy(*a, **kw):
        seen["out"] = real(*a, **kw)
        return seen["out"]

    monkeypatch.setattr(train, "load_training_examples", spy)
    # the trainer's own setup (everything before the first step) reads the class folder
    tr = train.setup_training(exp.params, rd, records, tiny_base, "sd15", Path(info["class_dir"]))
    _, klass, prompt = seen["out"]
    assert prompt == "a heart"
    files = _images(Path("data/toyworld/class/heart@4"))
    assert [Path(e.record["file"]).name for e in klass] == [f.name for f in files]
    for e, f in zip(klass, files):  # 64×64 renders at resolution 64: the pixels themselves, in [-1, 1]
        want = torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), np.float32) / 127.5 - 1).permute(2, 0, 1)
        assert torch.equal(e.pixels, want)
        assert e.record["caption"] == "a heart"
    assert tr.klass == klass and tr.prior_prompt == "a heart"
    # one step's loss over an instance photo and a class image: the prior term comes from them
    batch = [tr.instance[0], tr.klass[0]]
    loss, l_inst, l_prior = train.batch_loss(tr, batch, [records[0]["caption"], tr.prior_prompt], 1,
                                             torch.Generator().manual_seed(0), False)
    assert torch.isfinite(l_prior) and l_prior > 0
    assert torch.allclose(loss, l_inst + exp.params["prior"]["weight"] * l_prior)


def test_a_picture_of_the_subject_is_never_a_class_image() -> None:
    """The guard itself: the eyed_heart subject's own photo is refused (it is a heart, but
    its paint is the subject's), an ordinary heart in one of its tones is kept."""
    subject = subjects.get("eyed_heart")
    own = subjects.render_subject(subject, "gray", "center", "large")
    assert oracle.read(own).shape == "heart"
    assert not classes._acceptable(own, "heart")
    plain = classes.scenes.render(classes.scenes.Scene("gray", (classes.scenes.SceneObject("heart", "blue"),)))
    assert classes._acceptable(plain, "heart") and not classes._acceptable(plain, "star")

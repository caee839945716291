"""The instance-image path: masks are not photos, subject area from masks or metadata, the area filter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dbkit import data
from dbkit.toyworld import subjects


def _photo_with_mask(folder: Path, name: str, side: int) -> None:
    img = np.zeros((40, 40, 3), np.uint8)
    mask = np.zeros((40, 40), np.uint8)
    img[:side, :side] = 200
    mask[:side, :side] = 255
    Image.fromarray(img).save(folder / f"{name}.png")
    Image.fromarray(mask).save(folder / f"{name}.mask.png")


def test_masks_are_not_photos_and_give_the_area(tmp_path: Path) -> None:
    _photo_with_mask(tmp_path, "a", 20)
    _photo_with_mask(tmp_path, "b", 8)
    manifest = data.build_manifest(tmp_path)
    assert [Path(r["file"]).name for r in manifest] == ["a.png", "b.png"]
    assert [r["subject_area"] for r in manifest] == [pytest.approx(0.25), pytest.approx(0.04)]
    kept, dropped = data.filter_by_area(manifest, 0.1, str(tmp_path))
    assert [Path(r["file"]).name for r in kept] == ["a.png"]
    assert [Path(r["file"]).name for r in dropped] == ["b.png"]
    assert data.filter_by_area(manifest, 0.0, str(tmp_path)) == (manifest, [])


def test_area_from_metadata_and_errors_that_say_what_to_do(tmp_path: Path) -> None:
    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "y.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "subject_area": 0.3}) + "\n")
    manifest = data.build_manifest(tmp_path)
    assert manifest[0]["subject_area"] == 0.3 and manifest[1]["subject_area"] is None
    with pytest.raises(data.DataError, match=r"y\.png.*mask.*min_subject_area: 0"):
        data.filter_by_area(manifest, 0.1, str(tmp_path))
    with pytest.raises(data.DataError, match="drops every image.*0.30"):
        data.filter_by_area(manifest[:1], 0.5, str(tmp_path))


def test_toyworld_photos_record_their_subject_area_and_small_ones_are_filtered(tmp_path: Path) -> None:
    folder = subjects.write_folder(subjects.get("duo_star"), tmp_path / "duo")
    manifest = data.build_manifest(folder)
    by_size = {r["record"]["size"]: r["subject_area"] for r in manifest}
    assert 0 < by_size["small"] < by_size["large"] < 0.5
    kept, dropped = data.filter_by_area(manifest, (by_size["small"] + by_size["large"]) / 2, str(folder))
    assert {r["record"]["size"] for r in kept} == {"large"} and {r["record"]["size"] for r in dropped} == {"small"}


def test_toyworld_folder_is_rewritten_only_when_its_records_change(tmp_path: Path) -> None:
    sub = subjects.get("duo_star")
    folder = subjects.write_folder(sub, tmp_path / "duo")
    stamp = (folder / "01.png").stat().st_mtime_ns
    subjects.write_folder(sub, folder)
    assert (folder / "01.png").stat().st_mtime_ns == stamp
    (folder / "metadata.jsonl").write_text('{"file_name": "01.png"}\n')  # as an older dbkit wrote it
    subjects.write_folder(sub, folder)
    assert "subject_area" in (folder / "metadata.jsonl").read_text()


# --------------------------------------------------------------------------- runs keyed by their data


def _copy_subject(dst: Path) -> Path:
    """A toy-world subject's photos as a user's folder (what `toyworld:eyed_heart` renders)."""
    src = data.resolve_folder("toyworld:eyed_heart")
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _run_folder(folder: Path, *extra: str) -> Path:
    from dbkit import config, runs

    exp = config.load("params/base.yaml", [f"data.instance_images={folder}", "experiment=fp", *extra])
    return runs.run_dir(exp)


def test_changing_one_instance_photo_changes_the_run_folder(in_tmp: Path) -> None:
    photos = _copy_subject(in_tmp / "photos")
    first = _run_folder(photos)
    assert _run_folder(photos) == first  # same bytes, same run
    (photos / "notes.md").write_text("not read by dbkit")
    assert _run_folder(photos) == first
    with Image.open(photos / "02.png") as im:
        edited = im.convert("RGB")
    edited.putpixel((5, 5), (255, 0, 255))  # one pixel of one photo
    edited.save(photos / "02.png")
    second = _run_folder(photos)
    assert second != first and second.parent == first.parent
    assert sorted(p.name for p in first.parent.iterdir()) == sorted([first.name, second.name])
    assert (second / "hash.txt").read_text() != (first / "hash.txt").read_text()


@pytest.mark.parametrize("edit", ["mask", "sidecar", "metadata"])
def test_masks_sidecars_and_metadata_are_part_of_the_run(in_tmp: Path, edit: str) -> None:
    photos = _copy_subject(in_tmp / "photos")
    first = _run_folder(photos)
    if edit == "mask":
        Image.new("L", (64, 64), 255).save(photos / "01.mask.png")
    elif edit == "sidecar":
        (photos / "01.txt").write_text("a sks heart, gray background")
    else:
        lines = (photos / "metadata.jsonl").read_text().splitlines()
        rec = json.loads(lines[0]) | {"subject_area": 0.5}
        (photos / "metadata.jsonl").write_text("\n".join([json.dumps(rec), *lines[1:]]) + "\n")
    assert _run_folder(photos) != first


def test_class_image_folder_counts_only_when_prior_preservation_reads_it(in_tmp: Path) -> None:
    photos = _copy_subject(in_tmp / "photos")
    cls = in_tmp / "cls"
    cls.mkdir()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(cls / "a.png")
    with_prior = _run_folder(photos, f"data.class_images={cls}")
    without = _run_folder(photos, f"data.class_images={cls}", "prior.enabled=false")
    Image.new("RGB", (64, 64), (10, 20, 31)).save(cls / "a.png")
    assert _run_folder(photos, f"data.class_images={cls}") != with_prior
    assert _run_folder(photos, f"data.class_images={cls}", "prior.enabled=false") == without


def test_toyworld_spec_fingerprint_is_its_folder_and_params_load_writes_nothing(in_tmp: Path) -> None:
    from dbkit import config

    spec = "toyworld:eyed_heart@4"
    config.load("params/base.yaml", [f"data.instance_images={spec}"])
    assert not (in_tmp / "data").exists()  # the fingerprint of a spec is rendered in memory
    before = data.folder_fingerprint(spec)
    folder = data.resolve_folder(spec)
    assert data.folder_fingerprint(spec) == before == data.folder_fingerprint(str(folder))
    # the folder is dbkit's: an edited photo is put back, so the spec's fingerprint stays true
    (folder / "01.png").write_bytes((folder / "02.png").read_bytes())
    assert data.folder_fingerprint(str(folder)) != before
    data.resolve_folder(spec)
    assert data.folder_fingerprint(str(folder)) == before


def test_fingerprint_is_of_the_files_bytes(tmp_path: Path) -> None:
    import hashlib

    Image.new("RGB", (16, 16), (1, 2, 3)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a photo")
    digests = {f: hashlib.sha256((tmp_path / f).read_bytes()).hexdigest() for f in ("a.png", "a.txt")}
    text = "".join(f"{name}\0{digests[name]}\n" for name in sorted(digests))
    assert data.folder_fingerprint(str(tmp_path)) == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert data.folder_fingerprint(str(tmp_path / "missing")) is None


# --------------------------------------------------------------------------- transparency


def _white_composite(rgba: np.ndarray) -> np.ndarray:
    """The reference: out = colour·α + white·(1 − α), per pixel, by hand."""
    a = rgba[..., 3:4].astype(np.float64) / 255
    return rgba[..., :3] * a + 255 * (1 - a)


def test_transparent_pngs_are_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black: convert("RGB") would show black
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[1, 1] = (0, 0, 255, 128)  # half-transparent blue
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    got = np.asarray(data.open_rgb(tmp_path / "rgba.png"), np.float64)
    assert np.abs(got - _white_composite(rgba)).max() <= 1
    assert tuple(got[3, 3]) == (255, 255, 255) and tuple(got[0, 0]) == (255, 0, 0)

    la = Image.fromarray(rgba[..., [0, 3]], "LA")  # grey + alpha
    la.save(tmp_path / "la.png")
    ref = _white_composite(np.asarray(la.convert("RGBA")))
    assert np.abs(np.asarray(data.open_rgb(tmp_path / "la.png"), np.float64) - ref).max() <= 1

    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)  # index 0 black (transparent), 1 green
    pal.putpixel((2, 2), 1)
    pal.save(tmp_path / "p.png", transparency=0)
    got = np.asarray(data.open_rgb(tmp_path / "p.png"))
    assert tuple(got[0, 0]) == (255, 255, 255) and tuple(got[2, 2]) == (0, 200, 0)

    Image.new("RGB", (4, 4), (7, 8, 9)).save(tmp_path / "rgb.png")  # opaque images are unchanged
    assert tuple(np.asarray(data.open_rgb(tmp_path / "rgb.png"))[0, 0]) == (7, 8, 9)


# --------------------------------------------------------------------------- captions that would all be empty


def test_keep_tags_matching_nothing_fails_listing_the_tags(tmp_path: Path) -> None:
    import random

    from dbkit import captions, config

    for k, text in enumerate(["a photo of {subject}, on grass", "{subject} at night, blurry"]):
        Image.new("RGB", (16, 16)).save(tmp_path / f"{k}.png")
        (tmp_path / f"{k}.txt").write_text(text)
    p = config.load(config.BASE_PATH, ["captions.source=sidecar", "captions.keep_tags=[purple]"],
                    check_files=False).params
    manifest = data.build_manifest(tmp_path)
    with pytest.raises(data.DataError, match=r"captions\.keep_tags=\['purple'\] matches no tag of any caption.*"
                                             r"'a photo of sks star', 'on grass', 'sks star at night', 'blurry'$"):
        captions.build_captions(manifest, p)
    p["captions"]["keep_tags"] = ["blurry"]  # one caption keeps a tag: it trains, the other is empty
    records = captions.build_captions(manifest, p)
    assert [captions.train_caption(r, p, random.Random(0)) for r in records] == ["", "blurry"]

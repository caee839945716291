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

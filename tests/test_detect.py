"""Detectors (dbkit.detect) and what the data path does with their boxes (dbkit.framing):
the face-ratio filter, square crops, the toy world's oracle, the data page's record."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dbkit import config, data, detect, framing, masks, matting, workflow
from dbkit.detect import Box

skdata = pytest.importorskip("skimage.data")

# Measured with opencv-python-headless 4.14 (detect.OpenCVDetector: equalised grey, frontalface_default,
# scaleFactor 1.1, minNeighbors 5): astronaut()'s face box is 93×93 px at (177, 67) in the 512×512
# frame, a face ratio of 0.033.
# The range leaves room for another OpenCV build's few pixels either way.
ASTRONAUT_FACE_RATIO = (0.025, 0.05)


@pytest.fixture(scope="module")
def opencv():
    return detect.OpenCVDetector()


def _d(**kw) -> dict:
    d = {"detector": "opencv", "detector_model": "", "min_face_ratio": 0.0, "crop_to": "none", "crop_margin": 0.3}
    return d | kw


def _save(folder: Path, name: str, array: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(folder / name)
    return folder / name


# --------------------------------------------------------------------------- OpenCV on real photos


def test_opencv_finds_the_astronauts_face_and_no_face_in_coffee(opencv):
    im = Image.fromarray(skdata.astronaut())
    boxes = opencv.detect(im)
    face = detect.largest(boxes, "face")
    assert face is not None
    # her face: the eyes are near (230, 110) in the picture
    assert face.x0 < 230 < face.x1 and face.y0 < 110 < face.y1
    ratio = framing.face_ratio(boxes, im.size)
    assert ASTRONAUT_FACE_RATIO[0] < ratio < ASTRONAUT_FACE_RATIO[1], ratio
    coffee = Image.fromarray(skdata.coffee())
    assert detect.of_kind(opencv.detect(coffee), "face") == []
    assert framing.face_ratio(opencv.detect(coffee), coffee.size) == 0.0


def test_big_photos_are_searched_shrunk_and_boxes_come_back_at_full_size(opencv):
    small = Image.fromarray(skdata.astronaut())
    big = small.resize((1536, 1536), Image.Resampling.BICUBIC)  # 3×: searched at 640 px
    a = detect.largest(opencv.detect(small), "face")
    b = detect.largest(opencv.detect(big), "face")
    assert b is not None
    centre = ((b.x0 + b.x1) / 6, (b.y0 + b.y1) / 6)
    assert a.x0 < centre[0] < a.x1 and a.y0 < centre[1] < a.y1
    assert 0.5 < b.area / (9 * a.area) < 2


def test_min_face_ratio_drops_small_faces_and_photos_without_one(tmp_path, opencv):
    folder = tmp_path / "photos"
    _save(folder, "astronaut.png", skdata.astronaut())
    _save(folder, "coffee.png", skdata.coffee())
    manifest = data.build_manifest(folder)
    kept, recs = framing.frame_manifest(manifest, _d(min_face_ratio=0.02), tmp_path / "run")
    assert [Path(e["file"]).name for e in kept] == ["astronaut.png"]
    by_name = {Path(r["file"]).name: r for r in recs}
    assert by_name["astronaut.png"]["kept"] and "≥ 2%" in by_name["astronaut.png"]["why"]
    assert not by_name["coffee.png"]["kept"] and "no face found" in by_name["coffee.png"]["why"]
    # the notes' 8 %: her face (3.3 % of the frame) is too small, so nothing is left
    with pytest.raises(data.DataError, match=r"min_face_ratio=0\.08 drops every photo.*3\.\d%"):
        framing.frame_manifest(manifest, _d(min_face_ratio=0.08), tmp_path / "run")
    recs = [framing.judge(opencv.detect(Image.fromarray(skdata.astronaut())), (512, 512), _d(min_face_ratio=0.08))]
    assert not recs[0]["kept"] and re.search(r"dropped: face 3\.\d% of the frame < 8%", recs[0]["why"])
    # 0 keeps all, and still records the boxes
    kept, recs = framing.frame_manifest(manifest, _d(), tmp_path / "run")
    assert len(kept) == 2 and all(r["kept"] for r in recs) and recs[0]["boxes"]


def test_crop_to_face_writes_a_square_crop_in_which_the_face_is_large(tmp_path, opencv):
    folder = tmp_path / "photos"
    _save(folder, "astronaut.png", skdata.astronaut())
    (kept,), (rec,) = framing.frame_manifest(data.build_manifest(folder), _d(crop_to="face"), tmp_path / "run")
    x0, y0, x1, y1 = rec["crop"]
    assert x1 - x0 == y1 - y0 and kept["width"] == kept["height"] == x1 - x0
    assert Path(kept["file"]).parent == tmp_path / "run" / framing.FRAMED
    crop = Image.open(kept["file"])
    assert np.array_equal(np.asarray(crop), skdata.astronaut()[y0:y1, x0:x1])
    # the face now fills the frame: 1 / (1 + 2·0.3)² ≈ 0.39 of it
    assert framing.face_ratio(opencv.detect(crop), crop.size) > 0.2


# --------------------------------------------------------------------------- square crops


def _boxes(w: int, h: int, rng: np.random.Generator, n: int = 400) -> list[Box]:
    out = [Box(0, 0, 10, 10, 1, "face"), Box(w - 10, h - 10, w, h, 1, "face"), Box(0, h - 30, 25, h, 1, "body"),
           Box(w - 1, 0, w, 1, 1, "face"), Box(0, 0, w, h, 1, "body"), Box(-5, -5, 20, 40, 1, "body"),
           Box(w - 20.5, 3.25, w + 8, 50.75, 1, "face")]  # the last two reach past the edge
    for _ in range(n):
        x0, x1 = sorted(rng.uniform(0, w, 2))
        y0, y1 = sorted(rng.uniform(0, h, 2))
        out.append(Box(float(x0), float(y0), float(x1) + 0.01, float(y1) + 0.01, 1.0, "face"))
    return out


@pytest.mark.parametrize("size", [(640, 480), (300, 900), (64, 64), (101, 37)])
@pytest.mark.parametrize("margin", [0.0, 0.3, 2.0])
def test_square_crops_are_square_inside_the_photo_and_contain_the_box(size, margin):
    w, h = size
    rng = np.random.default_rng(w * 7 + h)
    for box in _boxes(w, h, rng):
        (x0, y0, x1, y1), fits = framing.square_crop(box, size, margin)
        side = x1 - x0
        assert side == y1 - y0 > 0
        assert 0 <= x0 and x1 <= w and 0 <= y0 and y1 <= h
        bx0, by0 = max(box.x0, 0), max(box.y0, 0)
        bx1, by1 = min(box.x1, w), min(box.y1, h)
        long_side = max(bx1 - bx0, by1 - by0)
        if long_side <= min(w, h) - 1:
            assert fits
        if fits:
            assert x0 <= bx0 and bx1 <= x1 and y0 <= by0 and by1 <= y1, (box, (x0, y0, x1, y1))
            # the margin is there unless the photo's short side stops it
            want = min(min(w, h), max(bx1 - bx0, by1 - by0) * (1 + 2 * margin))
            assert side >= int(want)
        else:  # longer than the short side: the short side, centred on the box as far as it can be
            assert side == min(w, h)
            cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2
            assert x0 <= cx <= x1 and y0 <= cy <= y1


def test_a_box_longer_than_the_short_side_gets_the_short_side_and_a_note():
    rec = framing.judge([Box(100, 50, 550, 350, 1.0, "body")], (640, 400), _d(crop_to="body"))
    assert rec["crop"] == [125, 0, 525, 400]  # the short side, centred on the box (x 325)
    assert "longer than the photo's short side" in rec["crop_note"]
    rec = framing.judge([], (640, 400), _d(crop_to="face"))
    assert rec["crop"] is None and rec["kept"] and "no face found" in rec["crop_note"]


# --------------------------------------------------------------------------- the toy world's oracle


def _renderer_cover(subject, k: int, pos: str, size: str) -> np.ndarray:
    """Coverage of each 64-px cell by the object, from the renderer's geometry (4× supersampled)."""
    from dbkit.toyworld import scenes

    dx, dy = (k % 3) - 1, (k % 2) * 2 - 1  # subjects.photos' jitter of photo k
    cx, cy, r = scenes.object_geometry(scenes.SceneObject(subject.class_noun, "red", "plain", size, pos, dx, dy))
    body = np.asarray(scenes.shape_mask(subject.class_noun, cx, cy, r)) > 127
    return body.reshape(64, 4, 64, 4).mean(axis=(1, 3))


def _bbox(m: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(m)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


@pytest.mark.parametrize("name", ["eyed_heart", "duo_star", "split_square"])
def test_oracle_box_is_the_renderers_object(tmp_path, name):
    from dbkit.toyworld import subjects

    s = subjects.get(name)
    for k, (img, rec) in enumerate(subjects.photos(s)):
        (box,) = detect.OracleDetector().detect(img)
        cover = _renderer_cover(s, k, rec["position"], rec["size"])
        outer, inner = _bbox(cover > 0), _bbox(cover >= 0.999)
        got = (box.x0, box.y0, box.x1, box.y1)
        # between the cells the object fully covers and the cells it touches at all
        assert all(o <= g <= i for o, g, i in zip(outer[:2], got[:2], inner[:2])), (k, got, outer, inner)
        assert all(i <= g <= o for o, g, i in zip(outer[2:], got[2:], inner[2:])), (k, got, outer, inner)
        half = _bbox(cover >= 0.5)
        assert max(abs(g - h) for g, h in zip(got, half)) <= 1
        assert box.label == detect.ANY_KIND and detect.largest([box], "face") == box


def test_toy_world_data_page_records_boxes_and_crops_with_their_masks(in_tmp):
    exp = config.load("params/base.yaml", ["data.instance_images=toyworld:eyed_heart", "data.detector=oracle",
                                           "data.crop_to=body", "data.crop_margin=0.1", "train.masked_loss=true",
                                           "prior.enabled=false", "experiment=t"])
    rd = in_tmp / "run"
    rd.mkdir()
    info = workflow.prepare_data(exp, rd)
    saved = json.loads((rd / "data.json").read_text())
    assert saved["detections"] == info["detections"] and len(info["detections"]) == 3
    manifest = workflow.read_jsonl(rd / "manifest.jsonl")
    for entry, rec in zip(manifest, info["detections"]):
        x0, y0, x1, y1 = rec["crop"]
        b = rec["boxes"][0]
        assert x1 - x0 == y1 - y0 and x0 <= b["x0"] and b["x1"] <= x1 and y0 <= b["y0"] and b["y1"] <= y1
        crop = Path(entry["file"])
        assert crop.parent.name == framing.FRAMED and entry["source_file"] == rec["file"]
        mask = masks.load_mask(crop)  # written beside the crop: the oracle's mask, cropped alike
        full = masks.load_mask(Path(rec["file"]), toy=True)
        assert np.array_equal(np.asarray(mask), np.asarray(full.crop(tuple(rec["crop"]))))
    grids = workflow.detection_grid(rd)
    assert grids and grids[0].width > 3 * 128
    assert "Detections" in workflow.data_markdown(info)


# --------------------------------------------------------------------------- params


def test_params_refuse_filters_without_a_detector_and_missing_yolo_weights(in_tmp):
    with pytest.raises(config.ConfigError, match=r"data\.min_face_ratio.*needs a detector"):
        config.load("params/base.yaml", ["data.min_face_ratio=0.08"], check_files=False)
    with pytest.raises(config.ConfigError, match=r"data\.crop_to.*needs a detector"):
        config.load("params/base.yaml", ["data.crop_to=face"], check_files=False)
    folder = in_tmp / "photos"
    _save(folder, "a.png", skdata.coffee())
    with pytest.raises(config.ConfigError, match=r"data\.detector.*oracle.*toy world"):
        config.load("params/base.yaml", [f"data.instance_images={folder}", "data.detector=oracle"], check_files=False)
    with pytest.raises(config.ConfigError, match=r"data\.detector_model.*'models/face\.pt' does not exist"):
        config.load("params/base.yaml", ["data.detector=yolo", "data.detector_model=models/face.pt"])
    with pytest.raises(config.ConfigError, match=r"data\.detector_model.*does not exist"):
        config.load("params/base.yaml", ["data.detector=opencv", "data.detector_model=nowhere.pt"])


def test_yolo_without_ultralytics_names_the_package_and_key(in_tmp):
    import importlib.util

    if importlib.util.find_spec("ultralytics") is not None:
        pytest.skip("ultralytics is installed here")
    weights = in_tmp / "face.pt"
    weights.write_bytes(b"not read")
    with pytest.raises(config.ConfigError, match=r"data\.detector.*ultralytics.*pip install ultralytics"):
        config.load("params/base.yaml", ["data.detector=yolo", f"data.detector_model={weights}"])
    with pytest.raises(detect.DetectorError, match=r"ultralytics"):
        detect.make_detector(_d(detector="yolo", detector_model=str(weights)))


# --------------------------------------------------------------------------- matting


def _photo_and_mask(folder: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)
    m = np.zeros((48, 80), np.uint8)
    m[4:30, 6:40] = 255
    m[30:40, 6:40] = 100  # a soft edge
    f = _save(folder, "p.png", rgb)
    Image.fromarray(m, "L").save(masks.mask_path(f))
    return f, rgb, m


def test_matte_with_the_users_mask_composites_on_the_colour_and_keeps_the_mask(tmp_path):
    f, rgb, m = _photo_and_mask(tmp_path / "photos")
    d = {"matte": "mask", "matte_model": "", "matte_background": "#204080"}
    (entry,) = matting.matte_manifest(data.build_manifest(f.parent), d, tmp_path / "run")
    out = Path(entry["file"])
    assert out.parent == tmp_path / "run" / matting.MATTED and entry["matted_from"] == str(f)
    a = m[..., None].astype(np.float64) / 255
    want = rgb * a + np.array([0x20, 0x40, 0x80]) * (1 - a)  # by hand: photo over colour, blended by the mask
    assert np.abs(np.asarray(Image.open(out), np.float64) - want).max() <= 1
    assert np.array_equal(np.asarray(Image.open(masks.mask_path(out))), m)
    # "" keeps the photo and writes only its mask (for masked loss)
    (entry,) = matting.matte_manifest(data.build_manifest(f.parent), d | {"matte_background": ""}, tmp_path / "r2")
    assert np.array_equal(np.asarray(Image.open(entry["file"])), rgb)


def test_rembg_backend_reads_a_local_model_through_rembg(tmp_path, monkeypatch):
    """rembg is not installed here: a stand-in module checks dbkit's side of the call (a
    u2net_custom session on the local file, only_mask=True) and that its mask is the one used."""
    import sys
    import types

    f, rgb, m = _photo_and_mask(tmp_path / "photos")
    model = tmp_path / "u2net.onnx"
    model.write_bytes(b"onnx")
    calls = {}
    fake = types.ModuleType("rembg")
    fake.new_session = lambda name, **kw: calls.setdefault("session", (name, kw)) and "S"
    fake.remove = lambda im, session, only_mask: calls.setdefault("remove", (session, only_mask)) and Image.fromarray(m)
    monkeypatch.setitem(sys.modules, "rembg", fake)
    d = {"matte": "rembg", "matte_model": str(model), "matte_background": "black"}
    (entry,) = matting.matte_manifest(data.build_manifest(f.parent), d, tmp_path / "run")
    assert calls["session"] == ("u2net_custom", {"model_path": str(model.resolve())})
    assert calls["remove"] == ("S", True)
    assert np.array_equal(np.asarray(Image.open(masks.mask_path(Path(entry["file"])))), m)


def test_matting_params_name_the_key_and_package(in_tmp):
    import importlib.util

    folder = in_tmp / "photos"
    _save(folder, "a.png", skdata.coffee())
    with pytest.raises(config.ConfigError, match=r"data\.matte.*a\.png.*mask\.png"):
        config.load("params/base.yaml", [f"data.instance_images={folder}", "data.matte=mask"])
    with pytest.raises(config.ConfigError, match=r"data\.matte_model.*'u2net\.onnx' does not exist"):
        config.load("params/base.yaml", ["data.matte=rembg", "data.matte_model=u2net.onnx"])
    with pytest.raises(config.ConfigError, match=r"data\.matte_background.*not a colour"):
        config.load("params/base.yaml", ["data.matte_background=blurple"], check_files=False)
    if importlib.util.find_spec("rembg") is None:
        (in_tmp / "u2net.onnx").write_bytes(b"onnx")
        with pytest.raises(config.ConfigError, match=r"data\.matte.*pip install rembg"):
            config.load("params/base.yaml", ["data.matte=rembg", "data.matte_model=u2net.onnx"])
        with pytest.raises(matting.MattingError, match=r"rembg"):
            matting.make_matter({"matte": "rembg", "matte_model": str(in_tmp / "u2net.onnx")})


# --------------------------------------------------------------------------- ONNX


def _onnx_detector(path: Path, rows: list[list[float]], side: int = 640) -> Path:
    """A YOLOv8-layout ONNX model whose output is fixed: [1, 4 + 2 classes, N] (cx, cy, w, h,
    score person, score face), names {0: person, 1: face} in its metadata. The input feeds
    the output through ×0, so the graph reads it as a real detector would."""
    import onnx
    from onnx import TensorProto, helper

    out = np.array(rows, np.float32).T[None]  # [1, 6, N]
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["images"], ["s"], keepdims=0),
         helper.make_node("Mul", ["s", "zero"], ["z"]),
         helper.make_node("Add", ["fixed", "z"], ["output0"])],
        "det", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, side, side])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, list(out.shape))],
        [helper.make_tensor("fixed", TensorProto.FLOAT, out.shape, out.ravel()),
         helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {"names": "{0: 'person', 1: 'face'}"})
    onnx.save(model, path)
    return path


def test_onnx_detector_maps_letterboxed_boxes_back_and_keeps_the_best_of_overlaps(tmp_path):
    pytest.importorskip("onnxruntime")
    rows = [[320, 320, 64, 64, 0.05, 0.9],   # a face in the middle of the 640² input
            [322, 318, 60, 66, 0.0, 0.6],    # the same face again, weaker: suppressed
            [100, 400, 80, 160, 0.7, 0.1],   # a person
            [500, 300, 40, 40, 0.0, 0.1]]    # below the confidence threshold
    model = _onnx_detector(tmp_path / "det.onnx", rows)
    det = detect.make_detector(_d(detector="onnx", detector_model=str(model)))
    boxes = det.detect(Image.new("RGB", (1000, 500)))
    # by hand: 1000×500 → ×0.64 = 640×320, padded 160 px above; back = (v − pad) / 0.64
    face = [b for b in boxes if b.label == "face"]
    assert len(face) == 1 and face[0].score == pytest.approx(0.9)
    assert (face[0].x0, face[0].y0, face[0].x1, face[0].y1) == pytest.approx(
        ((320 - 32) / 0.64, (288 - 160) / 0.64, (352) / 0.64, (352 - 160) / 0.64))
    (body,) = [b for b in boxes if b.label == "body"]
    assert (body.x0, body.y0, body.x1, body.y1) == pytest.approx((60 / 0.64, (320 - 160) / 0.64, 140 / 0.64,
                                                                  (480 - 160) / 0.64))
    assert len(boxes) == 2
    with pytest.raises(config.ConfigError, match=r"data\.detector_model.*does not exist"):
        config.load("params/base.yaml", ["data.detector=onnx", "data.detector_model=none.onnx"])

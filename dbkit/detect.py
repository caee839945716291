"""Subject detectors: one interface (`detect(image) -> list[Box]`), several backends.

`data.detector` picks the backend; what the boxes are used for (the face-ratio filter and
square crops) lives in dbkit.framing.

- `opencv`: the Haar cascades shipped with opencv-python (frontal and profile face, upper
  body, full body) and OpenCV's HOG people detector. Offline and fast; classic detectors,
  so they miss turned or partly hidden faces and now and then fire on texture.
- `oracle`: the toy world. The renderer draws one object on a flat background; its box is
  read from the pixels (the oracle's object mask), labelled `subject`, and stands for every
  kind (face, upper body, body), so filters and crops can be tried on the toy world.
- `yolo`: an ultralytics YOLO model from a local weights file (`data.detector_model`),
  e.g. a face model (class `face`) or COCO (`person` → body). ultralytics is imported only
  here; missing, it is one error naming the package and the key.
- `onnx`: a YOLOv8-style ONNX export (`yolo export format=onnx`: input [1, 3, S, S] RGB in
  0–1, letterboxed; output [1, 4 + classes, N] of centre/size boxes in input pixels and class
  scores; class names in the model's `names` metadata), run by onnxruntime: no ultralytics.

Boxes are in the upright photo's pixels. Big photos are searched at most MAX_SIDE px long
(detectors look for objects of tens of pixels; a 12-MP photo would take seconds per cascade).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

BACKENDS = ("none", "opencv", "oracle", "yolo", "onnx")
KINDS = ("face", "upper_body", "body")
ANY_KIND = "subject"  # the oracle's label: the whole subject, standing for every kind
MAX_SIDE = 640


class DetectorError(RuntimeError):
    """A detector that cannot run; the message names the key or package and what to do."""


@dataclasses.dataclass(frozen=True)
class Box:
    """A detection: corners in pixels (x1, y1 exclusive), the backend's own confidence
    (Haar: level weight, HOG: SVM margin, YOLO: probability, oracle: 1) and a label of KINDS
    or ANY_KIND."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float
    label: str

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        return max(0.0, self.width) * max(0.0, self.height)

    def scaled(self, s: float) -> Box:
        return Box(self.x0 * s, self.y0 * s, self.x1 * s, self.y1 * s, self.score, self.label)

    def as_dict(self) -> dict:
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}


class Detector(Protocol):
    def detect(self, im: Image.Image) -> list[Box]: ...


def of_kind(boxes: list[Box], kind: str) -> list[Box]:
    """The boxes of one kind (the oracle's whole-subject box counts as every kind)."""
    return [b for b in boxes if b.label in (kind, ANY_KIND)]


def largest(boxes: list[Box], kind: str) -> Box | None:
    """The largest box of `kind`: the subject of a portrait is its biggest face."""
    return max(of_kind(boxes, kind), key=lambda b: (b.area, b.score), default=None)


def make_detector(d: dict) -> Detector | None:
    """The backend `data.detector` names (None for `none`)."""
    name = d["detector"]
    if name == "none":
        return None
    if name == "opencv":
        return OpenCVDetector()
    if name == "oracle":
        return OracleDetector()
    if name == "yolo":
        return YoloDetector(d["detector_model"])
    if name == "onnx":
        return OnnxDetector(d["detector_model"])
    raise DetectorError(f"data.detector is {name!r}; allowed values: {', '.join(BACKENDS)}")


def _shrunk(im: Image.Image) -> tuple[Image.Image, float]:
    """The image at most MAX_SIDE px long, and the factor that takes its boxes back."""
    s = min(1.0, MAX_SIDE / max(im.size))
    if s == 1.0:
        return im, 1.0
    return im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.BILINEAR), 1 / s


class OpenCVDetector:
    """Haar cascades (face: frontal + profile, and the profile mirrored for the other
    side; upper body; full body) and the HOG people detector (body)."""

    CASCADES = {"face": ("haarcascade_frontalface_default.xml", "haarcascade_profileface.xml"),
                "upper_body": ("haarcascade_upperbody.xml",), "body": ("haarcascade_fullbody.xml",)}

    def __init__(self) -> None:
        import cv2

        self.cv2 = cv2
        self.cascades = {kind: [self._cascade(f) for f in files] for kind, files in self.CASCADES.items()}
        self.hog = cv2.HOGDescriptor()
        self.hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())

    def _cascade(self, name: str):
        c = self.cv2.CascadeClassifier(self.cv2.data.haarcascades + name)
        if c.empty():
            raise DetectorError(f"data.detector=opencv: OpenCV's {name} is missing from {self.cv2.data.haarcascades}; "
                                "reinstall opencv-python-headless")
        return c

    def detect(self, im: Image.Image) -> list[Box]:
        small, back = _shrunk(im.convert("RGB"))
        rgb = np.asarray(small)
        grey = self.cv2.equalizeHist(self.cv2.cvtColor(rgb, self.cv2.COLOR_RGB2GRAY))
        out = []
        for kind, cascades in self.cascades.items():
            for k, c in enumerate(cascades):
                out += self._haar(c, grey, kind)
                if kind == "face" and k == 1:  # the profile cascade sees faces turned one way only
                    w = grey.shape[1]
                    mirrored = self._haar(c, grey[:, ::-1], kind)
                    out += [Box(w - b.x1, b.y0, w - b.x0, b.y1, b.score, kind) for b in mirrored]
        rects, weights = self.hog.detectMultiScale(rgb, winStride=(8, 8))
        out += [Box(float(x), float(y), float(x + w), float(y + h), float(s), "body")
                for (x, y, w, h), s in zip(rects, np.ravel(weights))]
        return [b.scaled(back) for b in out]

    def _haar(self, cascade, grey: np.ndarray, kind: str) -> list[Box]:
        min_side = max(12, min(grey.shape) // 20)  # smaller than 5% of the short side: noise
        rects, _, weights = cascade.detectMultiScale3(np.ascontiguousarray(grey), scaleFactor=1.1, minNeighbors=5,
                                                      minSize=(min_side, min_side), outputRejectLevels=True)
        return [Box(float(x), float(y), float(x + w), float(y + h), float(s), kind)
                for (x, y, w, h), s in zip(rects, np.ravel(weights))]


class OracleDetector:
    """The toy world's subject box: the bounding box of the oracle's object mask."""

    def detect(self, im: Image.Image) -> list[Box]:
        from .toyworld import oracle

        a = np.asarray(im.convert("RGB"), dtype=np.float32)
        _, bg = oracle.background_of(a)
        ys, xs = np.nonzero(oracle.object_mask(a, bg))
        if len(xs) == 0:
            return []
        return [Box(float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1), 1.0, ANY_KIND)]


# labels a YOLO model may use, mapped to KINDS (COCO's person is a whole body)
YOLO_LABELS = {"face": "face", "person": "body", "body": "body", "upper_body": "upper_body", "upperbody": "upper_body"}


class YoloDetector:
    """An ultralytics YOLO model read from a local weights file."""

    def __init__(self, weights: str) -> None:
        if not weights or not Path(weights).is_file():
            raise DetectorError(f"data.detector is yolo but data.detector_model {weights!r} is not a file: point it "
                                "at local YOLO weights (e.g. a yolov8 face or person .pt)")
        try:
            from ultralytics import YOLO
        except ImportError as e:
            raise DetectorError("data.detector is yolo, which needs the ultralytics package: `pip install "
                                "ultralytics`, or set data.detector: opencv") from e
        self.model = YOLO(weights)

    def detect(self, im: Image.Image) -> list[Box]:
        result = self.model.predict(im.convert("RGB"), verbose=False)[0]
        names = result.names
        out = []
        for xyxy, conf, cls in zip(result.boxes.xyxy.tolist(), result.boxes.conf.tolist(), result.boxes.cls.tolist()):
            label = YOLO_LABELS.get(str(names[int(cls)]).lower())
            if label:
                out.append(Box(*map(float, xyxy), float(conf), label))
        return out


class OnnxDetector:
    """A YOLOv8-style ONNX detector run by onnxruntime (see the module docstring for the
    layout): letterbox, one forward pass, confidence threshold, per-class NMS (OpenCV's)."""

    CONF, IOU = 0.25, 0.45

    def __init__(self, model: str) -> None:
        import ast

        import onnxruntime as ort

        if not model or not Path(model).is_file():
            raise DetectorError(f"data.detector is onnx but data.detector_model {model!r} is not a file: point it at "
                                "a local YOLOv8-style .onnx export")
        self.session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name, self.side = inp.name, int(inp.shape[-1]) if isinstance(inp.shape[-1], int) else 640
        names = self.session.get_modelmeta().custom_metadata_map.get("names", "{}")
        try:
            self.names = {int(k): str(v) for k, v in ast.literal_eval(names).items()}
        except (ValueError, SyntaxError) as e:
            raise DetectorError(f"{model}: its 'names' metadata {names[:80]!r} is not a class dict like "
                                "{0: 'person'}; export it with ultralytics") from e

    def detect(self, im: Image.Image) -> list[Box]:
        import cv2

        x, scale, (pad_x, pad_y) = letterbox(im.convert("RGB"), self.side)
        (out,) = self.session.run(None, {self.input_name: x})[:1]
        pred = out[0].T  # [N, 4 + classes]
        cls = pred[:, 4:].argmax(1)
        conf = pred[np.arange(len(pred)), 4 + cls]
        keep = conf >= self.CONF
        pred, cls, conf = pred[keep], cls[keep], conf[keep]
        cx, cy, w, h = pred[:, 0], pred[:, 1], pred[:, 2], pred[:, 3]
        xyxy = np.stack([(cx - w / 2 - pad_x) / scale, (cy - h / 2 - pad_y) / scale,
                         (cx + w / 2 - pad_x) / scale, (cy + h / 2 - pad_y) / scale], 1)
        out_boxes = []
        for c in np.unique(cls):
            idx = np.nonzero(cls == c)[0]
            rects = [[float(a), float(b), float(e - a), float(f - b)] for a, b, e, f in xyxy[idx]]
            kept = cv2.dnn.NMSBoxes(rects, conf[idx].astype(float).tolist(), self.CONF, self.IOU)
            label = YOLO_LABELS.get(self.names.get(int(c), "").lower())
            if label:
                out_boxes += [Box(*map(float, xyxy[idx[k]]), float(conf[idx[k]]), label) for k in np.ravel(kept)]
        return out_boxes


def letterbox(im: Image.Image, side: int) -> tuple[np.ndarray, float, tuple[int, int]]:
    """The image scaled to fit `side`×`side`, centred on grey (114, as YOLO pads), as a
    [1, 3, side, side] float array in 0–1; with the scale and the (left, top) padding."""
    scale = min(side / im.width, side / im.height)
    w, h = round(im.width * scale), round(im.height * scale)
    canvas = Image.new("RGB", (side, side), (114, 114, 114))
    left, top = (side - w) // 2, (side - h) // 2
    canvas.paste(im.resize((w, h), Image.Resampling.BILINEAR), (left, top))
    x = np.asarray(canvas, dtype=np.float32).transpose(2, 0, 1)[None] / 255.0
    return x, scale, (left, top)

"""Filter and frame instance photos by what a detector (dbkit.detect) finds in them.

- `data.min_face_ratio`: drop a photo whose largest face box covers less than this share of
  the frame (the notes use 0.08: a face of a few pixels teaches the model little about it).
  A photo in which no face is found counts as ratio 0 and is dropped. The ratio is measured
  on the photo as given, before any crop: a crop enlarges the face, not its pixel count.
- `data.crop_to: face | upper_body | body`: a square around the largest box of that kind,
  `data.crop_margin` × the box's long side added on each side, moved (never shrunk) to lie
  inside the photo. A box longer than the photo's short side cannot fit in any square of the
  photo: the square is then the short side, centred on the box, and the box's ends are cut
  (the record says so). A photo without a box of that kind is kept whole, with a note.

Cropped photos are written to `<run>/framed/` (PNG, with their masks cropped alike as
`<stem>.mask.png`), and the manifest points at them: captions, masks and training read the
crop. Every decision (boxes, ratio, threshold, verdict, crop) is recorded for data.json and
drawn on the 01_data page.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

from . import detect, masks
from .data import THUMB, DataError, file_digest, open_rgb, write_png

CROP_KINDS = ("none", *detect.KINDS)
FRAMED = "framed"  # subfolder of the run folder holding the cropped photos


def face_ratio(boxes: list[detect.Box], size: tuple[int, int]) -> float:
    """Area of the largest face box over the frame's area (0 when there is no face)."""
    face = detect.largest(boxes, "face")
    return 0.0 if face is None else face.area / (size[0] * size[1])


def clip_box(box: detect.Box, size: tuple[int, int]) -> detect.Box:
    """The box clipped to the photo (detectors may reach past the edge)."""
    w, h = size
    return detect.Box(min(max(box.x0, 0), w), min(max(box.y0, 0), h), min(max(box.x1, 0), w),
                      min(max(box.y1, 0), h), box.score, box.label)


def square_crop(box: detect.Box, size: tuple[int, int], margin: float) -> tuple[tuple[int, int, int, int], bool]:
    """((x0, y0, x1, y1), fits): a square of the photo around `box` with `margin` × its long
    side on each side, moved to lie inside the photo. `fits` is False when the box is longer
    than the photo's short side: the square is then the short side, centred on the box."""
    w, h = size
    b = clip_box(box, size)
    bx0, by0, bx1, by1 = math.floor(b.x0), math.floor(b.y0), math.ceil(b.x1), math.ceil(b.y1)
    need = max(bx1 - bx0, by1 - by0, 1)
    side = min(min(w, h), max(need, math.ceil(max(b.width, b.height) * (1 + 2 * margin))))
    fits = need <= side

    def place(lo: int, hi: int, centre: float, length: int) -> int:
        start = round(centre - side / 2)
        if fits:  # keep the whole box inside the window
            start = min(max(start, hi - side), lo)
        return min(max(start, 0), length - side)

    x0 = place(bx0, bx1, (b.x0 + b.x1) / 2, w)
    y0 = place(by0, by1, (b.y0 + b.y1) / 2, h)
    return (x0, y0, x0 + side, y0 + side), fits


def judge(boxes: list[detect.Box], size: tuple[int, int], d: dict) -> dict:
    """The record of one photo: its boxes, face ratio, verdict and why, and crop."""
    threshold = d["min_face_ratio"]
    ratio = face_ratio(boxes, size)
    rec = {"boxes": [b.as_dict() for b in boxes], "face_ratio": round(ratio, 4), "min_face_ratio": threshold,
           "kept": True, "why": "kept (no face filter)", "crop": None, "crop_note": ""}
    if threshold > 0:
        rec["kept"] = ratio >= threshold
        if detect.largest(boxes, "face") is None:
            rec["why"] = f"dropped: no face found (data.min_face_ratio {threshold:g})"
        else:
            cmp = "≥" if rec["kept"] else "<"
            rec["why"] = (f"{'kept' if rec['kept'] else 'dropped'}: face {100 * ratio:.1f}% of the frame {cmp} "
                          f"{100 * threshold:g}%")
    kind = d["crop_to"]
    if kind != "none" and rec["kept"]:
        box = detect.largest(boxes, kind)
        if box is None:
            rec["crop_note"] = f"no {kind} found: kept whole"
        else:
            crop, fits = square_crop(box, size, d["crop_margin"])
            rec["crop"] = list(crop)  # as data.json holds it
            side = rec["crop"][2] - rec["crop"][0]
            rec["crop_note"] = (f"square {side} px around the {kind}" if fits else
                                f"the {kind} is longer than the photo's short side: square {side} px centred on it, "
                                "its ends cut")
    return rec


def frame_manifest(manifest: list[dict], d: dict, rd: Path, *, toy: bool = False) -> tuple[list[dict], list[dict]]:
    """Detect, filter and crop the manifest's photos. Returns (the kept entries, pointing at
    their crops where cropped, and one record per photo for data.json)."""
    detector = detect.make_detector(d)
    if detector is None:
        return manifest, []
    kept, records = [], []
    for entry in manifest:
        path = Path(entry["file"])
        im = open_rgb(path)
        rec = {"file": str(path), **judge(detector.detect(im), im.size, d)}
        records.append(rec)
        if rec["kept"]:
            kept.append(entry if rec["crop"] is None else write_crop(entry, im, rec["crop"], rd / FRAMED, toy))
    if not kept:
        best = max(r["face_ratio"] for r in records)
        raise DataError(f"{Path(manifest[0]['file']).parent}: data.min_face_ratio={d['min_face_ratio']} drops every "
                        f"photo (the largest face covers {100 * best:.1f}% of its frame); lower it, or crop the "
                        "photos closer to the face")
    return kept, records


def write_crop(entry: dict, im: Image.Image, box: tuple[int, int, int, int], folder: Path, toy: bool) -> dict:
    """Save the crop (and its mask, if the photo has one) and return the entry pointing at it."""
    src = Path(entry["file"])
    out = folder / (src.name if src.suffix.lower() == ".png" else src.name + ".png")
    write_png(out, im.crop(box))
    mask = masks.load_mask(src, toy=toy)
    if mask is not None:
        write_png(masks.mask_path(out), mask.crop(box))
    elif masks.mask_path(out).exists():
        masks.mask_path(out).unlink()
    w, h = box[2] - box[0], box[3] - box[1]
    return {**entry, "file": str(out), "source_file": str(src), "crop": list(box), "width": w, "height": h,
            "sha256": file_digest(out)}




COLOURS = {"face": (255, 60, 60), "upper_body": (255, 200, 0), "body": (60, 160, 255), detect.ANY_KIND: (255, 0, 255)}


def draw(path: Path, rec: dict, max_side: int = THUMB) -> Image.Image:
    """A thumbnail of the photo with its boxes (red face, yellow upper body, blue body,
    magenta the oracle's subject) and its crop square (white); dropped photos are dimmed."""
    im = open_rgb(path)
    s = min(1.0, max_side / max(im.size)) if max(im.size) > max_side else max(1.0, 128 / max(im.size))
    im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))),
                   Image.Resampling.LANCZOS if s < 1 else Image.Resampling.NEAREST)
    if not rec["kept"]:
        im = Image.blend(im, Image.new("RGB", im.size, (0, 0, 0)), 0.55)
    d = ImageDraw.Draw(im)
    line = max(1, round(max(im.size) / 128))
    for b in rec["boxes"]:
        d.rectangle([b["x0"] * s, b["y0"] * s, b["x1"] * s - 1, b["y1"] * s - 1], outline=COLOURS[b["label"]],
                    width=line)
    if rec["crop"]:
        x0, y0, x1, y1 = rec["crop"]
        d.rectangle([x0 * s, y0 * s, x1 * s - 1, y1 * s - 1], outline=(255, 255, 255), width=line)
    return im


def caption(rec: dict) -> str:
    """The line under a photo on the data page: its name, verdict and crop."""
    note = f", {rec['crop_note']}" if rec["crop_note"] else ""
    return f"{Path(rec['file']).name}: {rec['why']}{note}".replace("≥", ">=")  # the grid's font has no ≥ (nor ;)

"""The image catalogue: odd, broken and huge pictures a user's photo folder really holds.

Each case asserts what the user gets (the error naming the file, the warning text, or the
pixel values computed by hand) and that the user's files are untouched.
"""

from __future__ import annotations

import io
import json
import logging
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dbkit import data, report

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def pixels(im: Image.Image) -> list:
    """The pixels of a one-row image, left to right."""
    return [im.getpixel((x, 0)) for x in range(im.width)]


def folder(tmp_path: Path, files: dict[str, bytes], good: int = 3) -> Path:
    """`files` plus `good` ordinary 16×16 PNGs (good_0.png …), in tmp_path/photos."""
    d = tmp_path / "photos"
    d.mkdir()
    for k in range(good):
        (d / f"good_{k}.png").write_bytes(encode(Image.new("RGB", (16, 16), (40 * k, 90, 200))))
    for name, content in files.items():
        (d / name).write_bytes(content)
    return d


@contextmanager
def untouched(d: Path) -> Iterator[None]:
    """The folder's files, byte for byte, and no new ones, after the block."""
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    yield
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that declares w×h greyscale pixels and holds almost none: what a decompression
    bomb looks like to the opener (Pillow reads the size before any pixel)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) \
        + png_chunk(b"IEND", b"")


def bad_error(d: Path, **kw) -> str:
    with untouched(d), pytest.raises(data.DataError) as e:
        data.scan(d, **kw)
    return str(e.value)


# --------------------------------------------------------------------------- modes: correct pixels


def test_16bit_png_is_scaled_not_clipped_to_white(tmp_path: Path) -> None:
    g16 = np.kron(np.array([[0, 1000], [40000, 65535]], np.uint16), np.ones((4, 4), np.uint16))  # 8×8
    d = folder(tmp_path, {"depth16.png": encode(Image.fromarray(g16))})
    assert Image.open(d / "depth16.png").mode == "I;16"
    with untouched(d):
        found = data.scan(d)
        im = data.open_rgb(d / "depth16.png")
    assert [r["width"] for r in found.manifest] == [8, 16, 16, 16] and found.warnings == []
    # round(v · 255 / 65535): 1000 → 3.89 → 4, 40000 → 155.6 → 156 (Pillow's convert gave 255, 255, 255)
    assert np.asarray(im)[::4, ::4, 0].tolist() == [[0, 4], [156, 255]]
    assert im.mode == "RGB" and np.asarray(im).std(axis=2).max() == 0  # grey stays grey


def test_palette_png_with_transparency_is_composited_on_white(tmp_path: Path) -> None:
    im = Image.new("P", (4, 1))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.putdata([0, 1, 0, 1])
    im = im.resize((16, 8), Image.Resampling.NEAREST)  # 4 stripes, 4 px wide
    d = folder(tmp_path, {"palette.png": encode(im, transparency=0)})  # index 0 (red) is transparent
    with untouched(d):
        data.scan(d)
        got = data.open_rgb(d / "palette.png")
    assert [got.getpixel((x, 3)) for x in (0, 4, 8, 12)] == [WHITE, BLUE, WHITE, BLUE]


def test_rgba_transparency_becomes_white_not_black(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(0, 0, 0, 0), (255, 0, 0, 128), (0, 255, 0, 255)])
    d = folder(tmp_path, {"cutout.png": encode(rgba)})
    with untouched(d):
        got = pixels(data.open_rgb(d / "cutout.png"))
    # half-transparent red over white: G = B = 255 · (1 − 128/255) = 127
    assert got[0] == WHITE and got[2] == (0, 255, 0)
    assert got[1][0] == 255 and abs(got[1][1] - 127) <= 1 and got[1][1] == got[1][2]


def test_la_grey_with_alpha_is_composited_on_white(tmp_path: Path) -> None:
    la = Image.new("LA", (2, 1))
    la.putdata([(100, 0), (100, 255)])
    d = folder(tmp_path, {"grey_alpha.png": encode(la)})
    with untouched(d):
        assert pixels(data.open_rgb(d / "grey_alpha.png")) == [WHITE, (100, 100, 100)]


def test_greyscale_png_becomes_equal_rgb(tmp_path: Path) -> None:
    d = folder(tmp_path, {"grey.png": encode(Image.new("L", (8, 8), 77))})
    with untouched(d):
        assert data.open_rgb(d / "grey.png").getpixel((3, 3)) == (77, 77, 77)


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path: Path) -> None:
    d = folder(tmp_path, {"print.jpg": encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)})
    with untouched(d):
        data.scan(d)
        r, g, b = data.open_rgb(d / "print.jpg").getpixel((8, 8))
    assert r >= 250 and g <= 5 and b <= 5  # C=0 M=Y=100% K=0 is red


def test_exif_rotated_jpeg_is_read_upright(tmp_path: Path) -> None:
    stored = Image.new("RGB", (40, 20), RED)
    stored.paste(BLUE, (20, 0, 40, 20))  # left half red, right half blue, as the sensor stored it
    exif = Image.Exif()
    exif[data.EXIF_ORIENTATION] = 6  # "turn 90° clockwise to view": the left side goes on top
    d = folder(tmp_path, {"portrait.jpg": encode(stored, "JPEG", quality=95, exif=exif.tobytes())})
    with untouched(d):
        rec = next(r for r in data.scan(d).manifest if r["file"].endswith("portrait.jpg"))
        im = data.open_rgb(d / "portrait.jpg")
        thumb = data.open_rgb(d / "portrait.jpg", max_side=10)
    assert (rec["width"], rec["height"]) == (20, 40) == im.size and thumb.size == (5, 10)
    top, bottom = im.getpixel((10, 5)), im.getpixel((10, 35))
    assert top[0] > 240 and top[2] < 15 and bottom[2] > 240 and bottom[0] < 15


# --------------------------------------------------------------------------- warnings


def test_100_to_1_strip_warns_and_says_what_crop_is_taken(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = folder(tmp_path, {"strip.png": encode(Image.new("RGB", (3000, 30), (10, 200, 10)))})
    with untouched(d), caplog.at_level(logging.WARNING, logger="dbkit.data"):
        found = data.scan(d, crop={"resolution": 64, "center_crop": True, "buckets": False})
    expected = ("strip.png is 3000×30 (about 100:1): training takes a centred square, 30×30 px (1% of the "
                "picture); crop the photo around the subject to choose what is kept")
    assert found.warnings == [expected] and expected in caplog.messages
    bucketed = data.scan(d, crop={"resolution": 64, "center_crop": True, "buckets": True}).warnings
    assert "the centre of its 128×32 bucket, 120×30 px (4% of the picture)" in bucketed[0]


def test_heic_beside_pngs_is_named_in_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = folder(tmp_path, {"IMG_0001.heic": b"\0\0\0\x18ftypheic" + bytes(64), "notes.md": b"# shoot"})
    with untouched(d), caplog.at_level(logging.WARNING, logger="dbkit.data"):
        found = data.scan(d)
    assert [Path(r["file"]).name for r in found.manifest] == ["good_0.png", "good_1.png", "good_2.png"]
    assert found.warnings == [f"{d}: skipped IMG_0001.heic: dbkit reads .png .jpg .jpeg .webp .bmp only; "
                              "convert them to JPEG or PNG to train on them"]
    assert caplog.messages == found.warnings


def test_only_heic_files_is_an_error_naming_them(tmp_path: Path) -> None:
    d = folder(tmp_path, {"a.heic": b"x", "b.avif": b"y"}, good=0)
    assert "no images (.png, .jpg, .jpeg, .webp, .bmp) found (found a.heic, b.avif: convert them to JPEG or " \
           "PNG); add some" in bad_error(d)


def test_a_single_photo_warns(tmp_path: Path) -> None:
    d = folder(tmp_path, {}, good=1)
    with untouched(d):
        found = data.scan(d)
    assert len(found.manifest) == 1
    assert found.warnings == [f"{d}: only 1 photo(s); DreamBooth needs at least 3 views of the subject (other "
                              "backgrounds, poses) to tell it from the scene"]
    assert data.scan(d, instance=False).warnings == []  # a class folder is not a subject's photos


# --------------------------------------------------------------------------- bad files: fail, or skip


def test_zero_byte_file_fails_naming_it(tmp_path: Path) -> None:
    msg = bad_error(folder(tmp_path, {"empty.jpg": b""}))
    assert "1 image(s) cannot be used:\n  empty.jpg: empty file (0 bytes)\n" in msg
    assert msg.endswith("fix or remove them, or set data.on_bad_image: skip to train without them")


def test_truncated_jpeg_fails_naming_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    whole = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    msg = bad_error(folder(tmp_path, {"cut.jpg": whole[: len(whole) // 2]}))
    assert "  cut.jpg: damaged or truncated (image file is truncated" in msg and "re-save or re-copy it" in msg


def test_text_file_named_png_fails_naming_it(tmp_path: Path) -> None:
    msg = bad_error(folder(tmp_path, {"readme.png": b"these are my dog photos\n"}))
    assert "  readme.png: not an image Pillow can read (a wrong extension, or not a picture)" in msg


@pytest.mark.parametrize("side", [50_000, 10_000])  # over Pillow's error limit, and in its warning range
def test_decompression_bomb_fails_naming_it_without_decoding(tmp_path: Path, side: int) -> None:
    msg = bad_error(folder(tmp_path, {"bomb.png": png_header_only(side, side)}))
    assert f"  bomb.png: too many pixels to open safely (Pillow's decompression-bomb guard: Image size " \
           f"({side * side} pixels) exceeds limit" in msg
    assert "downscale it below 89 MP" in msg


def test_tiny_image_fails_naming_it(tmp_path: Path) -> None:
    msg = bad_error(folder(tmp_path, {"icon.png": encode(Image.new("RGB", (4, 4)))}))
    assert "  icon.png: 4×4 is too small to train on; use ≥ 8px" in msg


def _many_bad(tmp_path: Path) -> Path:
    return folder(tmp_path, {"a_empty.png": b"", "b_text.png": b"hello", "c_bomb.png": png_header_only(50_000, 50_000),
                             "d_cut.png": encode(Image.new("RGB", (64, 64), RED))[:60]})


def test_fail_lists_every_bad_file_at_once(tmp_path: Path) -> None:
    msg = bad_error(_many_bad(tmp_path))
    assert msg.startswith(f"{tmp_path / 'photos'}: 4 image(s) cannot be used:\n")
    for line in ("a_empty.png: empty file", "b_text.png: not an image", "c_bomb.png: too many pixels",
                 "d_cut.png: damaged or truncated"):
        assert f"\n  {line}" in msg


def test_skip_drops_them_and_lists_them(tmp_path: Path) -> None:
    d = _many_bad(tmp_path)
    with untouched(d):
        found = data.scan(d, on_bad="skip")
    assert [Path(r["file"]).name for r in found.manifest] == ["good_0.png", "good_1.png", "good_2.png"]
    assert [(Path(s["file"]).name, s["reason"].split(" (")[0]) for s in found.skipped] == [
        ("a_empty.png", "empty file"), ("b_text.png", "not an image Pillow can read"),
        ("c_bomb.png", "too many pixels to open safely"), ("d_cut.png", "damaged or truncated")]
    assert found.warnings == [f"{d}: skipped 4 bad image(s) (data.on_bad_image: skip): "
                              "a_empty.png, b_text.png, c_bomb.png, d_cut.png"]


def test_skip_with_nothing_left_and_a_bad_class_folder_still_fail(tmp_path: Path) -> None:
    d = folder(tmp_path, {"a.png": b""}, good=0)
    assert "no usable image is left after skipping the bad ones" in bad_error(d, on_bad="skip")
    assert "fix or remove them (training reads data.class_images as it is)" in bad_error(d, on_bad="skip",
                                                                                           instance=False)
    assert "data.on_bad_image is 'ignore'; allowed values: fail, skip" in bad_error(d, on_bad="ignore")


def test_skipped_files_and_warnings_reach_data_json_and_the_page(tmp_path: Path) -> None:
    from dbkit import config, workflow

    d = folder(tmp_path, {"broken_1.png": b"", "IMG_2.heic": b"x"}, good=2)
    exp = config.load("params/base.yaml", [f"data.instance_images={d}", "experiment=bad", "prior.enabled=false",
                                           "data.on_bad_image=skip"])
    rd = tmp_path / "run"
    rd.mkdir()
    with untouched(d):
        info = workflow.prepare_data(exp, rd)
    saved = json.loads((rd / "data.json").read_text())
    assert saved["n_instance"] == 2 and saved["skipped_bad_images"] == [
        {"file": str(d / "broken_1.png"), "reason": "empty file (0 bytes)"}]
    assert [w.removeprefix(f"{d}: ")[:31] for w in saved["warnings"]] == [
        "skipped IMG_2.heic: dbkit reads", "skipped 1 bad image(s) (data.on", "only 2 photo(s); DreamBooth nee"]
    page = workflow.data_markdown(info)
    assert "**Warnings**" in page and r"skipped IMG\_2.heic" in page
    assert "- `broken_1.png`: empty file (0 bytes)" in page


# --------------------------------------------------------------------------- any size


def test_an_8000px_photo_is_checked_and_shown_in_little_memory(tmp_path: Path) -> None:
    """One 8000×8000 JPEG (192 MB decoded; the old grid drew it at 24000² = 1.7 GB): the check,
    the thumbnail and the embedded grid stay within tens of MB, measured in a fresh process."""
    d = tmp_path / "photos"
    d.mkdir()
    rng = np.random.default_rng(0)
    tile = Image.fromarray(rng.integers(0, 255, (500, 500, 3), dtype=np.uint8))
    big = Image.new("RGB", (8000, 8000))
    for x in range(0, 8000, 500):
        big.paste(tile, (x, (x // 500) * 10))
    big.save(d / "huge.jpg", quality=90)
    del big
    code = (
        "import resource, sys; from pathlib import Path; from dbkit import data, report\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "f = Path(sys.argv[1]); size = data.probe(f)\n"
        "grid = report.image_grid([('x', [data.open_rgb(f, max_side=data.THUMB)])], ['huge'], scale=3)\n"
        "blob, fmt = report.embed_bytes(grid)\n"
        "print(size, grid.size, len(blob), fmt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)\n")
    with untouched(d):
        out = subprocess.run([sys.executable, "-c", code, str(d / "huge.jpg")], capture_output=True, text=True,
                             check=True).stdout.split()
    size, grid_size, n_bytes, fmt, rss_kib = out[0] + out[1], out[2] + out[3], *out[4:]
    assert size == "(8000,8000)" and int(rss_kib) < 100_000  # peak RSS above the imports, KiB
    assert max(int(v) for v in grid_size.strip("()").split(",")) < 400  # one 256-px cell and its labels
    assert int(n_bytes) < 100_000 and fmt in ("jpeg", "png")
    assert report.grid_cell(Image.new("RGB", (800, 600)), 3).size == (256, 192)


def test_a_grid_of_photos_is_embedded_as_thumbnails_in_jpeg() -> None:
    """Six noisy 800×600 "photos": 256-px cells, JPEG, well under 64 KB a photo."""
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)) for _ in range(6)]
    grid = report.image_grid([("instance", photos)], [f"IMG_{k}.jpg" for k in range(6)], scale=3)
    blob, fmt = report.embed_bytes(grid)
    assert grid.height < 256 + 100 and fmt == "jpeg" and len(blob) < 6 * 64 * 1024

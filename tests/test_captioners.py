"""Caption models for real photos (dbkit.captioners): a WD14-layout ONNX tagger and a BLIP
captioner, both tiny random twins built here, held against hand computation (the tagger's
probabilities are a known linear function of the pixels) and against plain transformers
code (BlipForConditionalGeneration.generate called directly)."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dbkit import captioners, captions, config
from dbkit.config import ConfigError

S = 8  # the twin tagger's input side
# selected_tags.csv of the twin: (name, category); ratings 9, general 0, character 4
TAGS = [("general", 9), ("sensitive", 9), ("questionable", 9), ("explicit", 9),
        ("1girl", 0), ("solo", 0), ("long_hair", 0), ("^_^", 0), ("outdoors", 0), ("blurry", 0),
        ("hatsune_miku", 4), ("some_character", 4), ("third_char", 4)]
# logit offsets: the pixels move a logit by well under ±0.5, so each tag lands clearly on one
# side of the default thresholds (general 0.35 ≈ logit -0.62, character 0.85 ≈ logit 1.73):
# some general tags in, some out; one character tag in, one between the two thresholds
BIAS = np.array([0.5, 1.5, -1.0, -3.0,
                 3.0, 2.0, 0.8, 0.2, -2.5, -0.1,
                 3.5, 0.5, -3.0])


# --------------------------------------------------------------------------- the twin tagger


def build_tagger(folder: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A WD14-layout folder whose model computes sigmoid(flatten(BGR input) @ W + BIAS)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    d, n = S * S * 3, len(TAGS)
    w = (np.random.default_rng(seed).normal(size=(d, n)) / (255 * np.sqrt(d)) * 0.25).astype(np.float32)
    b = BIAS.astype(np.float32)
    nodes = [helper.make_node("Reshape", ["input_1:0", "shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "W"], ["mm"]),
             helper.make_node("Add", ["mm", "b"], ["logits"]),
             helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"])]
    graph = helper.make_graph(
        nodes, "tiny_wd14",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, ["batch", S, S, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", n])],
        initializer=[numpy_helper.from_array(np.array([-1, d], np.int64), "shape"),
                     numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "model.onnx")
    rows = [f"{i},{name},{cat},{1000 - i}" for i, (name, cat) in enumerate(TAGS)]
    (folder / "selected_tags.csv").write_text("tag_id,name,category,count\n" + "\n".join(rows) + "\n")
    return w.astype(np.float64), b.astype(np.float64)


def hand_probs(rgb_square: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """What the twin must output for an S×S RGB uint8 array: BGR order, 0–255, then the linear map."""
    bgr = rgb_square[:, :, ::-1].astype(np.float64).reshape(-1)
    return 1 / (1 + np.exp(-(bgr @ w + b)))


def hand_tags(probs: np.ndarray, general: float = 0.35, character: float = 0.85, rating: str = "drop",
              underscores: str = "spaces") -> list[str]:
    """The tags the settings ask for, written out from the probabilities by plain rules."""
    keep = [i for i, (_, cat) in enumerate(TAGS)
            if (cat == 0 and probs[i] > general) or (cat == 4 and probs[i] > character)]
    keep = sorted(keep, key=lambda i: -probs[i])
    if rating == "keep":
        keep = [int(np.argmax(probs[:4]))] + keep  # the four rating tags are rows 0-3
    names = [TAGS[i][0] for i in keep]
    if underscores == "spaces":
        names = [n if n == "^_^" else n.replace("_", " ") for n in names]
    return names


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DBKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def tagger(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    folder = tmp_path / "models" / "wd14"
    w, b = build_tagger(folder)
    return folder, w, b


def params(overrides: list[str]) -> dict:
    return config.load(config.BASE_PATH, ["captions.identifier=sks", "captions.class_noun=dog", *overrides]).params


def photo(path: Path, size: tuple[int, int], seed: int) -> np.ndarray:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def count_calls(monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> list[int]:
    calls: list[int] = []
    original = getattr(cls, name)

    def counted(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)

    monkeypatch.setattr(cls, name, counted)
    return calls


# --------------------------------------------------------------------------- wd14


def test_wd14_tags_are_the_hand_computed_ones(tmp_path: Path, tagger, cache) -> None:
    folder, w, b = tagger
    square = photo(tmp_path / "square.png", (S, S), seed=1)
    wide = photo(tmp_path / "wide.png", (S, S // 2), seed=2)  # padded on white: 2 rows above, 2 below
    padded = np.full((S, S, 3), 255, np.uint8)
    padded[2:6] = wide
    entries = [{"file": str(tmp_path / "square.png")}, {"file": str(tmp_path / "wide.png")}]
    for arr in (square, padded):
        pr = hand_probs(arr, w, b)
        # the setup exercises every rule: a general tag under its threshold, a character tag
        # between the general and character thresholds, one above
        assert pr[8] < 0.35 < pr[9] and 0.35 < pr[11] < 0.85 < pr[10]
    for extra, kw in [([], {}),
                      (["captions.wd14.rating=keep", "captions.wd14.underscores=keep"],
                       {"rating": "keep", "underscores": "keep"}),
                      (["captions.wd14.general_threshold=0.8", "captions.wd14.character_threshold=0.5"],
                       {"general": 0.8, "character": 0.5})]:
        p = params(["captions.source=wd14", f"captions.wd14.model={folder}", *extra])
        said = captioners.describe(entries, p)
        for arr, s in zip((square, padded), said):
            pr = hand_probs(arr, w, b)
            want = hand_tags(pr, **kw)
            assert s["tagger_tags"] == want and list(s["tag_scores"]) == want
            for tag, score in s["tag_scores"].items():
                row = next(i for i, (n, _) in enumerate(TAGS) if tag in (n, n.replace("_", " ")))
                assert score == pytest.approx(pr[row], abs=1e-4)


def test_wd14_resizes_larger_photos_bicubically(tmp_path: Path, tagger, cache) -> None:
    folder, w, b = tagger
    big = photo(tmp_path / "big.png", (4 * S, 3 * S), seed=3)
    square = np.full((4 * S, 4 * S, 3), 255, np.uint8)
    square[S // 2: S // 2 + 3 * S] = big  # centred: (4S - 3S) // 2 rows of white above
    small = np.asarray(Image.fromarray(square).resize((S, S), Image.Resampling.BICUBIC))
    p = params(["captions.source=wd14", f"captions.wd14.model={folder}"])
    [said] = captioners.describe([{"file": str(tmp_path / "big.png")}], p)
    assert said["tagger_tags"] == hand_tags(hand_probs(small, w, b))


def test_wd14_captions_name_the_subject_and_keep_tags_filters_them(tmp_path: Path, tagger, cache) -> None:
    folder, w, b = tagger
    arr = photo(tmp_path / "a.png", (S, S), seed=1)
    expected = hand_tags(hand_probs(arr, w, b))
    manifest = [{"file": str(tmp_path / "a.png")}]
    p = params(["captions.source=wd14", f"captions.wd14.model={folder}"])
    [rec] = captions.build_captions(manifest, p)
    assert rec["caption"] == ", ".join(["sks dog", *expected])
    assert captions.tag_frequencies([rec]) == {t: 1 for t in ["sks dog", *expected]}
    p = params(["captions.source=wd14", f"captions.wd14.model={folder}", "captions.keep_tags=[1girl, solo]",
                "captions.trigger=word"])
    [rec] = captions.build_captions(manifest, p)
    assert captions.train_caption(rec, p, random.Random(0)) == ", ".join(
        ["sks", *[t for t in expected if t in ("1girl", "solo")]])
    assert "1girl" in expected and "solo" in expected and len(expected) > 3  # the filter had work to do


def test_wd14_cache_is_by_content(tmp_path: Path, tagger, cache, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    folder, w, b = tagger
    calls = count_calls(monkeypatch, onnxruntime.InferenceSession, "run")
    photo(tmp_path / "a.png", (S, S), seed=1)
    photo(tmp_path / "b.png", (S, S), seed=2)
    entries = [{"file": str(tmp_path / n)} for n in ("a.png", "b.png")]
    p = params(["captions.source=wd14", f"captions.wd14.model={folder}"])
    first = captioners.describe(entries, p)
    assert len(calls) == 2 and not any(s["from_cache"] for s in first)
    again = captioners.describe(entries, p)
    assert len(calls) == 2 and all(s["from_cache"] for s in again)
    assert [s["tagger_tags"] for s in again] == [s["tagger_tags"] for s in first]
    # thresholds apply to cached probabilities: no model run
    captioners.describe(entries, params(["captions.source=wd14", f"captions.wd14.model={folder}",
                                         "captions.wd14.general_threshold=0.9"]))
    assert len(calls) == 2
    # the same bytes under another name hit; one changed pixel misses
    (tmp_path / "copy.png").write_bytes((tmp_path / "a.png").read_bytes())
    captioners.describe([{"file": str(tmp_path / "copy.png")}], p)
    assert len(calls) == 2
    arr = np.asarray(Image.open(tmp_path / "a.png")).copy()
    arr[0, 0, 0] ^= 1
    Image.fromarray(arr).save(tmp_path / "a.png")
    [changed] = captioners.describe(entries[:1], p)
    assert len(calls) == 3 and not changed["from_cache"]
    assert changed["tagger_tags"] == hand_tags(hand_probs(arr, w, b))
    # other model content in the same folder misses too
    csv = (folder / "selected_tags.csv").read_text().replace(",1000\n", ",999\n")
    (folder / "selected_tags.csv").write_text(csv)
    captioners.describe(entries[1:], p)
    assert len(calls) == 4
    assert len(list((cache / "wd14").iterdir())) == 4  # a, b, changed a, b with the new model
    # a run pinned to a thread count computes its own probabilities, with that many onnxruntime threads
    threads: list[int] = []
    opened = onnxruntime.InferenceSession.__init__

    def session(self, path, opts=None, *a, **k):
        threads.append(opts.intra_op_num_threads)
        return opened(self, path, opts, *a, **k)

    monkeypatch.setattr(onnxruntime.InferenceSession, "__init__", session)
    [pinned] = captioners.describe(entries[1:], params(["captions.source=wd14", f"captions.wd14.model={folder}",
                                                        "threads=1"]))
    assert len(calls) == 5 and not pinned["from_cache"] and threads == [1]
    assert len(list((cache / "wd14").iterdir())) == 5


def test_wd14_files_from_different_taggers_are_refused(tmp_path: Path, tagger, cache) -> None:
    folder, _, _ = tagger
    with open(folder / "selected_tags.csv", "a") as f:
        f.write(f"{len(TAGS)},extra_tag,0,1\n")
    photo(tmp_path / "a.png", (S, S), seed=1)
    p = params(["captions.source=wd14", f"captions.wd14.model={folder}"])
    with pytest.raises(captioners.CaptionModelError, match=rf"^'captions\.wd14\.model': .*outputs {len(TAGS)} tags "
                       rf"but selected_tags\.csv lists {len(TAGS) + 1}: .*huggingface-cli download"):
        captioners.describe([{"file": str(tmp_path / "a.png")}], p)


def test_caption_models_are_part_of_the_run_identity(tmp_path: Path, tagger) -> None:
    folder, _, _ = tagger
    before = config.load(config.BASE_PATH, ["captions.source=wd14", f"captions.wd14.model={folder}"]).hash
    build_tagger(folder, seed=1)  # other weights, same folder
    after = config.load(config.BASE_PATH, ["captions.source=wd14", f"captions.wd14.model={folder}"]).hash
    assert before != after


# --------------------------------------------------------------------------- missing or incomplete folders


WD14_CMD = ("huggingface-cli download SmilingWolf/wd-v1-4-vit-tagger-v2 model.onnx selected_tags.csv "
            "--local-dir {}")
BLIP_CMD = "huggingface-cli download Salesforce/blip-image-captioning-large --local-dir {}"


def test_missing_or_incomplete_model_folders_fail_at_params_load(tmp_path: Path, tagger) -> None:
    folder, _, _ = tagger
    cases = [
        (["captions.source=wd14"], r"^command line: captions\.source is wd14 but 'captions\.wd14\.model' is empty: "
         r".*`" + re.escape(WD14_CMD.format("models/wd14-vit-v2")) + "`"),
        (["captions.source=wd14", f"captions.wd14.model={tmp_path}/nope"],
         r"^command line: 'captions\.wd14\.model' folder '.*nope' does not exist .*`"
         + re.escape(WD14_CMD.format(f"{tmp_path}/nope")) + "`"),
        (["captions.source=merge", f"captions.wd14.model={folder}"],
         r"'captions\.transformers\.model' is empty: .*`" + re.escape(BLIP_CMD.format("models/blip-large")) + "`"),
    ]
    half = tmp_path / "half"
    half.mkdir()
    (half / "model.onnx").write_bytes((folder / "model.onnx").read_bytes())
    cases.append((["captions.source=wd14", f"captions.wd14.model={half}"],
                  r"'captions\.wd14\.model' folder '.*half' is incomplete: selected_tags\.csv missing or empty: .*`"
                  + re.escape(WD14_CMD.format(str(half))) + "`"))
    blip = tmp_path / "blip"
    blip.mkdir()
    (blip / "config.json").write_text("{}")
    cases.append((["captions.source=transformers", f"captions.transformers.model={blip}"],
                  r"'captions\.transformers\.model' folder '.*blip' is incomplete: the weights .*missing: .*`"
                  + re.escape(BLIP_CMD.format(str(blip))) + "`"))
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            config.load(config.BASE_PATH, overrides)


# --------------------------------------------------------------------------- the BLIP twin

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "dog", "cat", "on", "grass",
         "the", "red", "blue", "sitting", "with"]


@pytest.fixture(scope="module")
def blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny BLIP captioner saved as a hub folder (config, weights, processor, tokenizer)."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder = tmp_path_factory.mktemp("blip")
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    tiny = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
    cfg = BlipConfig(vision_config=dict(tiny, image_size=32, patch_size=8),
                     text_config=dict(tiny, vocab_size=len(WORDS), max_position_embeddings=64, encoder_hidden_size=32,
                                      bos_token_id=WORDS.index("[DEC]"), pad_token_id=0, sep_token_id=3,
                                      eos_token_id=3))
    torch.manual_seed(0)
    BlipForConditionalGeneration(cfg).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def direct_sentence(folder: Path, image: Path, prompt: str = "", max_new_tokens: int = 40,
                    num_beams: int = 3) -> str:
    """The caption as the transformers docs write BLIP captioning, without dbkit."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(folder)
    model = BlipForConditionalGeneration.from_pretrained(folder).eval()
    inputs = processor(images=Image.open(image).convert("RGB"), text=prompt or None, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams)
    return processor.decode(out[0], skip_special_tokens=True).strip()


def test_transformers_caption_is_blips_own(tmp_path: Path, blip: Path, cache) -> None:
    photo(tmp_path / "a.png", (40, 30), seed=4)
    entries = [{"file": str(tmp_path / "a.png")}]
    for prompt, tokens, beams in [("", 12, 3), ("a photo of", 8, 1)]:
        p = params(["captions.source=transformers", f"captions.transformers.model={blip}",
                    f"captions.transformers.prompt={prompt}", f"captions.transformers.max_new_tokens={tokens}",
                    f"captions.transformers.num_beams={beams}"])
        [said] = captioners.describe(entries, p)
        want = direct_sentence(blip, tmp_path / "a.png", prompt, tokens, beams)
        assert said["sentence"] == want and want
        if prompt:
            assert want.startswith(prompt)
        [rec] = captions.build_captions(entries, p)
        m = re.search(r"\bdog\b", want)  # the subject replaces the class noun, or goes in front
        named = want[: m.start()] + "sks dog" + want[m.end():] if m else f"sks dog, {want}"
        assert rec["caption"] == named


def test_merge_is_sentence_then_tags(tmp_path: Path, blip: Path, tagger, cache,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import BlipForConditionalGeneration

    folder, w, b = tagger
    arr = photo(tmp_path / "a.png", (S, S), seed=1)
    entries = [{"file": str(tmp_path / "a.png")}]
    sentence, tags = direct_sentence(blip, tmp_path / "a.png"), hand_tags(hand_probs(arr, w, b))
    both = ["captions.source=merge", f"captions.wd14.model={folder}", f"captions.transformers.model={blip}",
            "captions.class_noun=zebra"]  # a noun the twin cannot say: the phrase goes in front
    p = params(both)
    calls = count_calls(monkeypatch, BlipForConditionalGeneration, "generate")
    [rec] = captions.build_captions(entries, p)
    assert rec["caption"] == ", ".join([f"sks zebra, {sentence}", *tags])
    assert rec["sentence"] == sentence and rec["tagger_tags"] == tags
    assert len(calls) == 1
    # the cache answers the second time; a new seed is a new setting
    assert captions.build_captions(entries, p)[0]["from_cache"] and len(calls) == 1
    captions.build_captions(entries, params([*both, "captions.transformers.seed=7"]))
    assert len(calls) == 2
    # keep_tags keeps the sentence (it names the subject) and the wanted tags, in order
    q = params([*both, "captions.keep_tags=[solo, 1girl]"])
    [rec] = captions.build_captions(entries, q)
    assert captions.train_caption(rec, q, random.Random(0)) == ", ".join(
        [f"sks zebra, {sentence}", *[t for t in tags if t in ("solo", "1girl")]])


def test_with_subject_by_hand() -> None:
    p = params([])
    assert captions.with_subject("a dog sitting on the grass", p) == "a sks dog sitting on the grass"
    assert captions.with_subject("a Dog and another dog", p) == "a sks dog and another dog"
    assert captions.with_subject("a hotdogs stand", p) == "sks dog, a hotdogs stand"
    assert captions.with_subject("a dog", params(["captions.trigger=word"])) == "a sks"
    assert captions.with_subject("a dog", params(["captions.trigger=none"])) == "a dog"
    assert captions.with_subject("a cat", params(["captions.trigger=none"])) == "dog, a cat"


# --------------------------------------------------------------------------- the 02_captions page


def test_captions_page_shows_what_each_model_said(tmp_path: Path, blip: Path, tagger, cache) -> None:
    import base64
    import io
    import json

    from dbkit import report, workflow

    folder, w, b = tagger
    arr = photo(tmp_path / "a.png", (S, S), seed=1)
    rd = tmp_path / "run"
    rd.mkdir()
    (rd / "manifest.jsonl").write_text(json.dumps({"file": str(tmp_path / "a.png")}) + "\n")
    exp = config.load(config.BASE_PATH, ["captions.source=merge", f"captions.wd14.model={folder}",
                                         f"captions.transformers.model={blip}", "captions.class_noun=zebra"])
    records = workflow.prepare_captions(exp, rd)
    assert [json.loads(line) for line in (rd / "captions.jsonl").read_text().splitlines()] == records
    tags, sentence = hand_tags(hand_probs(arr, w, b)), direct_sentence(blip, tmp_path / "a.png")
    assert json.loads((rd / "tag_frequencies.json").read_text()) == {t: 1 for t in records[0]["tags"]}
    assert "0 of 1 photos from the cache" in workflow.captions_note(records)
    assert "1 of 1 photos from the cache" in workflow.captions_note(workflow.prepare_captions(exp, rd))
    page = report.captions_html(workflow.caption_rows(records))
    for text in [sentence, ", ".join([f"sks zebra, {sentence}", *tags]), *tags]:
        assert text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") in page
    row = next(i for i, (n, _) in enumerate(TAGS) if n == "1girl")
    assert f"1girl {hand_probs(arr, w, b)[row]:.2f}" in page  # the tagger's probability beside each tag
    shown = re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)
    assert (np.asarray(Image.open(io.BytesIO(base64.b64decode(shown))).convert("RGB")) == arr).all()
    assert workflow.captions_note(captions.build_captions([{"file": str(tmp_path / "a.png")}], params([]))) == ""


def test_transformers_fingerprint_covers_what_transformers_reads(tmp_path: Path) -> None:
    from dbkit import model_folders

    for name in ("config.json", "preprocessor_config.json", "vocab.txt", "model.safetensors", "pytorch_model.bin",
                 "tf_model.h5", "README.md"):
        (tmp_path / name).write_text(name)
    first = model_folders.fingerprint("transformers", tmp_path)
    for name in ("pytorch_model.bin", "tf_model.h5", "README.md"):  # never loaded beside model.safetensors
        (tmp_path / name).write_text("changed")
    assert model_folders.fingerprint("transformers", tmp_path) == first
    for name in ("model.safetensors", "vocab.txt"):
        (tmp_path / name).write_text("changed")
        assert model_folders.fingerprint("transformers", tmp_path) != first
        first = model_folders.fingerprint("transformers", tmp_path)
    (tmp_path / "model.safetensors").unlink()  # now the .bin weights are the ones loaded
    assert model_folders.fingerprint("transformers", tmp_path) != first

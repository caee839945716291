"""Training captions: where they come from, how the subject is named, and train-time edits.

Sources (params `captions.source`): `fixed` (one instance prompt for every image, the
DreamBooth paper's setting), `sidecar` (a .txt beside each image, kohya style),
`metadata` (metadata.jsonl's `text`/`caption`), `toyworld` (the exact truth the renderer
recorded), `oracle` (read back from the pixels: the toy world's stand-in for a WD14
tagger or BLIP captioner), and, for real photos, models from local folders
(:mod:`dbkit.captioners`): `wd14` (tags), `transformers` (a BLIP-style sentence) and `merge`
("sentence, tag, tag …", as the research notes caption). The subject phrase follows
`captions.trigger`: "sks star", "sks", or just "star". Train-time edits (tag filter, shuffle
with keep-first-N, caption dropout) are applied per step by `train_caption`.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

from .data import DataError
from .model_folders import CAPTION_MODEL_SECTIONS


def pivotal_tokens(p: dict) -> list[str]:
    """The new tokens pivotal tuning learns, <s0>…<sN>."""
    return [f"<s{i}>" for i in range(p["train"]["pivotal"]["tokens"])]


def effective_params(p: dict) -> dict:
    """Params as training and sampling use them: with pivotal tuning the identifier becomes
    the new tokens, so every caption, preview and evaluation prompt names the subject by
    them. Captions must be built from these params, or the new tokens never see a gradient."""
    if not p["train"]["pivotal"]["enabled"]:
        return p
    q = json.loads(json.dumps(p))
    q["captions"]["identifier"] = "".join(pivotal_tokens(p))
    return q


def subject_phrase(p: dict) -> str:
    """How captions name the subject, per `captions.trigger`."""
    c = p["captions"]
    if c["trigger"] == "identifier":
        return f"{c['identifier']} {c['class_noun']}".strip()
    if c["trigger"] == "word":
        return c["identifier"]
    return c["class_noun"]


def expand(template: str, p: dict) -> str:
    """Fill {subject}, {identifier} and {class_noun} in a prompt template."""
    c = p["captions"]
    return template.format(subject=subject_phrase(p), identifier=c["identifier"], class_noun=c["class_noun"])


CAPTION_CLASS_PROMPT = "{caption}"  # prior.class_prompt: one class prompt per instance caption


def class_caption(caption: str, p: dict) -> str:
    """An instance caption with the subject taken out: a trailing trigger (", ohwx style")
    is dropped, elsewhere the subject phrase becomes the class noun ("a sks heart on …" →
    "a heart on …"). The base's picture for it is what the caption means without the subject."""
    phrase, noun = subject_phrase(p), p["captions"]["class_noun"]
    if caption.endswith(", " + phrase):
        return caption[: -len(phrase) - 2]
    return caption.replace(phrase, noun)


def class_prompts(p: dict, records: list[dict]) -> list[str]:
    """The prompts class images are generated from: prior.class_prompt, or with "{caption}"
    each distinct instance caption without its subject (style DreamBooth: the same content,
    unstyled, so the style is bound to the trigger and not to every prompt)."""
    if p["prior"]["class_prompt"] != CAPTION_CLASS_PROMPT:
        return [expand(p["prior"]["class_prompt"], p)]
    return list(dict.fromkeys(class_caption(r["caption"], p) for r in records))


def _from_scene(scene, noun: str, form: str) -> tuple[str, list[str]]:
    from .toyworld import scenes

    sentence = scenes.caption_sentence(scene, noun=noun)
    tags = scenes.caption_tags(scene, noun=noun)
    text = {"sentence": sentence, "tags": ", ".join(tags), "both": f"{sentence}, {', '.join(tags[1:])}"}[form]
    return text, tags


def _toyworld_scene(record: dict | None, file: str):
    from .toyworld import scenes

    if not record or "background" not in record:
        raise DataError(f"{file}: captions.source=toyworld needs a metadata.jsonl record with background/"
                        "position/size (toy-world subject folders have one); use another caption source")
    # a subject's own paint replaces colour and pattern; a style's images show ordinary objects
    colour, pattern = (record["colour"], record["pattern"]) if "style" in record else ("red", "plain")
    obj = scenes.SceneObject(record.get("class_noun", "star"), colour, pattern, record["size"], record["position"])
    return scenes.Scene(record["background"], (obj,))


def _oracle_scene(file: str):
    from .data import open_rgb
    from .toyworld import oracle, scenes

    r = oracle.read(open_rgb(Path(file)).resize((scenes.SIZE, scenes.SIZE)))
    obj = scenes.SceneObject(r.shape or "circle", r.colour or "red", r.pattern or "plain", r.size or "large",
                             r.position or "center")
    return scenes.Scene(r.background, (obj,))


def caption_for(entry: dict, p: dict) -> dict:
    """The caption record of one manifest entry: {file, caption, tags}."""
    c, noun = p["captions"], subject_phrase(p)
    src, file = c["source"], entry["file"]
    if src == "fixed":
        text = expand(c["instance_prompt"], p)
        return {"file": file, "caption": text, "tags": [t.strip() for t in text.split(",")]}
    if src == "sidecar":
        if entry.get("sidecar_caption") is None:
            raise DataError(f"{file}: captions.source=sidecar but {Path(file).with_suffix('.txt')} is missing;"
                            " write one caption per image or choose captions.source=fixed")
        text = entry["sidecar_caption"].replace("{subject}", noun)
        return {"file": file, "caption": text, "tags": [t.strip() for t in text.split(",")]}
    if src == "metadata":
        rec = entry.get("record") or {}
        text = rec.get("text") or rec.get("caption")
        if not text:
            raise DataError(f"{file}: captions.source=metadata needs a 'text' or 'caption' field in metadata.jsonl")
        return {"file": file, "caption": text.replace("{subject}", noun),
                "tags": [t.strip() for t in text.split(",")]}
    scene = _toyworld_scene(entry.get("record"), file) if src == "toyworld" else _oracle_scene(file)
    if "style" in (entry.get("record") or {}):
        # a style's captions describe the content, so that what the content does not explain
        # (the style) goes to the trigger, appended as "…, zwx style"
        text, tags = _from_scene(scene, None, c["form"])
        return {"file": file, "caption": f"{text}, {noun}", "tags": [*tags, noun]}
    text, tags = _from_scene(scene, noun, c["form"])
    return {"file": file, "caption": text, "tags": tags}


MODEL_SOURCES = tuple(CAPTION_MODEL_SECTIONS)  # wd14, transformers, merge


def build_captions(manifest: list[dict], p: dict) -> list[dict]:
    """Caption records of the manifest; refuses settings that would empty every caption."""
    if p["captions"]["source"] in MODEL_SOURCES:
        from .captioners import describe

        records = [from_models(e, said, p) for e, said in zip(manifest, describe(manifest, p))]
    else:
        records = [caption_for(e, p) for e in manifest]
    check_keep_tags(records, p)
    return records


def with_subject(sentence: str, p: dict) -> str:
    """A captioner's sentence naming the subject: its first mention of the class noun becomes
    the subject phrase ("a dog on grass" → "a sks dog on grass"), as the toy world's sentences
    name it; a sentence without the class noun gets the phrase in front ("sks dog, a puppy …")."""
    noun, cls = subject_phrase(p), p["captions"]["class_noun"]
    if not sentence:
        return noun
    m = re.search(rf"\b{re.escape(cls)}\b", sentence, flags=re.IGNORECASE) if cls else None
    if m:
        return sentence[: m.start()] + noun + sentence[m.end():]
    return f"{noun}, {sentence}"


def from_models(entry: dict, said: dict, p: dict) -> dict:
    """The caption record of one photo from what the caption models said (captioners.describe).
    `tags` are the caption's comma-separated parts, which the tag edits (keep_tags, shuffle) work
    on; `subject_tag` is the part naming the subject (the subject phrase for wd14, the sentence
    for merge), which keep_tags always keeps: `merge` with keep_tags: [1girl, solo] trains on
    "a photo of sks woman …, 1girl, solo"."""
    src, noun = p["captions"]["source"], subject_phrase(p)
    if src == "transformers":
        caption = with_subject(said["sentence"], p)
        tags = [t.strip() for t in caption.split(",") if t.strip()]
        head = next((t for t in tags if noun in t), tags[0])
    else:
        head = noun if src == "wd14" else with_subject(said["sentence"], p)
        tags = [head, *(t for t in said["tagger_tags"] if t != noun)]
        caption = ", ".join(tags)
    rec = {"file": entry["file"], "caption": caption, "tags": tags, "subject_tag": head}
    return rec | {k: said[k] for k in ("tagger_tags", "tag_scores", "sentence", "from_cache") if k in said}


def kept_tags(tags: list[str], p: dict, subject_tag: str | None = None) -> list[str]:
    """captions.keep_tags applied to one caption's tags (the subject phrase, and the record's
    `subject_tag` when it has one, always stay)."""
    keep = p["captions"]["keep_tags"]
    if not keep:
        return list(tags)
    wanted = set(keep) | {subject_phrase(p)} | ({subject_tag} if subject_tag else set())
    return [t for t in tags if t in wanted]


def check_keep_tags(records: list[dict], p: dict) -> None:
    """A keep_tags list that matches no tag of any caption trains every step on an empty
    prompt (the subject's name never appears): refuse it, listing the tags there are."""
    if not records or any(kept_tags(r["tags"], p, r.get("subject_tag")) for r in records):
        return
    tags = list(tag_frequencies(records))  # most frequent first
    found = ", ".join(repr(t) for t in tags[:30]) + (f" … ({len(tags)} in all)" if len(tags) > 30 else "")
    raise DataError(f"captions.keep_tags={p['captions']['keep_tags']} matches no tag of any caption, so every "
                    f"training caption would be empty; keep some of the tags the captions have: {found}")


def tag_frequencies(captions: list[dict]) -> dict[str, int]:
    return dict(Counter(t for c in captions for t in c["tags"]).most_common())


def train_caption(record: dict, p: dict, rng: random.Random) -> str:
    """The caption used at one training step: dropout, tag filter, shuffle keeping the first N."""
    c = p["captions"]
    if c["dropout"] > 0 and rng.random() < c["dropout"]:
        return ""
    uses_tags = c["keep_tags"] or c["shuffle"]
    if not uses_tags:
        return record["caption"]
    tags = kept_tags(record["tags"], p, record.get("subject_tag"))
    if c["shuffle"]:
        head, tail = tags[: c["keep_first"]], tags[c["keep_first"] :]
        rng.shuffle(tail)
        tags = head + tail
    return ", ".join(tags)

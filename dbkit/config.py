"""Experiment params: YAML files that ``extends:`` one another, dotted overrides, strict checks, a stable hash.

Every valid key, with its default, lives in ``params/base.yaml``; an experiment file names
the file it extends and overrides only what it varies. :func:`load` resolves the chain,
applies command-line overrides (``train.lora.rank=32``) and validates everything before any
work starts, so a typo fails in a second rather than after an hour of training. The
resolved params get a hash that names the run folder: the same params always map to the
same folder (that is how resume works), and editing prose (``notes``) never invalidates a run.

Two keys describe a file rather than the run and so are not inherited from a parent file:
``experiment`` (the name; empty means the file's stem) and ``notes``. Both sit on top of
base.yaml's defaults only. ``ablation.vary`` is replaced as a whole, never merged, so a
child file can switch an inherited ablation off with ``vary: {}``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
import math
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from . import cpu_threads, methods, model_folders
from .hashing import canonical_json, stable_hash  # noqa: F401  (config.stable_hash is public)

BASE_PATH = Path(__file__).resolve().parent.parent / "params" / "base.yaml"

# Allowed values of the enumerated keys; must match the comments in params/base.yaml
# (tests/test_config.py checks that they do).
ENUMS: dict[str, tuple[str, ...]] = {
    "base.family": ("auto", "sd15", "sd2", "sdxl", "playground"),
    "captions.source": ("fixed", "sidecar", "metadata", "toyworld", "oracle", "wd14", "transformers", "merge"),
    "captions.form": ("sentence", "tags", "both"),
    "captions.trigger": ("identifier", "word", "none"),
    "captions.wd14.rating": ("drop", "keep"),
    "captions.wd14.underscores": ("spaces", "keep"),
    "train.method": tuple(methods.METHODS),  # one module each in dbkit/methods/
    "train.prediction": ("auto", "epsilon", "v_prediction", "edm"),
    "train.log_with": ("none", "tensorboard", "wandb"),
    "train.lr_scheduler": ("constant", "linear", "cosine"),
    "train.optimizer": ("adamw", "adamw8bit", "prodigy"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "sample.scheduler": ("ddim", "euler", "dpm++"),
    "metrics.backend": ("oracle", "clip"),
    "data.on_bad_image": ("fail", "skip"),
    "merge.majority_sign": ("total", "frequency"),
    "data.detector": ("none", "opencv", "oracle", "yolo", "onnx"),
    "data.crop_to": ("none", "face", "upper_body", "body"),
    "data.matte": ("none", "mask", "rembg"),
}

# Lists whose elements are enumerated, and lists whose default is empty but that hold numbers.
LIST_ENUMS: dict[str, tuple[str, ...]] = {
    "merge.methods": ("weighted", "fused", "cat", "svd", "linear", "ties", "dare_linear", "dare_ties",
                      "magnitude_prune", "ziplora"),
}
_LIST_ELEMENTS: dict[str, type] = {"merge.weights": float, "merge.weight_grid": float}

# Keys left out of the hash: they name or describe a run without changing what it computes
# (an ablation's variants are hashed one by one, each with its own overridden value; merges
# are cached by their own inputs; report.* only changes how the report reads the run).
HASH_EXCLUDE = ("notes", "experiment", "ablation", "merge", "report")
# Single keys left out of the hash, inside hashed sections: train.reuse_identical chooses
# whether a finished identical run is copied or retrained, not what the model is, and adding
# it to base.yaml must not rename every existing run folder.
HASH_EXCLUDE_KEYS = ("train.reuse_identical",)
# Sections outside the run hash that still change what a report shows: the variants trained
# beside the main run, the merges, how the report reads the run. They name the report
# *version* (with the run hash), so an edited experiment publishes a new version instead of
# overwriting the one that holds the earlier table, while every training stays keyed by its
# own run hash (an added variant trains that variant only).
VERSION_SECTIONS = ("ablation", "merge", "report")
# ...but not how many processes compute the variants: two workers give the serial path's
# tables to the last digit (tests/test_parallel_variants.py), so changing it is no new result.
VERSION_EXCLUDE_KEYS = ("ablation.workers",)

# Keys added after runs existed, with the value the code had before the key: at that value they
# stay out of the hash (every existing run keeps its folder and its committed report); any other
# value is a different run.
HASH_ADDED_KEYS = {"metrics.seed": 100, "train.lokr": {"factor": -1, "decompose_both": False}}
# `threads` came later too, but is not dropped at its old 0: on a CPU the run hash holds the
# thread count the run computes with (cpu_threads.identity), whatever the params say.
_ADDED_LATER = HASH_ADDED_KEYS | {"threads": 0}

# Keys that hold free-form content rather than schema sections.
_FREE_KEYS = ("notes",)
_VARY_KEY = "ablation.vary"
_VARIANTS_KEY = "ablation.variants"
_WHOLE_KEYS = (_VARY_KEY, _VARIANTS_KEY)  # replaced as a whole when a child file sets them
_NOT_INHERITED = ("experiment", "notes")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# Value ranges: (low, high, low_inclusive). None = unbounded on that side.
_RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "seed": (0, None, True),
    "threads": (0, None, True),
    "ablation.workers": (1, None, True),
    "base.resolution": (8, None, True),
    "data.resolution": (8, None, True),
    "data.repeats": (1, None, True),
    "data.max_images": (0, None, True),
    "data.min_subject_area": (0, 1, True),
    "data.min_face_ratio": (0, 1, True),
    "data.crop_margin": (0, None, True),
    "captions.keep_first": (0, None, True),
    "captions.dropout": (0, 1, True),
    "captions.wd14.general_threshold": (0, 1, True),
    "captions.wd14.character_threshold": (0, 1, True),
    "captions.transformers.max_new_tokens": (1, None, True),
    "captions.transformers.num_beams": (1, None, True),
    "captions.transformers.seed": (0, None, True),
    "prior.num_images": (0, None, True),
    "prior.weight": (0, None, True),
    "prior.steps": (1, None, True),
    "prior.guidance": (0, None, True),
    "prior.seed": (0, None, True),
    "train.text_encoder_fraction": (0, 1, True),
    "merge.density": (0, 1, False),
    "merge.svd_rank": (0, None, True),
    "merge.ziplora_steps": (0, None, True),
    "merge.ziplora_lr": (0, None, False),
    "merge.ziplora_lambda": (0, None, True),
    "train.steps": (1, None, True),
    "train.batch_size": (1, None, True),
    "train.grad_accum": (1, None, True),
    "train.lr": (0, None, False),
    "train.text_encoder_lr": (0, None, False),
    "train.warmup_steps": (0, None, True),
    "train.weight_decay": (0, None, True),
    "train.max_grad_norm": (0, None, True),
    "train.min_snr_gamma": (0, None, True),
    "train.noise_offset": (0, None, True),
    "train.ema_decay": (0, 1, True),
    "train.lora.rank": (1, None, True),
    "train.lora.alpha": (0, None, False),
    "train.lora.dropout": (0, 1, True),
    "train.pivotal.tokens": (1, None, True),
    "train.pivotal.ti_fraction": (0, 1, True),
    "train.pivotal.lr": (0, None, False),
    "train.save_every": (0, None, True),
    "train.keep_checkpoints": (1, None, True),
    "train.sample_every": (0, None, True),
    "sample.steps": (1, None, True),
    "sample.guidance": (0, None, True),
    "metrics.num_per_prompt": (1, None, True),
    "report.plateau_eps": (0, 1, True),
    "report.plateau_window": (1, None, True),
}
_MULTIPLE_OF_8 = ("base.resolution", "data.resolution")
_NON_EMPTY_LISTS = ("sample.seeds", "sample.prompts")
_NON_NEGATIVE_INT_LISTS = ("sample.seeds",)

_YAML11_EXP_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               list: "a list", dict: "a mapping"}


class ConfigError(ValueError):
    """A params problem, found before any work starts; the message names the file and key."""


# ----------------------------------------------------------------------------- hashing


def params_hash(params: dict) -> str:
    """The run identity: the hash of params without the keys in :data:`HASH_EXCLUDE`, plus
    the base model's fingerprint (retrained weights in the same folder make a new run), the
    data's (new photos, masks or captions in the same folder make a new run) and, on a CPU,
    the thread count the run computes with (``threads: 0`` resolved on this machine)."""
    from .data import data_fingerprint
    from .models import fingerprint

    ident = {k: v for k, v in params.items() if k not in HASH_EXCLUDE}
    dropped = list(HASH_EXCLUDE_KEYS) + [k for k, v in HASH_ADDED_KEYS.items() if _at_old_value(params, k, v)]
    for dotted in dropped:
        section, _, key = dotted.partition(".")
        if not key:  # a top-level key
            ident.pop(section, None)
        elif isinstance(ident.get(section), dict):
            ident[section] = {k: v for k, v in ident[section].items() if k != key}
    model = params.get("base", {}).get("model")
    if isinstance(model, str):
        ident["base_fingerprint"] = fingerprint(model)
    if isinstance(params.get("data", {}).get("instance_images"), str):
        ident["data_fingerprint"] = data_fingerprint(params)
    ident.pop("threads", None)
    threads = cpu_threads.identity(params)
    if threads is not None:  # a CPU's float sums depend on how many threads split them
        ident["cpu_threads"] = threads
    models = caption_models(params)
    if models:  # other weights in the same folder give other captions: a new run
        ident["caption_models"] = {s: model_folders.fingerprint(s, folder) for s, folder in models.items()}
    return stable_hash(ident)


def version_hash(params: dict, run_hash: str, sources: list | None = None) -> str:
    """The report version's identity: the run hash plus :data:`VERSION_SECTIONS` (less
    :data:`VERSION_EXCLUDE_KEYS`) and what the merge sources are (:func:`merge_sources_identity`:
    an edited style.yaml retrains the style LoRA under another run hash, and the merge of it is
    another table). Everything that changes what a report shows changes it."""
    ident: dict[str, Any] = {"run": run_hash}
    if sources:
        ident["merge_sources"] = sources
    for section in VERSION_SECTIONS:
        ident[section] = copy.deepcopy(params.get(section))
    for dotted in VERSION_EXCLUDE_KEYS:
        section, _, key = dotted.partition(".")
        if isinstance(ident.get(section), dict):
            ident[section].pop(key, None)
    return stable_hash(ident)


CAPTION_MODEL_SECTIONS = model_folders.CAPTION_MODEL_SECTIONS


def with_added_keys(params: dict) -> dict:
    """`params` as the current code reads it: a key of HASH_ADDED_KEYS that a run written before
    it existed lacks holds the value the code had then (for comparing old runs with new ones)."""
    out = copy.deepcopy(params)
    for dotted, old in _ADDED_LATER.items():
        section, _, key = dotted.partition(".")
        if not key:
            out.setdefault(section, old)
        elif isinstance(out.get(section), dict) and key not in out[section]:
            out[section][key] = old
    return out


def _at_old_value(params: dict, dotted: str, old: Any) -> bool:
    try:
        return _get(params, dotted) == old
    except KeyError:  # written before the key existed
        return True


def caption_models(params: dict) -> dict[str, str]:
    """{section: model folder} of the caption backends captions.source runs (none for file
    and toy-world sources)."""
    c = params.get("captions") or {}
    return {s: (c.get(s) or {}).get("model", "") for s in CAPTION_MODEL_SECTIONS.get(c.get("source"), ())}


# ----------------------------------------------------------------------------- dotted keys


def _walk(d: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) for every leaf; free-form and ablation.vary values are leaves."""
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and key not in _FREE_KEYS and key not in _WHOLE_KEYS:
            yield from _walk(v, key + ".")
        else:
            yield key, v


def _get(d: dict, dotted: str) -> Any:
    cur: Any = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(dotted)
        cur = cur[part]
    return cur


def _set(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = d
    for part in parts[:-1]:
        nxt = cur.get(part)
        if not isinstance(nxt, dict):
            nxt = cur[part] = {}
        cur = nxt
    cur[parts[-1]] = value


def _nest(flat: dict[str, Any]) -> dict:
    """Dotted overrides → nested dict. ``ablation.vary.<dotted>`` keys go into vary whole."""
    out: dict = {}
    for key, value in flat.items():
        if key.startswith(_VARY_KEY + "."):
            out.setdefault("ablation", {}).setdefault("vary", {})[key[len(_VARY_KEY) + 1:]] = value
        else:
            _set(out, key, value)
    return out


def diff(a: dict, b: dict) -> dict[str, tuple[Any, Any]]:
    """Dotted key → (value in a, value in b) for every leaf that differs; missing is None."""
    fa, fb = dict(_walk(a)), dict(_walk(b))
    return {k: (fa.get(k), fb.get(k)) for k in sorted(fa.keys() | fb.keys()) if fa.get(k) != fb.get(k)}


# ----------------------------------------------------------------------------- schema


_schema_cache: dict | None = None


def _schema() -> dict:
    """base.yaml's parsed defaults (read once)."""
    global _schema_cache
    if _schema_cache is None:
        _schema_cache = _read_yaml(BASE_PATH)
    return _schema_cache


def _leaf_keys() -> list[str]:
    return [k for k, _ in _walk(_schema())]


def _show(path: Path | str) -> str:
    """A path as the user would type it: relative to the cwd when it is under it."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def _suggest(key: str) -> str:
    """' — did you mean …?' for the nearest valid key, or the valid keys of that section."""
    section, _, last = key.rpartition(".")
    try:
        sub = _get(_schema(), section) if section else _schema()
    except KeyError:
        sub = None
    if sub is not None and not isinstance(sub, dict):
        return f" — '{section}' is a value, not a section with keys"
    if sub is not None:
        # right section, misspelt name; stricter at the top, where a stray nested key is likelier
        near = difflib.get_close_matches(last, list(sub), n=1, cutoff=0.6 if section else 0.8)
        if near:
            return f" — did you mean '{f'{section}.' if section else ''}{near[0]}'?"
    # misspelt section, or a key put in the wrong one; never suggest the key's own ancestors
    keys = [k for k in _leaf_keys() + [k for k, _ in _walk_sections(_schema())] if not key.startswith(k + ".")]
    near = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    if not near:
        lasts = sorted({k.rsplit(".", 1)[-1] for k in keys})
        best = difflib.get_close_matches(last, lasts, n=1, cutoff=0.8)
        near = [k for k in keys if best and k.rsplit(".", 1)[-1] == best[0]]
    if near:
        return f" — did you mean {' or '.join(repr(k) for k in near)}?"
    if sub is None:
        sub, section = _schema(), ""
    where = f"under '{section}'" if section else "at the top level"
    return f" — valid keys {where}: {', '.join(sub)}"


def _walk_sections(d: dict, prefix: str = "") -> Iterator[tuple[str, dict]]:
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in _FREE_KEYS and key != _VARY_KEY:
            yield key, v
            yield from _walk_sections(v, key + ".")


def _default_of(dotted: str) -> Any:
    return _get(_schema(), dotted)


def is_valid_key(dotted: str) -> bool:
    """True for any key of base.yaml (a leaf or a section)."""
    try:
        _default_of(dotted)
    except KeyError:
        return False
    return True


# ----------------------------------------------------------------------------- checks


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _check_value(src: str, key: str, value: Any) -> Any:
    """Type, enum and range check of one leaf against base.yaml; returns the normalised value.

    Normalising ints to floats where base has a float keeps the hash independent of
    whether someone wrote ``lr: 1`` or ``lr: 1.0``.
    """
    default = _default_of(key)
    want = type(default)
    if isinstance(default, dict):
        raise ConfigError(f"{src}: '{key}' is a section, not a value: set its keys, "
                          f"e.g. '{key}.{next(iter(default), 'x')}'")
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if want is float and isinstance(value, str) and _YAML11_EXP_RE.fullmatch(value.strip()):
        value = float(value)  # PyYAML follows YAML 1.1, which reads `lr: 1e-4` as text
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        hint = ""
        if want is str and isinstance(value, bool):
            hint = "; YAML reads a bare yes/no/on/off as a boolean, so quote the word (e.g. \"no\")"
        elif want is str:
            hint = f"; quote it: \"{value}\""
        raise ConfigError(f"{src}: '{key}' must be {_TYPE_WORDS[want]}, got {_describe(value)}{hint} "
                          f"(default: {default!r})")
    if want is float and not math.isfinite(value):
        raise ConfigError(f"{src}: '{key}' must be a finite number, got {value!r}")
    if want is list:
        value = _check_list(src, key, default, value)
    if key in ENUMS and value not in ENUMS[key]:
        raise ConfigError(f"{src}: '{key}' is {value!r}; allowed values: {', '.join(ENUMS[key])}")
    if key in _RANGES:
        _check_range(src, key, value)
    if key in _MULTIPLE_OF_8 and value % 8:
        lo = value // 8 * 8
        use = f"{lo} or {lo + 8}" if lo else "8"
        raise ConfigError(f"{src}: '{key}': resolution {value} is not a multiple of 8: use {use}")
    if key == "data.instance_images":
        _check_instance_syntax(src, value)
    if key == "data.class_images":
        _check_class_syntax(src, value)
    return value


def _check_list(src: str, key: str, default: list, value: list) -> list:
    elem = _LIST_ELEMENTS.get(key) or (type(default[0]) if default else str)
    out = []
    for i, item in enumerate(value):
        if elem is float and isinstance(item, int) and not isinstance(item, bool):
            item = float(item)
        if not isinstance(item, elem) or (elem is int and isinstance(item, bool)):
            raise ConfigError(f"{src}: '{key}[{i}]' must be {_TYPE_WORDS[elem]}, got {_describe(item)} "
                              f"(default list: {default!r})")
        out.append(item)
    bad = [x for x in out if key in LIST_ENUMS and x not in LIST_ENUMS[key]]
    if bad:
        raise ConfigError(f"{src}: '{key}' holds {bad[0]!r}; allowed values: {', '.join(LIST_ENUMS[key])}")
    if key in _NON_EMPTY_LISTS and not out:
        raise ConfigError(f"{src}: '{key}' must not be empty (default: {default!r})")
    if key in _NON_NEGATIVE_INT_LISTS and any(x < 0 for x in out):
        raise ConfigError(f"{src}: '{key}' must hold seeds ≥ 0, got {out!r}")
    return out


def _check_range(src: str, key: str, value: float) -> None:
    lo, hi, lo_inclusive = _RANGES[key]
    bad = (lo is not None and (value < lo if lo_inclusive else value <= lo)) or (hi is not None and value > hi)
    if not bad:
        return
    if lo is not None and hi is not None:
        rule = f"between {lo} and {hi}"
    elif lo_inclusive:
        rule = f"≥ {lo}"
    else:
        rule = f"> {lo}"
    raise ConfigError(f"{src}: '{key}' must be {rule}, got {value!r}")


_TOYWORLD_RE = re.compile(r"toyworld:([a-z_]+)(?:@([1-9][0-9]?))?")  # @n: that many photos (data-amount runs)


def _toyworld_subjects() -> dict | None:
    """The toy world's subjects and styles by name, when it ships them (import is lazy: it
    pulls numpy/PIL). A style is trained like a subject: its folder is its training set."""
    try:
        from .toyworld.styles import STYLES
        from .toyworld.subjects import SUBJECTS
    except ImportError:
        return None
    return {**SUBJECTS, **STYLES}


def _check_instance_syntax(src: str, value: str) -> None:
    if not value:
        raise ConfigError(f"{src}: 'data.instance_images' is empty: give a folder of subject photos "
                          "or toyworld:<subject>")
    if value.startswith("toyworld:"):
        m = _TOYWORLD_RE.fullmatch(value)
        subjects = _toyworld_subjects()
        known = f"; known subjects and styles: {', '.join(subjects)}" if subjects else ""
        if not m:
            raise ConfigError(f"{src}: 'data.instance_images' {value!r} is not toyworld:<name> (or "
                              f"toyworld:<name>@<photos, 1-99>) with a lowercase name{known}")
        if subjects is not None and m.group(1) not in subjects:
            raise ConfigError(f"{src}: 'data.instance_images' names unknown toy-world subject or style "
                              f"{m.group(1)!r}{known}")


_TOYWORLD_CLASS_RE = re.compile(r"toyworld:class:([a-z_]+)(?:@([1-9][0-9]{0,2}))?")  # @n: that many images


def _check_class_syntax(src: str, value: str) -> None:
    """A folder, or toyworld:class:<shape>[@n] (the world's own pictures of the class)."""
    if not value.startswith("toyworld:"):
        return
    try:  # lazy, like _toyworld_subjects: it pulls numpy/PIL
        from .toyworld.scenes import SHAPES as shapes
    except ImportError:
        shapes = ()
    known = f"; known shapes: {', '.join(shapes)}" if shapes else ""
    m = _TOYWORLD_CLASS_RE.fullmatch(value)
    if not m:
        raise ConfigError(f"{src}: 'data.class_images' {value!r} is not toyworld:class:<shape> (or "
                          f"toyworld:class:<shape>@<images, 1-999>){known}")
    if shapes and m.group(1) not in shapes:
        raise ConfigError(f"{src}: 'data.class_images' names unknown toy-world shape {m.group(1)!r}{known}")


def _check_tree(src: str, raw: Any, *, top: bool) -> dict:
    """Validate one source (a file or the command line) key by key; returns it normalised."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: params must be a mapping of keys to values, got {type(raw).__name__}")
    out: dict = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ConfigError(f"{src}: key {key!r} must be a string")
        if key == "extends":
            if not top:
                raise ConfigError(f"{src}: 'extends' can only be set at the top of a params file")
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{src}: 'extends' must be a path to another params file, got {value!r}")
            out[key] = value
            continue
        out[key] = _check_node(src, key, value)
    return out


VERDICTS = ("agrees", "differs", "partly")


def _check_conclusion(path: Path, params: dict, parent: dict | None) -> None:
    """A conclusion cites its table by reference; a figure copied into the prose is refused
    (dbkit.conclusions: a copy outlives its table, and a wrong one passed whenever some other
    cell rounded to it). The values the experiment sets or varies are settings, not figures."""
    from . import conclusions

    text = " ".join(str((params.get("notes") or {}).get("conclusion") or "").split())
    if not text:
        return
    changed = {k: v for k, v in (diff(parent, params) if parent else {}).items() if not k.startswith("notes")}
    ab = params.get("ablation") or {}
    bare = conclusions.bare_figures(text, conclusions.params_figures(ab.get("vary"), ab.get("variants"), changed))
    if bare:
        raise ConfigError(
            f"{_show(path)}: 'notes.conclusion' copies figure(s) {', '.join(bare)} into the prose: cite the table "
            "instead, as {metric@row} (e.g. {prompt_fidelity@main}, {subject_fidelity@prior.enabled=False - main} "
            "for a difference with its interval), or put a figure of an earlier run in backticks and say which run")


def _check_verdict(src: str, notes: Any) -> None:
    """notes is free prose, except notes.verdict, which the reports index tabulates."""
    v = notes.get("verdict") if isinstance(notes, dict) else None
    if v not in (None, "", *VERDICTS):
        raise ConfigError(f"{src}: 'notes.verdict' must be one of {', '.join(VERDICTS)} (or empty), got {v!r}")


def _check_node(src: str, key: str, value: Any) -> Any:
    if not is_valid_key(key):
        raise ConfigError(f"{src}: unknown key '{key}'{_suggest(key)}")
    if key in _FREE_KEYS:
        _check_verdict(src, value)
        return value
    if key == _VARY_KEY:
        return _check_vary(src, value)
    if key == _VARIANTS_KEY:
        return _check_variants(src, value)
    default = _default_of(key)
    if isinstance(default, dict):
        if value is None:  # `train:` with every line under it commented out
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: '{key}' must be a mapping of its keys ({', '.join(default)}), "
                              f"got {_describe(value)}")
        return {k: _check_node(src, f"{key}.{k}", v) for k, v in value.items()}
    return _check_value(src, key, value)


def _check_vary(src: str, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{src}: '{_VARY_KEY}' must map dotted keys to lists of values, "
                          f"e.g. {{train.lora.rank: [4, 8, 32]}}; got {_describe(value)}")
    out = {}
    for key, values in value.items():
        where = f"{_VARY_KEY}: {key}"
        if not isinstance(key, str) or not is_valid_key(key):
            raise ConfigError(f"{src}: '{where}' is not a param: unknown key '{key}'{_suggest(str(key))}")
        if key.split(".")[0] in ("ablation", "experiment", "notes") or isinstance(_default_of(key), dict):
            raise ConfigError(f"{src}: '{where}': only a single param can be varied, not '{key}'")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{src}: '{where}' must be a non-empty list of values, got {_describe(values)}")
        out[key] = [_check_value(f"{src} ({_VARY_KEY})", key, v) for v in values]
    return out


def _check_variants(src: str, value: Any) -> dict:
    """Named variants that change several params at once: {name: {dotted.key: value, …}}."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, dict) and v for v in value.values()):
        raise ConfigError(f"{src}: '{_VARIANTS_KEY}' must map a variant name to its overrides, e.g. "
                          f"{{full-unet: {{train.method: full, train.text_encoder: false}}}}; got {_describe(value)}")
    out = {}
    for name, overrides in value.items():
        where = f"{_VARIANTS_KEY}: {name}"
        checked = {}
        for key, v in overrides.items():
            if not isinstance(key, str) or not is_valid_key(key):
                raise ConfigError(f"{src}: '{where}': unknown key '{key}'{_suggest(str(key))}")
            if key.split(".")[0] in ("ablation", "experiment", "notes") or isinstance(_default_of(key), dict):
                raise ConfigError(f"{src}: '{where}': only single params can be set, not '{key}'")
            checked[key] = _check_value(f"{src} ({where})", key, v)
        out[str(name)] = checked
    return out


def _check_resolved(exp_src: str, params: dict, origin: dict[str, str], check_files: bool) -> None:
    """Checks across keys, and checks against the disk and this machine, on the merged params:
    everything the notebooks would otherwise find out later (training used to check some of
    these 20–40 s in), so that a params mistake fails here, before any data work."""
    def src(key: str) -> str:
        return origin.get(key, exp_src)

    _check_name(src("experiment"), params["experiment"])
    _check_combination(src, exp_src, params)
    if params["metrics"]["backend"] == "clip" and not params["metrics"]["clip_model"]:
        raise ConfigError(f"{src('metrics.backend')}: metrics.backend is clip but metrics.clip_model is "
                          "empty: point it at a local CLIP folder")
    _check_captions(src, params)
    _check_merge(src, params, check_files)
    _check_detector(src, params["data"])
    if not check_files:
        return
    _check_detector_files(src, params["data"])
    _check_machine(src, params["train"])
    inst = params["data"]["instance_images"]
    if not inst.startswith("toyworld:"):
        _check_image_folder(src("data.instance_images"), "data.instance_images", inst)
        if params["train"]["masked_loss"] and params["data"]["matte"] != "rembg":  # rembg makes the masks
            _check_masks(src("train.masked_loss"), inst, "train.masked_loss is true")
        if params["data"]["matte"] == "mask":
            _check_masks(src("data.matte"), inst, "data.matte is mask")
    if params["data"]["class_images"] and not params["data"]["class_images"].startswith("toyworld:"):
        _check_image_folder(src("data.class_images"), "data.class_images", params["data"]["class_images"])
    family = _check_model(src, params)
    _check_family(src, params, family)
    _check_resolution(src, params, family)
    for section, folder in caption_models(params).items():
        problem = model_folders.folder_problem(section, folder)
        if problem:
            raise ConfigError(f"{src(f'captions.{section}.model')}: {problem}")
    for key in ("clip_model", "dino_model"):
        folder = params["metrics"][key]
        if params["metrics"]["backend"] == "clip" and folder and not Path(folder).is_dir():
            raise ConfigError(f"{src('metrics.' + key)}: 'metrics.{key}' folder {folder!r} does not exist "
                              f"(relative to {Path.cwd()}): download the model elsewhere and point "
                              f"metrics.{key} at the local folder")
    lpips = params["metrics"]["lpips_model"]
    if params["metrics"]["backend"] == "clip" and lpips and not Path(lpips).is_file():
        raise ConfigError(f"{src('metrics.lpips_model')}: 'metrics.lpips_model' file {lpips!r} does not exist "
                          f"(relative to {Path.cwd()}): point it at a safetensors file or leave it empty")


# An experiment name names folders (runs/<name>/, reports/<name>/, variants' <name>__<value>/):
# file systems cap a name at 255 bytes (eCryptfs at 143), so dbkit caps it well below that.
MAX_NAME = 120


def _check_name(src: str, name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ConfigError(f"{src}: experiment name {name!r} must be usable as a folder name "
                          "(letters, digits, '.', '_', '-')")
    if len(name) > MAX_NAME:
        raise ConfigError(f"{src}: experiment name {name[:40]}… is {len(name)} characters long; it names folders, "
                          f"whose names file systems limit: use at most {MAX_NAME} characters")


def variant_name(exp_name: str, label: str) -> str:
    """An ablation variant's experiment (and folder) name: ``<experiment>__<label>``."""
    return f"{exp_name}__{re.sub(r'[^A-Za-z0-9._-]+', '_', label)}"


def _check_combination(src: Callable[[str], str], exp_src: str, params: dict) -> None:
    """Settings that cannot train together, whatever the base or the machine."""
    t = params["train"]
    if not (t["unet"] or t["text_encoder"] or t["pivotal"]["enabled"]):
        raise ConfigError(f"{exp_src}: nothing to train: set train.unet, train.text_encoder or "
                          "train.pivotal.enabled to true")
    try:
        methods.get(t["method"]).check(params)
    except methods.ParamsProblem as e:
        raise ConfigError(f"{src(e.key)}: {e}") from None
    if t["pivotal"]["enabled"] and params["captions"]["trigger"] == "none":
        raise ConfigError(f"{src('train.pivotal.enabled')}: train.pivotal.enabled needs a token in the captions "
                          "but captions.trigger is none: set captions.trigger to identifier or word (the new "
                          "tokens replace captions.identifier)")
    if t["min_snr_gamma"] > 0 and t["prediction"] == "edm":
        raise ConfigError(f"{src('train.min_snr_gamma')}: 'train.min_snr_gamma' is defined for DDPM timesteps, not "
                          "EDM's σ (train.prediction is edm): set it to 0 (EDM's λ(σ) weighting already balances "
                          "noise levels)")
    p = params["prior"]
    if p["enabled"] and not params["data"]["class_images"] and p["num_images"] == 0:
        raise ConfigError(f"{src('prior.num_images')}: 'prior.num_images' is 0 but prior.enabled is true and "
                          "data.class_images is empty: no class image would be generated; set prior.num_images "
                          "(e.g. 32) or prior.enabled: false")
    _check_prodigy(src, t)


def _check_machine(src: Callable[[str], str], t: dict) -> None:
    """Settings this machine cannot run: a missing package or no GPU."""
    import importlib.util

    _check_adamw8bit(src, t)
    if t["log_with"] != "none" and importlib.util.find_spec(t["log_with"]) is None:
        raise ConfigError(f"{src('train.log_with')}: 'train.log_with' is {t['log_with']} but it is not installed: "
                          f"`pip install {t['log_with']}`, or set train.log_with: none (train_log.jsonl is "
                          "always written)")
    if t["mixed_precision"] == "fp16":
        import torch  # only here: importing torch costs seconds at every params load

        if not torch.cuda.is_available():
            raise ConfigError(f"{src('train.mixed_precision')}: 'train.mixed_precision' is fp16, which needs a "
                              "CUDA GPU, and this machine has none: use bf16 or no")


def _check_family(src: Callable[[str], str], params: dict, family: str) -> None:
    """Settings the base model's family rules out (EDM needs an EDM-trained base, and back)."""
    t = params["train"]
    want, edm_base = t["prediction"], family == "playground"
    if want != "auto" and (want == "edm") != edm_base:
        trained = "with EDM" if edm_base else "for DDPM timesteps"
        raise ConfigError(f"{src('train.prediction')}: 'train.prediction' is {want} but base.model is a {family} "
                          f"model, trained {trained}: EDM training needs an EDM-trained base such as Playground "
                          "v2.5 (and such a base needs EDM); set train.prediction: auto")
    if t["min_snr_gamma"] > 0 and edm_base:
        raise ConfigError(f"{src('train.min_snr_gamma')}: 'train.min_snr_gamma' is defined for DDPM timesteps, but "
                          "base.model is a playground model trained with EDM: set it to 0 (EDM's λ(σ) weighting "
                          "already balances noise levels)")


def _check_resolution(src: Callable[[str], str], params: dict, family: str) -> None:
    """data.resolution against the base's architecture (models.resolution_step): too small a
    resolution trained without a word and learned nothing."""
    from .models import resolution_step, resolve

    step, res = resolution_step(resolve(params["base"]["model"])), params["data"]["resolution"]
    if step is None or (res >= step and res % step == 0):
        return
    lo = res // step * step
    use = f"{lo} or {lo + step}" if lo else str(step)
    raise ConfigError(f"{src('data.resolution')}: 'data.resolution' is {res}, but this {family} base "
                      f"({params['base']['model']}) needs a multiple of {step} (its VAE and UNet downsample "
                      f"{step}×), so at least {step}: use {use}")


def check_training(params: dict, family: str) -> None:
    """The cross-key, machine and family checks of :func:`load`, for params built without it
    (train.check_combination calls this; the message names the key as ``params``)."""
    def src(key: str) -> str:
        return "params"

    _check_combination(src, "params", params)
    _check_machine(src, params["train"])
    _check_family(src, params, family)


def _adapt_method_defaults(params: dict) -> None:
    """The method's own adjustments of base.yaml's defaults (DoRA leaves the default UNet
    targets that are convolutions out), said once."""
    method = methods.METHODS.get(params["train"]["method"])  # an unknown name is refused later
    message = method and method.adapt_defaults(params, _default_of("train.lora.unet_targets"))
    if message:
        _warn_once(message)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    # a params file is loaded many times per run (each variant, the parent): say it once
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr)


def _check_prodigy(src: Callable[[str], str], t: dict) -> None:
    """Prodigy estimates the step size itself; a group's lr only scales that estimate, so
    it must be ≈ 1 (train.check_combination says the same at training time), and the
    UNet and text encoder get the same one, as in diffusers' DreamBooth scripts."""
    if t["optimizer"] != "prodigy":
        return
    fix = "set train.lr: 1.0 and train.text_encoder_lr: 1.0"
    if t["lr"] < 0.1:
        raise ConfigError(f"{src('train.lr')}: 'train.lr' is {t['lr']} but train.optimizer=prodigy adapts its own "
                          f"step size and expects train.lr≈1.0: {fix}")
    if t["text_encoder"] and t["text_encoder_lr"] < 0.1:
        raise ConfigError(f"{src('train.text_encoder_lr')}: 'train.text_encoder_lr' is {t['text_encoder_lr']} but "
                          f"train.optimizer=prodigy adapts its own step size and expects lr≈1.0: {fix}")
    if t["unet"] and t["text_encoder"] and t["text_encoder_lr"] != t["lr"]:
        raise ConfigError(f"{src('train.text_encoder_lr')}: 'train.text_encoder_lr' is {t['text_encoder_lr']} but "
                          f"train.lr is {t['lr']}: train.optimizer=prodigy needs the same lr≈1.0 for the UNet and "
                          f"the text encoder: {fix}")


def _check_adamw8bit(src: Callable[[str], str], t: dict) -> None:
    """bitsandbytes' 8-bit AdamW needs the package and a CUDA GPU; say so at load, not at step 0."""
    if t["optimizer"] != "adamw8bit":
        return
    import importlib.util

    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        problem = "bitsandbytes is not installed (pip install bitsandbytes)"
    elif not torch.cuda.is_available():
        problem = "this machine has no CUDA GPU, which bitsandbytes' 8-bit AdamW needs"
    else:
        try:
            import bitsandbytes  # noqa: F401
        except Exception as e:  # noqa: BLE001 - a broken install fails in many ways
            problem = f"bitsandbytes cannot be imported ({type(e).__name__}: {e})"
        else:
            return
    raise ConfigError(f"{src('train.optimizer')}: 'train.optimizer' is adamw8bit but {problem}: "
                      "use train.optimizer: adamw")


def _check_captions(src: Callable[[str], str], params: dict) -> None:
    """Caption settings that would make every training caption empty. Fixed captions are
    known now; other sources are checked when captions are built (captions.check_keep_tags)."""
    c = params["captions"]
    if c["dropout"] >= 1:
        raise ConfigError(f"{src('captions.dropout')}: 'captions.dropout' is {c['dropout']}: every training "
                          "caption would be empty and the subject's name never seen; use a value below 1 "
                          "(0.05–0.1 is usual)")
    for section, folder in caption_models(params).items():
        if not folder:
            key = f"captions.{section}.model"
            raise ConfigError(f"{src('captions.source')}: captions.source is {c['source']} but '{key}' is empty: "
                              f"download the model where you have network (`{model_folders.download_hint(section)}`), "
                              f"copy the folder here and set {key}: {model_folders.EXAMPLE_FOLDER[section]}")
    if c["source"] == "fixed" and c["keep_tags"]:
        from .captions import caption_for, check_keep_tags
        from .data import DataError

        try:
            check_keep_tags([caption_for({"file": ""}, params)], params)
        except DataError as e:
            raise ConfigError(f"{src('captions.keep_tags')}: {e}") from None


def _check_merge(src: Callable[[str], str], params: dict, check_files: bool) -> None:
    """merge.*: enough LoRAs for the methods, one weight each, and sources that exist."""
    m = params["merge"]
    if not (m["methods"] or m["weight_grid"]):
        return
    if len(m["loras"]) < 2:
        raise ConfigError(f"{src('merge.loras')}: merging needs at least two LoRAs in merge.loras (\"this\", a "
                          f"params file or a LoRA file), got {m['loras']!r}")
    if m["weights"] and len(m["weights"]) != len(m["loras"]):
        raise ConfigError(f"{src('merge.weights')}: {len(m['weights'])} weights for {len(m['loras'])} LoRAs: give one "
                          "weight per entry of merge.loras, or none (1.0 each)")
    if m["weight_grid"] and len(m["loras"]) != 2:
        raise ConfigError(f"{src('merge.weight_grid')}: the weight grid is wA × wB: it needs exactly two LoRAs")
    if "ziplora" in m["methods"] and len(m["loras"]) != 2:
        raise ConfigError(f"{src('merge.methods')}: ZipLoRA merges exactly two LoRAs (a subject and a style)")
    if not check_files:
        return
    for entry in m["loras"]:
        if entry != "this" and merge_source(entry, Path(src("merge.loras"))) is None:
            raise ConfigError(f"{src('merge.loras')}: {entry!r} does not exist (relative to {Path.cwd()} or the "
                              "project root): name \"this\", a params file, a run folder or a LoRA .safetensors file")


def merge_sources_identity(params: dict, params_file: Path) -> list:
    """What each merge.loras entry is, beyond its name: a params file's run hash, a run
    folder's hash.txt, a LoRA file's sha256 ("this" and a missing entry as written)."""
    from .data import file_digest

    out: list = []
    for entry in (params.get("merge") or {}).get("loras") or []:
        path = None if entry == "this" else merge_source(entry, params_file)
        if path is None:
            out.append(entry)
        elif path.suffix in (".yaml", ".yml"):
            out.append(load(path, check_prose=False).hash)
        elif path.is_file():
            out.append(file_digest(path))
        else:
            out.append((path / "hash.txt").read_text().strip() if (path / "hash.txt").is_file() else str(path))
    return out


def merge_source(entry: str, params_file: Path) -> Path | None:
    """A merge.loras path as given (relative to the working directory), else relative to the
    project root of the params file that names it; None when neither exists."""
    from .paths import project_root

    for path in (Path(entry), project_root(params_file) / entry):
        if path.exists():
            return path
    return None


def _check_image_folder(src: str, key: str, folder: str) -> None:
    p = Path(folder)
    what = "subject photos" if key == "data.instance_images" else "class images"
    fix = f"put your {what} in {folder} or point {key} at them"
    if not p.is_dir():
        raise ConfigError(f"{src}: '{key}' folder {folder!r} does not exist (relative to {Path.cwd()}): {fix}")
    if not any(f.suffix.lower() in IMAGE_SUFFIXES and f.is_file() for f in p.iterdir()):
        from .data import unsupported_note

        note = unsupported_note(p)
        raise ConfigError(f"{src}: '{key}' folder {folder!r} has no images dbkit reads; {note}" if note else
                          f"{src}: '{key}' folder {folder!r} has no images ({' '.join(IMAGE_SUFFIXES)}): {fix}")
    _check_text_files(p)


def _check_detector(src: Callable[[str], str], d: dict) -> None:
    """A face filter or crop needs a detector; the oracle reads only the toy world's renders."""
    for key, on in (("min_face_ratio", d["min_face_ratio"] > 0), ("crop_to", d["crop_to"] != "none")):
        if on and d["detector"] == "none":
            raise ConfigError(f"{src('data.' + key)}: 'data.{key}' needs a detector but data.detector is none: set "
                              "data.detector: opencv (or yolo with data.detector_model; oracle on the toy world)")
    if d["matte_background"]:
        from PIL import ImageColor

        try:
            ImageColor.getrgb(d["matte_background"])
        except ValueError:
            raise ConfigError(f"{src('data.matte_background')}: 'data.matte_background' {d['matte_background']!r} is "
                              "not a colour: use a name (white, gray) or #rrggbb, or \"\" to keep the photo") from None
    if d["detector"] == "oracle" and not str(d["instance_images"]).startswith("toyworld:"):
        raise ConfigError(f"{src('data.detector')}: 'data.detector' is oracle, which reads only the toy world's "
                          "renders, but data.instance_images is a folder of photos: use opencv or yolo")


def _check_detector_files(src: Callable[[str], str], d: dict) -> None:
    """The detector's and matting model's files must exist, and their packages be installed,
    before any data work."""
    import importlib.util

    model = d["detector_model"]
    if (model or d["detector"] in ("yolo", "onnx")) and not Path(model).is_file():
        raise ConfigError(f"{src('data.detector_model')}: 'data.detector_model' file {model!r} does not exist "
                          f"(relative to {Path.cwd()}): point it at local YOLO weights (.pt for yolo, a YOLOv8-style "
                          ".onnx export for onnx), downloaded elsewhere")
    matte = d["matte_model"]
    if (matte or d["matte"] == "rembg") and not Path(matte).is_file():
        raise ConfigError(f"{src('data.matte_model')}: 'data.matte_model' file {matte!r} does not exist "
                          f"(relative to {Path.cwd()}): point it at a local ONNX matting model (e.g. u2net.onnx)")
    if d["matte"] == "rembg" and importlib.util.find_spec("rembg") is None:
        raise ConfigError(f"{src('data.matte')}: 'data.matte' is rembg, which needs the rembg package: "
                          "`pip install rembg`, or set data.matte: mask (with <stem>.mask.png beside each photo)")
    if d["detector"] == "yolo" and importlib.util.find_spec("ultralytics") is None:
        raise ConfigError(f"{src('data.detector')}: 'data.detector' is yolo, which needs the ultralytics package: "
                          "`pip install ultralytics`, or set data.detector: opencv")


def _check_masks(src: str, folder: str, why: str) -> None:
    """Masked loss and `data.matte: mask` need a mask for every photo: found here, not later."""
    from .data import DataError, list_images
    from .masks import check_all

    try:
        check_all(list_images(Path(folder)), why=why)
    except DataError as e:
        raise ConfigError(f"{src}: {e}") from None


def _check_text_files(folder: Path) -> None:
    """Caption sidecars (<stem>.txt) and metadata.jsonl must be UTF-8: a stray Latin-1 byte
    would otherwise fail 01_data with a decode error that names no file."""
    texts = [f.with_suffix(".txt") for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    for f in [*texts, folder / "metadata.jsonl"]:
        if f.is_file():
            what = "the caption sidecar" if f.suffix == ".txt" else "metadata.jsonl"
            _decode(f, f.read_bytes(), what)


def _check_model(src: Callable[[str], str], params: dict) -> str:
    """The base's family (read from its config files: cheap), or a ConfigError naming the
    file that set base.model, or base.family when that is what contradicts the model."""
    from .models import ModelError, family_of, resolve

    try:
        path = resolve(params["base"]["model"])
    except ModelError as e:
        raise ConfigError(f"{src('base.model')}: {e}") from None
    try:
        return family_of(params, path)
    except ModelError as e:
        raise ConfigError(f"{src('base.family')}: {e}") from None
    except (OSError, ValueError) as e:  # an unreadable or hand-edited model_index.json
        raise ConfigError(f"{src('base.model')}: cannot read the base model's config ({e}): point base.model "
                          "at a complete diffusers folder") from None


# ----------------------------------------------------------------------------- loading


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line, self.first = key, line, first


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping: plain YAML keeps the last one
    silently, so a second `train:` block would drop the first one's settings."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may repeat keys on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                break
            if first != line:
                raise _DuplicateKey(key, line, first)
        return super().construct_mapping(node, deep=deep)


def _decode(path: Path, raw: bytes, what: str) -> str:
    """UTF-8 text of a file, or a ConfigError naming the file, the line and the fix."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"{_show(path)}: line {line}: {what} is not UTF-8 text (byte 0x{raw[e.start]:02x}): "
                          "save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None


def _read_yaml(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{_show(path)}: params file not found") from None
    except IsADirectoryError:
        from .paths import folder_not_params

        raise ConfigError(folder_not_params(_show(path))) from None
    except OSError as e:
        raise ConfigError(f"{_show(path)}: cannot read params file: {e.strerror or e}") from None
    text = _decode(path, raw, "the params file")
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as e:
        raise ConfigError(f"{_show(path)}: line {e.line}: key {e.key!r} is set twice in the same block (first on "
                          f"line {e.first}); YAML would keep only the last one: merge the two into one") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{_show(path)}:{line}: invalid YAML ({problem}): fix the syntax there") from None
    if data is None:
        # an empty file used to run base.yaml's default experiment under this file's name
        raise ConfigError(f"{_show(path)}: the params file is empty (or all comments): write at least "
                          "`extends: base.yaml` and the keys this experiment changes")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lora.rank=32"`` → ``("train.lora.rank", 32)``; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"command line: override {text!r} is not key=value: write e.g. train.lora.rank=32")
    raw = raw.strip()
    if not raw:
        return key, ""
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"command line: override {text!r}: the value is not valid YAML ({e}); "
                          "quote strings that contain ':' or '#'") from None


def _parse_overrides(overrides: list[str] | dict | None) -> dict[str, Any]:
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    flat: dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        # `-p captions.identifier=123` or `-p train.mixed_precision=no` means the string the user typed
        if not isinstance(value, str) and is_valid_key(key) and isinstance(_default_of(key), str):
            value = text.partition("=")[2].strip()
        flat[key] = value
    return flat


def _merge(into: dict, over: dict, prefix: str = "") -> None:
    """Deep merge in place: dicts merge, lists and scalars (and ablation.vary) replace."""
    for k, v in over.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and isinstance(into.get(k), dict) and key not in _WHOLE_KEYS:
            _merge(into[k], v, key + ".")
        else:
            into[k] = copy.deepcopy(v)


def _record_origin(origin: dict[str, str], tree: dict, src: str) -> None:
    for key, _ in _walk(tree):
        origin[key] = src
    # ablation.vary arrives whole; record it under its own key too
    for whole in _WHOLE_KEYS:
        if isinstance(tree.get("ablation"), dict) and whole.split(".")[1] in tree["ablation"]:
            origin[whole] = src


def _chain(path: Path) -> list[tuple[Path, dict]]:
    """(file, validated raw params) from the root of the chain to ``path``."""
    seen: list[Path] = []
    out: list[tuple[Path, dict]] = []
    cur = path.resolve()
    while True:
        if cur in seen:
            loop = " → ".join(_show(p) for p in [*seen[seen.index(cur):], cur])
            raise ConfigError(f"{_show(seen[-1])}: extends cycle {loop}: one of these files must extend "
                              "another (ultimately params/base.yaml)")
        seen.append(cur)
        raw = _check_tree(_show(cur), _read_yaml(cur), top=True)
        out.append((cur, raw))
        parent = raw.get("extends")
        if parent is None:
            break
        nxt = (cur.parent / parent).resolve()
        if not nxt.is_file():
            raise ConfigError(f"{_show(cur)}: 'extends: {parent}' not found (looked for {_show(nxt)}); "
                              "the path is relative to the file that says it")
        cur = nxt
    out.reverse()
    if out[0][0] != BASE_PATH.resolve():
        # base.yaml holds every default, so it always sits under a chain, said or not
        out.insert(0, (BASE_PATH.resolve(), _check_tree(_show(BASE_PATH), _read_yaml(BASE_PATH), top=True)))
    return out


def _resolve(chain: list[tuple[Path, dict]], flat: dict[str, Any], check_files: bool, *,
             top: Path, override_src: str = "command line") -> tuple[dict, str]:
    """Merge a chain plus overrides into validated params; returns (params, name)."""
    base_path, base_raw = chain[0]
    params: dict = copy.deepcopy(base_raw)
    origin: dict[str, str] = {}
    _record_origin(origin, base_raw, _show(base_path))
    last = len(chain) - 1
    for i, (path, raw) in enumerate(chain[1:], start=1):
        tree = {k: v for k, v in raw.items() if k != "extends" and (i == last or k not in _NOT_INHERITED)}
        _merge(params, tree)
        _record_origin(origin, tree, _show(path))
    params.pop("extends", None)
    if flat:
        tree = _check_tree(override_src, _nest(flat), top=False)
        _merge(params, tree)
        _record_origin(origin, tree, override_src)
    name = params.get("experiment") or top.stem
    params["experiment"] = name
    _adapt_method_defaults(params)
    _check_resolved(_show(top), params, origin, check_files)
    return params, name


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A resolved, validated experiment: what one params file (plus overrides) asks for."""

    name: str
    path: Path
    params: dict
    chain: tuple[Path, ...]
    hash: str
    _parent: dict | None = dataclasses.field(default=None, repr=False, compare=False)
    _check_files: bool = dataclasses.field(default=True, repr=False, compare=False)

    @functools.cached_property
    def version(self) -> str:
        """The report version's hash (:func:`version_hash`): the run hash plus the ablation,
        merge and report sections and the merge sources' identities, so that an edited
        experiment (or an edited merge source) is a new report version."""
        return version_hash(self.params, self.hash, merge_sources_identity(self.params, self.path))

    def get(self, dotted: str) -> Any:
        """``exp.get("train.lora.rank")``; KeyError (with a suggestion) for an unknown key."""
        try:
            return _get(self.params, dotted)
        except KeyError:
            raise KeyError(f"unknown key '{dotted}'{_suggest(dotted)}") from None

    def with_overrides(self, overrides: dict[str, Any], name: str | None = None) -> Experiment:
        """A validated copy with dotted overrides applied (an ablation variant); ``name`` renames it."""
        flat = dict(overrides)
        flat["experiment"] = name or self.name
        params, new_name = _resolve([(self.path, self.params)], flat, self._check_files,
                                    top=self.path, override_src=f"{_show(self.path)} (overrides)")
        return dataclasses.replace(self, name=new_name, params=params, hash=params_hash(params))

    def parent_params(self) -> dict | None:
        """Resolved params of the file this one extends (a deep copy), or None for base.yaml itself."""
        return copy.deepcopy(self._parent)


def _check_ablation(path: Path, params: dict, check_files: bool) -> None:
    """Each ablation variant is checked across keys now, as the variant it will become: one
    that cannot train (prodigy with a small lr, say) fails before the main run, not after."""
    name = params["experiment"]
    flats = [(f"{key.split('.')[-1]}-{v}", {key: v}) for key, values in params["ablation"]["vary"].items()
             for v in values]
    flats += list(params["ablation"]["variants"].items())
    for label, flat in flats:
        try:  # under the name 04_ablations gives it, so an over-long one fails now too
            _resolve([(path, params)], {**flat, "experiment": variant_name(name, label)}, check_files, top=path,
                     override_src=f"{_show(path)} (ablation)")
        except ConfigError as e:
            where = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in flat.items())
            raise ConfigError(f"{_show(path)}: ablation variant {where}: {e}") from None


def load(path: str | Path, overrides: list[str] | dict | None = None, *, check_files: bool = True,
         check_prose: bool = True) -> Experiment:
    """Resolve and validate a params file plus overrides (``["train.lora.rank=32"]`` or a dict).

    Raises :class:`ConfigError` for any problem; ``check_files=False`` skips the checks
    that look at the disk (image folders, model folders, the hub cache) and the machine
    (adamw8bit needs bitsandbytes and CUDA). ``check_prose=False`` skips the conclusion's
    bare-figure check: for params a run folder saved (they keep the prose of their day) and
    merge sources, which are read, not published.
    """
    path = Path(path)
    chain = _chain(path)
    params, name = _resolve(chain, _parse_overrides(overrides), check_files, top=path)
    _check_ablation(path, params, check_files)
    parent = None
    if len(chain) > 1:
        # only for diffing: files the child overrides away need not exist
        parent, _ = _resolve(chain[:-1], {}, check_files=False, top=chain[-2][0])
    if check_prose:
        _check_conclusion(path, params, parent)
    return Experiment(name=name, path=path, params=params, chain=tuple(p for p, _ in chain),
                      hash=params_hash(params), _parent=parent, _check_files=check_files)

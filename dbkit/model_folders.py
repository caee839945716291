"""Local model folders of the caption backends: what a complete one holds, how to download
it, and a fingerprint of its content.

Nothing is downloaded at run time, so `config.load` asks :func:`folder_problem` whether the
folder a params key names is complete and fails there, with the exact download command,
instead of 02_captions failing minutes later. Imports nothing of dbkit at module level:
config (the bottom of the house) uses it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

# params section of each caption backend (its model key is `captions.<section>.model`)
WD14, TRANSFORMERS = "wd14", "transformers"
# the caption sources backed by local models, and the params sections (backends) each one runs
CAPTION_MODEL_SECTIONS: dict[str, tuple[str, ...]] = {
    "wd14": (WD14,), "transformers": (TRANSFORMERS,), "merge": (WD14, TRANSFORMERS)}

# The models the research notes use, as examples in messages and in docs/photos-and-captions.md.
DOWNLOAD = {
    WD14: ("huggingface-cli download SmilingWolf/wd-v1-4-vit-tagger-v2 model.onnx selected_tags.csv "
           "--local-dir {folder}"),
    TRANSFORMERS: "huggingface-cli download Salesforce/blip-image-captioning-large --local-dir {folder}",
}
EXAMPLE_FOLDER = {WD14: "models/wd14-vit-v2", TRANSFORMERS: "models/blip-large"}

WD14_FILES = ("model.onnx", "selected_tags.csv")
WD14_COLUMNS = ("tag_id", "name", "category", "count")
_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_IMAGE_PROCESSOR = ("preprocessor_config.json", "processor_config.json")
_TOKENIZER = ("tokenizer.json", "vocab.txt", "tokenizer.model", "vocab.json")


def download_hint(section: str, folder: str = "") -> str:
    """The command that fills a folder for `captions.<section>.model`, where there is network."""
    return DOWNLOAD[section].format(folder=folder or EXAMPLE_FOLDER[section])


def folder_problem(section: str, folder: str) -> str:
    """'' when `folder` holds a complete model for `captions.<section>`, else what is wrong
    and what to do, naming the key and the download command."""
    key = f"captions.{section}.model"
    fix = (f"download it where you have network (`{download_hint(section, folder)}`), copy the folder here "
           f"and point {key} at it")
    path = Path(folder)
    if not path.is_dir():
        return f"'{key}' folder {folder!r} does not exist (relative to {Path.cwd()}): {fix}"
    missing = _wd14_missing(path) if section == WD14 else _transformers_missing(path)
    if missing:
        return f"'{key}' folder {folder!r} is incomplete: {missing}: {fix}"
    return ""


def _wd14_missing(path: Path) -> str:
    absent = [f for f in WD14_FILES if not (path / f).is_file() or not (path / f).stat().st_size]
    if absent:
        return f"{' and '.join(absent)} missing or empty"
    with open(path / "selected_tags.csv", encoding="utf-8", errors="replace") as f:
        header = tuple(h.strip() for h in f.readline().split(","))
    if header[: len(WD14_COLUMNS)] != WD14_COLUMNS:
        return f"selected_tags.csv starts with columns {','.join(header)!r}, not {','.join(WD14_COLUMNS)!r}"
    return ""


def _transformers_missing(path: Path) -> str:
    absent = []
    if not (path / "config.json").is_file():
        absent.append("config.json")
    if not _has_weights(path):
        absent.append(f"the weights ({' or '.join(_WEIGHTS)})")
    if not any((path / f).is_file() for f in _IMAGE_PROCESSOR):
        absent.append(" or ".join(_IMAGE_PROCESSOR))
    if not any((path / f).is_file() for f in _TOKENIZER):
        absent.append(f"a tokenizer ({' or '.join(_TOKENIZER)})")
    return f"{', '.join(absent)} missing" if absent else ""


def _has_weights(path: Path) -> bool:
    if any((path / f).is_file() and (path / f).stat().st_size for f in _WEIGHTS):
        return True
    for name in _SHARD_INDEXES:  # a sharded checkpoint: every shard its index names
        index = path / name
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, ValueError, KeyError, AttributeError):
                return False
            return all((path / s).is_file() for s in shards)
    return False


# weights of other frameworks, which a hub download brings along and transformers (PyTorch) never reads
_OTHER_FRAMEWORKS = (".h5", ".msgpack", ".ckpt", ".onnx", ".tflite", ".mlmodel")


def model_files(section: str, folder: str | Path) -> list[Path]:
    """The files a backend reads from its folder: what its fingerprint covers. A README, the
    hub client's .cache/, TensorFlow/Flax copies of the weights, and the .bin weights beside
    .safetensors ones (transformers loads the latter) change nothing, and hashing them would
    triple the time a params load spends on a BLIP-large folder."""
    path = Path(folder)
    if section == WD14:
        return [path / f for f in WD14_FILES]
    files = [f for f in path.rglob("*") if f.is_file() and f.name != "README.md" and not f.name.startswith(".")
             and ".cache" not in f.relative_to(path).parts and f.suffix not in _OTHER_FRAMEWORKS]
    if any(f.suffix == ".safetensors" for f in files):
        files = [f for f in files if f.suffix != ".bin" and not f.name.startswith("pytorch_model.bin")]
    return sorted(files)


def fingerprint(section: str, folder: str | Path) -> str | None:
    """A short hash of the names and bytes of the backend's model files (None when the folder
    is incomplete): part of the caption cache key and of the run identity, so new weights in
    the same folder re-caption. File digests are remembered per process (data.file_digest)."""
    from .data import file_digest

    if folder_problem(section, str(folder)):
        return None
    h, path = hashlib.sha256(), Path(folder)
    for f in model_files(section, path):
        h.update(f"{f.relative_to(path).as_posix()}\0{file_digest(f)}\n".encode())
    return h.hexdigest()[:16]

"""What a training run leaves behind, and loading it back for inference.

- LoRA/DoRA: `pytorch_lora_weights.safetensors` (diffusers layout) and `lora_kohya.safetensors`
  (kohya/WebUI layout, `lora_unet_…`/`lora_te_…` keys, `ss_*` metadata), both loadable by
  diffusers' `load_lora_weights`;
- full fine-tunes: a diffusers pipeline folder;
- LoKr: its own two files (dbkit/methods/lokr.py), with this module's kohya names and header;
- pivotal tuning: `embeddings.safetensors` with the new tokens' vectors.
Training metadata (base, method, rank, steps, resolution, tag frequencies) is embedded in
the safetensors headers and written beside them as JSON. Loading a result back is
`methods.load_trained` (each method knows its loader).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .captions import tag_frequencies

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
EMBEDDINGS_FILE = "embeddings.safetensors"


def training_metadata(p: dict, family: str, base_path: Path, caption_records: list[dict]) -> dict:
    t = p["train"]
    return {
        "base_model": p["base"]["model"], "base_path": str(base_path), "family": family,
        "method": t["method"] + ("+pivotal" if t["pivotal"]["enabled"] else ""),
        "rank": t["lora"]["rank"], "alpha": t["lora"]["alpha"], "steps": t["steps"],
        "resolution": p["data"]["resolution"], "lr": t["lr"], "text_encoder_lr": t["text_encoder_lr"],
        "prior_preservation": p["prior"]["enabled"], "subject": p["captions"]["identifier"],
        "class_noun": p["captions"]["class_noun"], "num_images": len(caption_records),
        "tag_frequency": tag_frequencies(caption_records), "seed": p["seed"],
        "unet_targets": t["lora"]["unet_targets"] if t["unet"] else [],
        "instance_dir_name": Path(caption_records[0]["file"]).parent.name if caption_records else "subject",
    }


def _kohya_version(meta: dict) -> tuple[str, str]:
    """(ss_base_model_version, modelspec.architecture) in kohya sd-scripts' vocabulary
    (model_util.get_model_version_str_for_sd1_sd2, sdxl_model_util, sai_model_spec).
    Playground v2.5 is an SDXL architecture; kohya has no name of its own for it."""
    v = meta.get("objective") == "v_prediction"
    family = meta["family"]
    if family in ("sdxl", "playground"):
        return "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"
    if family == "sd2":
        return ("sd_v2_v", "stable-diffusion-v2-768-v/lora") if v else ("sd_v2", "stable-diffusion-v2-512/lora")
    return ("sd_v1_v" if v else "sd_v1"), "stable-diffusion-v1/lora"


def kohya_metadata(meta: dict) -> dict[str, str]:
    """The ss_* header kohya writes (train_network.py) and the WebUI reads to show a LoRA's
    settings and tags, plus the SAI modelspec keys it must have; all values are strings."""
    version, arch = _kohya_version(meta)
    res = meta["resolution"]
    tags: dict[str, int] = {}
    for tag, n in meta["tag_frequency"].items():  # kohya counts tags stripped and lower-cased
        tags[tag.strip().lower()] = tags.get(tag.strip().lower(), 0) + n
    convs = [t for t in meta.get("unet_targets", []) if t.split(".")[-1].startswith("conv")]
    net_args = {"conv_dim": str(meta["rank"]), "conv_alpha": str(float(meta["alpha"]))} if convs else {}
    return {"ss_base_model_version": version, "ss_v2": str(meta["family"] == "sd2"),
            "ss_network_module": "networks.lora", "ss_network_dim": str(meta["rank"]),
            "ss_network_alpha": str(float(meta["alpha"])), "ss_network_args": json.dumps(net_args),
            "ss_max_train_steps": str(meta["steps"]), "ss_resolution": str((res, res)),
            "ss_learning_rate": str(meta["lr"]), "ss_text_encoder_lr": str(meta["text_encoder_lr"]),
            "ss_tag_frequency": json.dumps({meta.get("instance_dir_name", "subject"): tags}),
            "ss_num_train_images": str(meta["num_images"]), "ss_seed": str(meta["seed"]),
            "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": arch,
            "modelspec.implementation": ("https://github.com/Stability-AI/generative-models"
                                         if version.startswith("sdxl") else "diffusers"),
            "modelspec.title": f"dbkit {meta['subject']} {meta['class_noun']}".strip(),
            "modelspec.resolution": f"{res}x{res}",
            "modelspec.prediction_type": "v" if meta.get("objective") == "v_prediction" else "epsilon",
            "dbkit_family": meta["family"]}


def peft_state_dicts(modules: dict) -> dict[str, tuple[dict, dict]]:
    """(LoRA tensors in PEFT's naming, LoraConfig as a dict) per module that carries an adapter.

    The PEFT naming is kept as it is: diffusers' `load_lora_weights` recognises it and
    loads every target (attention, proj, ff, conv). Converting it with
    `convert_state_dict_to_diffusers` renames only attention keys, and the loader then
    judges the format by the first key and drops the renamed ones. The config travels as
    diffusers' adapter metadata so that alpha ≠ rank (and DoRA) survive the reload."""
    from peft.utils import get_peft_model_state_dict

    out = {}
    for name, m in modules.items():
        if not getattr(m, "peft_config", None):
            continue
        sd = get_peft_model_state_dict(m, save_embedding_layers=False)
        if name.startswith("text_encoder"):
            # transformers' load_adapter matches parameter names, and a DoRA magnitude is the
            # `.weight` of a module: without the suffix it is re-initialised on load
            sd = {text_model_path(k + ".weight" if k.endswith("lora_magnitude_vector") else k): v
                  for k, v in sd.items()}
        # dropout is a training setting, and diffusers' loader builds its Dropout modules in
        # training mode inside an eval-mode model: a file that records it samples noisily
        out[name] = (sd, m.peft_config["default"].to_dict() | {"lora_dropout": 0.0})
    return out


def text_model_path(key: str) -> str:
    """A text-encoder key under CLIP's `text_model.` level. transformers 5 flattened
    CLIPTextModel and its keys lost the level; a file written so crashes diffusers 0.32 with
    transformers 4 and loses keys in ComfyUI. With it, every loader matches: transformers 4's
    models have the level, and diffusers strips it for a flattened model."""
    return key if key.startswith("text_model.") else "text_model." + key


def save_lora(out: Path, modules: dict, meta: dict) -> None:
    write_lora(out, peft_state_dicts(modules), meta, xl="text_encoder_2" in modules)


def write_lora(out: Path, sds: dict[str, tuple[dict, dict]], meta: dict, *, xl: bool | None = None) -> None:
    """Both layouts of one LoRA (per component: PEFT-named tensors and LoraConfig dict):
    diffusers' file with the config in its header, and kohya's (not for DoRA). `xl`: an
    SDXL-family pipeline (two text encoders), read from the components when not given."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    kwargs = {f"{name}_lora_layers": sd for name, (sd, _) in sds.items()}
    kwargs |= {f"{name}_lora_adapter_metadata": cfg for name, (_, cfg) in sds.items()}
    xl = "text_encoder_2" in sds if xl is None else xl
    (StableDiffusionXLPipeline if xl else StableDiffusionPipeline).save_lora_weights(out, **kwargs,
                                                                                  safe_serialization=True)
    add_file_metadata(out / LORA_FILE, {"dbkit": json.dumps(meta)})
    if meta["method"].startswith("dora"):
        return  # kohya's DoRA layout differs per tool; the diffusers file is the portable one
    tmp = out / (KOHYA_FILE + ".tmp")
    save_file(kohya_state_dict(sds, xl), tmp, metadata=kohya_metadata(meta))
    tmp.replace(out / KOHYA_FILE)


def add_file_metadata(path: Path, extra: dict[str, str]) -> None:
    """Add header entries to a safetensors file, keeping the ones it has (diffusers stores
    the adapter config there)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata() or {})
    tmp = path.with_name(path.name + ".tmp")
    save_file(load_file(path), tmp, metadata=metadata | extra)
    tmp.replace(path)


def kohya_prefix(name: str, xl: bool) -> str:
    # kohya/A1111 name the text encoders after the original CLIP module path text_model.*;
    # te1/te2 are SDXL's pair, a single encoder is lora_te
    if name == "unet":
        return "lora_unet_"
    if name == "text_encoder_2":
        return "lora_te2_text_model_"
    return "lora_te1_text_model_" if xl else "lora_te_text_model_"


# A ResNet block's layers in the original (LDM/SGM) UNet, by their diffusers names.
_ORIGINAL_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                    "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}
_ORIGINAL_TOP = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
                 "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                 "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_BLOCK = re.compile(r"(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?(resnets|attentions|downsamplers|upsamplers)"
                    r"\.(\d+)(?:\.(.*))?$")


def original_unet_path(path: str, layers_per_block: int = 2) -> str:
    """A diffusers UNet module path in the original UNet's layout, the names sd-scripts gives
    SDXL LoRA keys (`down_blocks.1.attentions.0.proj_in` → `input_blocks.4.1.proj_in`): the
    input blocks count the stem, then per level its ResNet(+attention) pairs and its
    downsampler; the output blocks count per level `layers_per_block + 1` pairs, the upsampler
    in the last one's slot 2; the middle block is ResNet, attention, ResNet."""
    for old, new in _ORIGINAL_TOP.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    m = _BLOCK.match(path)
    if m is None:
        raise ValueError(f"{path}: not a module of a diffusers UNet2DConditionModel")
    where, level, part, j, rest = m.group(1), int(m.group(2) or 0), m.group(3), int(m.group(4)), m.group(5) or ""
    if part == "resnets":
        head, _, tail = rest.partition(".")
        rest = _ORIGINAL_RESNET.get(head, head) + (f".{tail}" if tail else "")
    if where == "mid_block":
        block = f"middle_block.{2 * j if part == 'resnets' else 1}"
    elif part == "downsamplers":
        block = f"input_blocks.{(level + 1) * (layers_per_block + 1)}.0"
        rest = rest.replace("conv", "op", 1)
    elif where == "down_blocks":
        block = f"input_blocks.{level * (layers_per_block + 1) + j + 1}.{0 if part == 'resnets' else 1}"
    else:
        index = level * (layers_per_block + 1) + (layers_per_block if part == "upsamplers" else j)
        block = f"output_blocks.{index}.{ {'resnets': 0, 'attentions': 1, 'upsamplers': 2}[part] }"
    return f"{block}.{rest}" if rest else block


def kohya_module_name(component: str, module: str, xl: bool) -> str:
    """A module's key stem as sd-scripts writes it: diffusers' UNet names for SD1/SD2, the
    original layout's for SDXL (sd-scripts trains its own SDXL UNet class, and its training
    continuation and merge scripts match those names only); CLIP's `text_model` path."""
    if component == "unet" and xl:
        module = original_unet_path(module)
    return kohya_prefix(component, xl) + module.removeprefix("text_model.").replace(".", "_")


def kohya_state_dict(sds: dict[str, tuple[dict, dict]], xl: bool) -> dict:
    """The kohya/WebUI layout: `<prefix><module path with _>.lora_down/.lora_up.weight` and a
    per-module `.alpha` holding the training alpha (the loaders scale by alpha / rank)."""
    out = {}
    for name, (sd, cfg) in sds.items():
        for key, v in sd.items():
            module, _, kind = key.partition(".lora_")
            base = kohya_module_name(name, module, xl)
            if kind.startswith("A."):
                out[f"{base}.lora_down.weight"] = v.contiguous()
                out[f"{base}.alpha"] = torch.tensor(float(cfg["lora_alpha"]))  # dbkit sets no per-module alpha
            elif kind.startswith("B."):
                out[f"{base}.lora_up.weight"] = v.contiguous()
            else:
                raise ValueError(f"{name}.{key}: no kohya equivalent for this LoRA tensor")
    return out


_EMBEDDING_KEYS = ("clip_l", "clip_g")  # the names diffusers' advanced script and the WebUI use


def save_embeddings(out: Path, modules: dict, tokens: list[str], new_ids: list[list[int]]) -> None:
    tensors = {}
    for key, name, ids in zip(_EMBEDDING_KEYS, ("text_encoder", "text_encoder_2"), new_ids):
        tensors[key] = modules[name].get_input_embeddings().weight.detach().cpu()[ids].clone().contiguous()
    save_file(tensors, out / EMBEDDINGS_FILE, metadata={"tokens": json.dumps(tokens)})


def read_metadata(out: Path) -> dict:
    path = out / "training_metadata.json"
    return json.loads(path.read_text()) if path.exists() else {}


def add_embeddings(pipe, path: Path) -> list[str]:
    """Register pivotal tokens and their vectors the way diffusers' advanced DreamBooth
    script documents it: `load_textual_inversion` per text encoder, with the token list."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        tokens = json.loads(f.metadata()["tokens"])
    vecs = load_file(path)
    pairs = [(pipe.tokenizer, pipe.text_encoder),
             (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None))]
    for key, (tok, te) in zip(_EMBEDDING_KEYS, pairs):
        if key in vecs and tok is not None:
            pipe.load_textual_inversion(vecs[key], token=tokens, text_encoder=te, tokenizer=tok)
    return tokens


def model_card(meta: dict) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in meta.items() if k != "tag_frequency")
    return f"# DreamBooth result ({meta['method']})\n\nTrained with dbkit.\n\n| key | value |\n|---|---|\n{rows}\n"

"""What a training run leaves behind, and loading it back for inference.

- LoRA/DoRA: `pytorch_lora_weights.safetensors` (diffusers layout) and `lora_kohya.safetensors`
  (kohya/WebUI layout, `lora_unet_…`/`lora_te_…` keys, `ss_*` metadata), both loadable by
  diffusers' `load_lora_weights`;
- full fine-tunes: a diffusers pipeline folder;
- pivotal tuning: `embeddings.safetensors` with the new tokens' vectors.
Training metadata (base, method, rank, steps, resolution, tag frequencies) is embedded in
the safetensors headers and written beside them as JSON.
"""

from __future__ import annotations

import json
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
    }


def _kohya_metadata(meta: dict) -> dict[str, str]:
    # kohya's key names, so the WebUI's and kohya's tools show the run's settings
    return {"ss_base_model_version": meta["family"], "ss_network_module": "networks.lora",
            "ss_network_dim": str(meta["rank"]), "ss_network_alpha": str(meta["alpha"]),
            "ss_max_train_steps": str(meta["steps"]), "ss_resolution": str(meta["resolution"]),
            "ss_learning_rate": str(meta["lr"]), "ss_text_encoder_lr": str(meta["text_encoder_lr"]),
            "ss_tag_frequency": json.dumps({"subject": meta["tag_frequency"]}),
            "ss_num_train_images": str(meta["num_images"]), "ss_seed": str(meta["seed"])}


def save_lora(out: Path, modules: dict, meta: dict) -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    peft_sds = {name: get_peft_model_state_dict(m, save_embedding_layers=False)
                for name, m in modules.items() if getattr(m, "peft_config", None)}
    layers = {f"{name}_lora_layers": convert_state_dict_to_diffusers(sd) for name, sd in peft_sds.items()}
    pipe_cls = StableDiffusionXLPipeline if "text_encoder_2" in modules else StableDiffusionPipeline
    pipe_cls.save_lora_weights(out, **layers, safe_serialization=True)
    path = out / LORA_FILE
    save_file(load_file(path), path, metadata={"dbkit": json.dumps(meta)})
    if meta["method"].startswith("dora"):
        return  # kohya's DoRA layout differs per tool; the diffusers file is the portable one
    flat = {f"{name}.{k}": v for name, sd in peft_sds.items() for k, v in sd.items()}
    kohya = {k: v.contiguous() for k, v in convert_state_dict_to_kohya(flat).items()}
    if "text_encoder_2" not in modules:  # one text encoder: kohya calls it lora_te_ (te1/te2 are SDXL's)
        kohya = {k.replace("lora_te1_", "lora_te_", 1): v for k, v in kohya.items()}
    save_file(kohya, out / KOHYA_FILE, metadata=_kohya_metadata(meta))


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
    """Register pivotal tokens and their vectors in a pipeline's tokenizer(s)/text encoder(s)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        tokens = json.loads(f.metadata()["tokens"])
    vecs = load_file(path)
    pairs = [(pipe.tokenizer, pipe.text_encoder),
             (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None))]
    for key, (tok, te) in zip(_EMBEDDING_KEYS, pairs):
        if key not in vecs or tok is None:
            continue
        tok.add_tokens(tokens)
        te.resize_token_embeddings(len(tok), mean_resizing=False)
        with torch.no_grad():
            te.get_input_embeddings().weight[tok.convert_tokens_to_ids(tokens)] = vecs[key].to(te.dtype)
    return tokens


def load_trained(out: Path, base_path: Path, family: str, *, lora_scale: float = 1.0, lora_file: str = LORA_FILE):
    """An inference pipeline for a run's output (LoRA scaled by `lora_scale`)."""
    from .models import load_pipeline

    full = (out / "pipeline" / "model_index.json").exists()
    pipe = load_pipeline(out / "pipeline" if full else base_path, family)
    meta = read_metadata(out)
    objective = meta.get("objective")
    if objective in ("epsilon", "v_prediction") and pipe.scheduler.config.get("prediction_type") != objective:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=objective)
    if (out / EMBEDDINGS_FILE).exists() and not full:
        add_embeddings(pipe, out / EMBEDDINGS_FILE)
    if (out / lora_file).exists():
        pipe.load_lora_weights(str(out), weight_name=lora_file, adapter_name="subject")
        pipe.set_adapters(["subject"], adapter_weights=[lora_scale])
    return pipe


def model_card(meta: dict) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in meta.items() if k != "tag_frequency")
    return f"# DreamBooth result ({meta['method']})\n\nTrained with dbkit.\n\n| key | value |\n|---|---|\n{rows}\n"

"""Every artifact a run leaves, reloaded through the public loaders, is the model that was trained.

The reference is the live trained model itself, captured by the trainer's preview hook at
the last step (after EMA is copied in, in eval mode): its LoRA layers' inputs and outputs
and the latents the pipeline draws. Each artifact is then loaded with plain diffusers code
written here (`load_lora_weights`, `load_textual_inversion`, `from_pretrained`) and must
reproduce it to float noise: every LoRA layer is present and its contribution (output minus
the frozen layer's output) is the live one, so a dropped or rescaled tensor fails, however
small the update.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dbkit import captions, config, data, export, methods, models, train

# Every cell trains with alpha ≠ rank (alpha/rank = 4) and an lr that moves the weights visibly
COMMON = ["train.lora.rank=4", "train.lora.alpha=16", "train.lr=0.01", "train.text_encoder_lr=0.01",
          "train.pivotal.lr=0.05"]
DORA = ["train.method=dora", "train.lora.unet_targets=[to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2]"]
METHODS = {
    "lora": [],
    "dora": DORA,
    "full": ["train.method=full"],
    "pivotal+lora": ["train.pivotal.enabled=true"],
    "pivotal+full": ["train.method=full", "train.pivotal.enabled=true"],
    "lokr": ["train.method=lokr", "train.text_encoder=false"],  # rank 4: both Kronecker factors full
}
OPTIONS = {  # on the SD1.x twin: the options that change what the files hold
    "unet-only": ["train.text_encoder=false"],
    "te-only": ["train.unet=false"],
    "dora-te-only": [*DORA, "train.unet=false"],
    "attention-only": ["train.lora.unet_targets=[to_q,to_k,to_v,to_out.0]"],
    "ema": ["train.ema_decay=0.5", "train.steps=3"],
    "full-unet-only": ["train.method=full", "train.text_encoder=false"],
    "lora-dropout": ["train.lora.dropout=0.2"],
    # rank 1: both factors rank-decomposed, the layout whose alpha the LyCORIS loaders apply
    "lokr-decomposed": ["train.method=lokr", "train.text_encoder=false", "train.lora.rank=1",
                        "train.lokr.decompose_both=true"],
}
XL = ("sdxl", "playground")


@pytest.fixture(scope="module")
def family_bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    return {f: models.build_random(f, root / f) for f in models.FAMILIES}


def tuner_layers(pipe) -> dict[str, torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        m = getattr(pipe, comp, None)
        if m is not None:
            out |= {f"{comp}:{n}": mod for n, mod in m.named_modules() if isinstance(mod, BaseTunerLayer)}
    return out


def probe(pipe, prompt: str) -> dict:
    """The pipeline's latents for a fixed prompt/seed, and each LoRA layer's first input/output."""
    io: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(name: str):
        def hook(_mod, args, output) -> None:  # returns None: the output is left as it is
            io.setdefault(name, (args[0].detach(), output.detach()))
        return hook

    hooks = [mod.register_forward_hook(keep(name)) for name, mod in tuner_layers(pipe).items()]
    try:
        with torch.no_grad():
            lat = pipe([prompt], num_inference_steps=2, guidance_scale=2.0, height=32, width=32, output_type="latent",
                       generator=torch.Generator().manual_seed(0)).images
    finally:
        for h in hooks:
            h.remove()
    return {"latents": lat, "io": io}


def assert_same_model(live: dict, pipe, prompt: str, what: str) -> None:
    layers = tuner_layers(pipe)
    assert set(layers) == set(live["io"]), f"{what}: LoRA layers differ: {set(live['io']) ^ set(layers)}"
    idle = []  # layers no gradient reaches (SDXL reads text encoder 1's penultimate layer, not its last)
    with torch.no_grad():
        for name, (x, y) in live["io"].items():
            mod = layers[name]
            base = mod.base_layer(x)
            want, got = y - base, mod(x) - base
            if want.abs().max() < 1e-7:
                idle.append(name)
                assert got.abs().max() < 1e-6, f"{what}: {name} adds what the trained layer does not"
                continue
            err = (got - want).norm() / want.norm()
            assert err < 1e-4, f"{what}: {name} contributes {err:.2%} off the trained layer (dropped or rescaled)"
    assert len(idle) <= len(live["io"]) // 4, f"most LoRA layers did not train (test too weak): {idle}"
    again = probe(pipe, prompt)
    torch.testing.assert_close(again["latents"], live["latents"], atol=1e-5, rtol=1e-4, msg=f"{what}: latents")


def plain_pipeline(base, family: str, live_pipe):
    """The base as a user loads it, with the live pipeline's scheduler settings."""
    pipe = models.load_pipeline(base, family)
    pipe.scheduler = type(live_pipe.scheduler).from_config(live_pipe.scheduler.config)
    return pipe


def load_embeddings_like_diffusers_docs(pipe, out) -> None:
    # diffusers' advanced DreamBooth script's README: one load_textual_inversion per encoder
    with safe_open(str(out / export.EMBEDDINGS_FILE), "pt") as f:
        tokens = json.loads(f.metadata()["tokens"])
    sd = load_file(out / export.EMBEDDINGS_FILE)
    pipe.load_textual_inversion(sd["clip_l"], token=tokens, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    if "clip_g" in sd:
        pipe.load_textual_inversion(sd["clip_g"], token=tokens, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)


def train_and_capture(in_tmp, base, family: str, extra: list[str]):
    p = config.load("params/base.yaml", [
        f"base.model={base}", "data.resolution=32", "base.resolution=32", "train.steps=2", "train.batch_size=1",
        "train.save_every=0", "train.sample_every=1", "prior.enabled=false", "experiment=identity", *COMMON,
        *extra]).params
    q = captions.effective_params(p)
    recs = captions.build_captions(data.build_manifest(data.resolve_folder(p["data"]["instance_images"])), q)
    prompt = captions.expand("a {subject}", q)
    live: dict = {}

    def preview(step: int, pipe) -> None:
        if step == p["train"]["steps"]:
            live.update(probe(pipe, prompt), pipe=pipe)
            if p["train"]["pivotal"]["enabled"]:
                tok, te = pipe.tokenizer, pipe.text_encoder
                live["embedding"] = te.get_input_embeddings().weight[tok.convert_tokens_to_ids("<s0>")].clone()

    out = train.train(p, in_tmp / "run", recs, base_path=base, family=family, progress=False, preview=preview)
    assert live, "the preview hook never saw the final model"
    return p, out, live, prompt


def check_artifacts(p: dict, out, live: dict, prompt: str, base, family: str) -> None:
    t = p["train"]
    # the latent comparisons below mean something only if training moved the model: an
    # artifact that silently held the base (e.g. a pipeline folder of untouched weights) fails
    untouched = probe(plain_pipeline(base, family, live["pipe"]), prompt)["latents"]
    assert (untouched - live["latents"]).abs().max() > 1e-3, "training did not change the latents (test too weak)"
    if t["method"] == "full":
        pipe = models.load_pipeline(out / "pipeline", family)
        pipe.scheduler = type(live["pipe"].scheduler).from_config(live["pipe"].scheduler.config)
        assert_same_model(live, pipe, prompt, "pipeline folder")
        return
    if t["method"] == "lokr":
        check_lokr_files(out, live, prompt, base, family)
        # each cell holds the layout it is named for (full factors at rank 4, products at rank 1)
        decomposed = {k.rpartition(".")[2] for k in load_file(out / export.KOHYA_FILE)} >= {"lokr_w1_a", "lokr_w2_b"}
        assert decomposed == (t["lora"]["rank"] == 1)
        return
    files = [export.LORA_FILE] + ([] if t["method"] == "dora" else [export.KOHYA_FILE])
    # the text encoders' keys keep CLIP's text_model level whatever transformers wrote them
    # (transformers 5 dropped it; diffusers 0.32 with transformers 4 crashes without it)
    te_keys = [k for k in load_file(out / export.LORA_FILE) if k.startswith("text_encoder")]
    assert all(k.split(".", 1)[1].startswith("text_model.encoder.") for k in te_keys), te_keys[:2]
    assert bool(te_keys) == bool(t["text_encoder"])
    for name in files:
        pipe = plain_pipeline(base, family, live["pipe"])
        if t["pivotal"]["enabled"]:
            load_embeddings_like_diffusers_docs(pipe, out)
        pipe.load_lora_weights(str(out), weight_name=name)
        assert_same_model(live, pipe, prompt, name)
    # and the loader every metric, grid and report in dbkit goes through
    pipe = methods.load_trained(out, base, family)
    pipe.scheduler = type(live["pipe"].scheduler).from_config(live["pipe"].scheduler.config)
    assert_same_model(live, pipe, prompt, "methods.load_trained")


def lycoris_delta(sd: dict, key: str, shape: torch.Size) -> torch.Tensor:
    """ΔW of one module of a kohya-layout LoKr file, as LyCORIS' loaders compute it (the A1111
    WebUI's network_lokr.py, ComfyUI's lokr weight adapter): w1 ⊗ w2, each factor stored whole
    or as a product a @ b; scaled by alpha / rank only where a factor is a product, else by 1."""
    def factor(n: str) -> tuple[torch.Tensor, int | None]:
        if f"{key}.lokr_{n}" in sd:
            return sd[f"{key}.lokr_{n}"].float(), None
        a, b = sd[f"{key}.lokr_{n}_a"].float(), sd[f"{key}.lokr_{n}_b"].float()
        return a @ b, b.shape[0]

    w1, r1 = factor("w1")
    w2, r2 = factor("w2")
    rank = r2 or r1
    scale = float(sd[f"{key}.alpha"]) / rank if rank and f"{key}.alpha" in sd else 1.0
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return (torch.kron(w1, w2) * scale).reshape(shape)


def check_lokr_files(out, live: dict, prompt: str, base, family: str) -> None:
    """LoKr's diffusers file through diffusers' own UNet loader, and its kohya file against
    every live layer's ΔW by LyCORIS' formula (no diffusers loader reads SD LoKr kohya files)."""
    pipe = plain_pipeline(base, family, live["pipe"])
    pipe.unet.load_lora_adapter(str(out), weight_name=export.LORA_FILE, prefix="unet")
    assert_same_model(live, pipe, prompt, export.LORA_FILE)
    sd = load_file(out / export.KOHYA_FILE)
    layers = tuner_layers(live["pipe"])
    keys = {n: export.kohya_module_name("unet", n.removeprefix("unet:"), family in XL) for n in layers}
    assert set(keys.values()) == {k.partition(".")[0] for k in sd}, "kohya LoKr file: modules differ from the trained"
    with torch.no_grad():
        for name, mod in layers.items():
            want = mod.get_delta_weight("default").float()
            got = lycoris_delta(sd, keys[name], want.shape)
            assert (got - want).norm() <= 1e-5 * want.norm() + 1e-9, f"{export.KOHYA_FILE}: {name} ΔW off"
    with safe_open(str(out / export.KOHYA_FILE), "pt") as f:
        assert f.metadata()["ss_network_module"] == "lycoris.kohya"
    pipe = methods.load_trained(out, base, family)
    pipe.scheduler = type(live["pipe"].scheduler).from_config(live["pipe"].scheduler.config)
    assert_same_model(live, pipe, prompt, "methods.load_trained")


CELLS = [(f, m, METHODS[m]) for f in models.FAMILIES for m in METHODS]
CELLS += [("sd15", o, OPTIONS[o]) for o in OPTIONS]


@pytest.mark.parametrize("family,case,extra", CELLS, ids=[f"{f}-{c}" for f, c, _ in CELLS])
def test_every_artifact_reproduces_the_live_model(in_tmp, family_bases, family, case, extra):
    base = family_bases[family]
    p, out, live, prompt = train_and_capture(in_tmp, base, family, extra)
    check_artifacts(p, out, live, prompt, base, family)
    if p["train"]["pivotal"]["enabled"]:
        pipe = models.load_pipeline(base, family)
        ids = pipe.tokenizer(p["captions"]["class_noun"], add_special_tokens=False).input_ids
        init = pipe.text_encoder.get_input_embeddings().weight[ids].mean(0)
        assert not torch.allclose(live["embedding"], init), "pivotal tokens left at their initialisation"
        saved = load_file(out / export.EMBEDDINGS_FILE)["clip_l"][0]
        torch.testing.assert_close(saved, live["embedding"].detach())


KOHYA = {  # family: (a text-encoder key, ss_base_model_version, modelspec.architecture), per sd-scripts
    "sd15": (["lora_te_text_model_encoder_layers_0_self_attn_q_proj"], "sd_v1", "stable-diffusion-v1/lora"),
    "sd2": (["lora_te_text_model_encoder_layers_0_self_attn_q_proj"], "sd_v2_v", "stable-diffusion-v2-768-v/lora"),
    "sdxl": (["lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
              "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"], "sdxl_base_v1-0",
             "stable-diffusion-xl-v1-base/lora"),
}


@pytest.mark.parametrize("family", list(KOHYA))
def test_kohya_file_speaks_kohya(in_tmp, family_bases, family):
    """Key names, alpha and header as kohya sd-scripts' networks/lora.py and train_network.py
    write them (the WebUI matches text-encoder keys by CLIP's `text_model` path and reads
    ss_base_model_version to tell SD1/SD2/SDXL apart)."""
    te_keys, version, arch = KOHYA[family]
    p, out, _, _ = train_and_capture(in_tmp, family_bases[family], family,
                                     ["train.lora.unet_targets=[to_q,to_k,to_v,to_out.0]"])
    sd = load_file(out / export.KOHYA_FILE)
    for key in te_keys:
        assert sd[f"{key}.lora_down.weight"].shape[0] == 4 and float(sd[f"{key}.alpha"]) == 16.0
    # sd-scripts names SD1/SD2 UNet modules as diffusers does, SDXL's by its original layout
    # (library/sdxl_original_unet.py: input_blocks.4.1 is level 1's first attention)
    unet_key = ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" if family == "sdxl"
                else "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q")
    assert f"{unet_key}.lora_up.weight" in sd
    if family == "sdxl":
        assert not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in sd)
    assert {float(v) for k, v in sd.items() if k.endswith(".alpha")} == {16.0}
    assert all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in sd)
    with safe_open(str(out / export.KOHYA_FILE), "pt") as f:
        md = f.metadata()
    assert md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "16.0"
    assert md["ss_base_model_version"] == version and md["modelspec.architecture"] == arch
    assert md["ss_v2"] == str(family == "sd2") and md["ss_resolution"] == "(32, 32)"
    folder = data.resolve_folder(p["data"]["instance_images"]).name
    assert json.loads(md["ss_tag_frequency"])[folder] == {"a sks star": 5}  # the fixed caption, once per photo


def test_last_preview_is_what_plain_diffusers_draws_from_the_exported_file(in_tmp, tiny_base):
    """The acceptance check of the previews: the final preview of a default LoRA run equals
    the image plain diffusers code draws from output/pytorch_lora_weights.safetensors with
    the same scheduler, seed, steps and guidance (< 1/255 per pixel on average)."""
    import numpy as np
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from dbkit import workflow

    p = config.load("params/base.yaml", [
        f"base.model={tiny_base}", "train.steps=3", "train.batch_size=1", "train.save_every=0",
        "train.sample_every=2", "prior.enabled=false", "sample.steps=4", "sample.seeds=[7]", "train.lr=0.01",
        "train.lora.dropout=0.1", "experiment=preview"]).params
    recs = captions.build_captions(data.build_manifest(data.resolve_folder(p["data"]["instance_images"])), p)
    rd = in_tmp / "run"
    out = train.train(p, rd, recs, base_path=tiny_base, family="sd15", progress=False,
                      preview=workflow.preview_writer(rd, p))
    assert sorted(d.name for d in (rd / "samples").iterdir()) == ["step_000002", "step_000003"]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    prompt = captions.expand(p["sample"]["prompts"][0], p)
    s = p["sample"]
    img = pipe(prompt, num_inference_steps=s["steps"], guidance_scale=s["guidance"], height=p["base"]["resolution"],
               width=p["base"]["resolution"], generator=torch.Generator().manual_seed(7)).images[0]
    preview = data.open_rgb(rd / "samples" / "step_000003" / "p0_s7.png")
    diff = np.abs(np.asarray(img, dtype=np.float64) - np.asarray(preview, dtype=np.float64)).mean()
    assert diff < 1.0, f"last preview differs from the exported model's image by {diff:.2f}/255"


def test_sdxl_kohya_names_are_sd_scripts_original_layout_and_diffusers_reads_every_one():
    """Every Linear and Conv2d of the full-size SDXL UNet (its published config, on the meta
    device) gets the name sd-scripts gives it, and diffusers' own kohya reader maps each name
    back to exactly that module: none lost, none invented (sd-scripts' training continuation
    and merge scripts match these names only; diffusers-style SDXL names were dropped in silence)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from diffusers.utils import convert_unet_state_dict_to_peft

    with init_empty_weights():
        unet = UNet2DConditionModel(**models._unet_config("sdxl", full=True))
    paths = {n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    names = {export.kohya_module_name("unet", p, xl=True): p for p in paths}
    # by hand, from sd-scripts' SDXL UNet (library/sdxl_original_unet.py) and its conversion map
    for path, name in {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q":
                       "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                       "down_blocks.0.downsamplers.0.conv": "lora_unet_input_blocks_3_0_op",
                       "down_blocks.2.resnets.0.conv_shortcut": "lora_unet_input_blocks_7_0_skip_connection",
                       "mid_block.attentions.0.transformer_blocks.9.ff.net.2":
                       "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2",
                       "mid_block.resnets.1.time_emb_proj": "lora_unet_middle_block_2_emb_layers_1",
                       "up_blocks.0.resnets.2.conv1": "lora_unet_output_blocks_2_0_in_layers_2",
                       "up_blocks.1.upsamplers.0.conv": "lora_unet_output_blocks_5_2_conv",
                       "up_blocks.2.resnets.0.conv2": "lora_unet_output_blocks_6_0_out_layers_3",
                       "add_embedding.linear_1": "lora_unet_label_emb_0_0"}.items():
        assert names[name] == path
    sd = {}
    for name in names:
        sd |= {f"{name}.lora_down.weight": torch.zeros(1, 1), f"{name}.lora_up.weight": torch.zeros(1, 1),
               f"{name}.alpha": torch.tensor(1.0)}
    converted, _ = _convert_non_diffusers_lora_to_diffusers(_maybe_map_sgm_blocks_to_diffusers(sd, unet.config))
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    assert {k.rsplit(".lora_", 1)[0] for k in peft} == paths

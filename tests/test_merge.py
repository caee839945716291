"""LoRA merging, checked against hand sums and PEFT's own add_weighted_adapter."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig

from dbkit import export, merge, models, train, ziplora
from dbkit.toyworld import base_model_path

UNET_TARGETS = ["to_q", "to_v", "conv1"]
TE_TARGETS = ["q_proj", "out_proj"]


def _targets(root: torch.nn.Module, suffixes: list[str]) -> list[str]:
    return [n for n, m in root.named_modules()
            if any(n == s or n.endswith("." + s) for s in suffixes)
            and isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]


def _random_lora(module: torch.nn.Module, r: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w = module.weight
    a = torch.randn((r, w.shape[1], *w.shape[2:]), generator=gen) * 0.1
    b = torch.randn((w.shape[0], r, *([1, 1] if w.dim() == 4 else [])), generator=gen) * 0.1
    return a, b


@pytest.fixture(scope="module")
def base():
    pipe = models.load_pipeline(base_model_path(), "sd2")
    return pipe


def _write(folder, base, r, alpha, seed, unet_targets=UNET_TARGETS):
    """A LoRA file with random A and B (trained ones start with B = 0, which would hide errors)."""
    gen = torch.Generator().manual_seed(seed)
    sds = {}
    for comp, root, suffixes in (("unet", base.unet, unet_targets), ("text_encoder", base.text_encoder, TE_TARGETS)):
        sd = {}
        for name in _targets(root, suffixes):
            a, b = _random_lora(root.get_submodule(name), r, gen)
            sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = a, b
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=suffixes).to_dict()
        sds[comp] = (sd, json.loads(json.dumps(cfg, default=list)))
    meta = {"method": "lora", "family": "sd2", "rank": r, "alpha": alpha, "steps": 1, "resolution": 64, "lr": 0,
            "text_encoder_lr": 0, "tag_frequency": {}, "num_images": 1, "seed": seed, "subject": "sks",
            "class_noun": "star"}
    folder.mkdir(parents=True, exist_ok=True)
    export.write_lora(folder, sds, meta)
    return folder


def _meta(method: str, rank: int) -> dict:
    """The training metadata export.write_lora records (kohya's ss_* header needs these keys)."""
    return {"method": method, "family": "sd2", "rank": rank, "alpha": rank, "steps": 0, "resolution": 64, "lr": 0,
            "text_encoder_lr": 0, "tag_frequency": {}, "num_images": 0, "seed": 0, "subject": "", "class_noun": ""}


def _hand_sum(base, files, weights):
    """Base weights plus Σ wᵢ·(alphaᵢ/rᵢ)·Bᵢ·Aᵢ, written into copies of the modules by hand."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    unet, te = copy.deepcopy(base.unet), copy.deepcopy(base.text_encoder)
    roots = {"unet": unet, "text_encoder": te}
    for f, w in zip(files, weights):
        path = f / export.LORA_FILE
        cfg = json.loads(safe_open(str(path), "pt").metadata()["lora_adapter_metadata"])
        for key, a in load_file(path).items():
            if ".lora_A." not in key:
                continue
            comp, name = key.split(".lora_A.")[0].split(".", 1)
            b = load_file(path)[key.replace("lora_A", "lora_B")]
            scale = cfg[f"{comp}.lora_alpha"] / cfg[f"{comp}.r"]
            mod = roots[comp].get_submodule(name)
            d = (b.flatten(1) @ a.flatten(1)).reshape(mod.weight.shape)
            with torch.no_grad():
                mod.weight += w * scale * d
    return unet, te


def _outputs(unet, te, tokenizer):
    torch.manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, 8, 8)
    ids = tokenizer(["a red star", "a sks heart on a blue background"], padding="max_length",
                    max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        ehs = te(ids)[0]
        return ehs, unet(x, torch.tensor([10, 500]), ehs).sample


def _close(got, want, atol=2e-4):
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=atol), (g - w).abs().max()


@pytest.fixture(scope="module")
def two_files(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return [_write(root / "a", base, 4, 8, 1), _write(root / "b", base, 4, 2, 2)]


def test_runtime_weighted_sum_and_fuse_equal_the_hand_sum(base, two_files):
    want = _outputs(*_hand_sum(base, two_files, [0.7, 1.3]), base.tokenizer)
    pipe = models.load_pipeline(base_model_path(), "sd2")
    for name, f in zip("ab", two_files):
        pipe.load_lora_weights(str(f), weight_name=export.LORA_FILE, adapter_name=name)
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 1.3])
    _close(_outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer), want)
    pipe.fuse_lora(adapter_names=["a", "b"])
    pipe.unload_lora_weights()  # the fused update stays in the weights, the adapters go
    _close(_outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer), want)


def test_fuse_then_unfuse_restores_the_weights(two_files):
    pipe = models.load_pipeline(base_model_path(), "sd2")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    for name, f in zip("ab", two_files):
        pipe.load_lora_weights(str(f), weight_name=export.LORA_FILE, adapter_name=name)
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 1.3])
    pipe.fuse_lora(adapter_names=["a", "b"])
    pipe.unfuse_lora()
    after = pipe.unet.state_dict()
    for k, v in before.items():
        key = k if k in after else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.allclose(after[key], v, atol=1e-6), k


@pytest.mark.parametrize("method", ["cat", "weighted", "svd"])
def test_exact_merges_reload_as_the_hand_sum(base, two_files, method, tmp_path):
    want = _outputs(*_hand_sum(base, two_files, [0.7, 1.3]), base.tokenizer)
    loras = [merge.read_lora(f) for f in two_files]
    svd_rank = 8 if method == "svd" else 0  # full rank: the sum of two rank-4 updates
    merged = merge.merge(loras, [0.7, 1.3], method, svd_rank=svd_rank)
    export.write_lora(tmp_path, merged.state_dicts, _meta(f"merge-{method}", merged.rank))
    for file in (export.LORA_FILE, export.KOHYA_FILE):  # both layouts, through diffusers' public loader
        pipe = models.load_pipeline(base_model_path(), "sd2")
        pipe.load_lora_weights(str(tmp_path), weight_name=file)
        _close(_outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer), want)


def test_linear_is_not_the_sum(base, two_files):
    loras = [merge.read_lora(f) for f in two_files]
    lin = merge.merge(loras, [1.0, 1.0], "linear").state_dicts["unet"][0]
    name = next(k for k in lin if k.endswith("lora_A.weight")).removesuffix(".lora_A.weight")
    got = merge.delta(lin[f"{name}.lora_A.weight"], lin[f"{name}.lora_B.weight"])
    total = sum(merge.delta(*lo.modules[f"unet.{name}"]) for lo in loras)
    assert (got - total).abs().max() > 0.1 * total.abs().max()


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 5)
        self.conv = torch.nn.Conv2d(3, 4, 3)


@pytest.mark.parametrize("method", ["cat", "svd", "linear", "ties", "magnitude_prune", "dare_linear", "dare_ties"])
def test_tensor_merges_match_peft_add_weighted_adapter(method, tmp_path):
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = get_peft_model(_Tiny(), LoraConfig(r=3, lora_alpha=6, target_modules=["lin", "conv"]), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=3, lora_alpha=3, target_modules=["lin", "conv"]))
    loras = []
    for name in "ab":
        for n, p in model.named_parameters():
            if f".{name}." in n and "lora_" in n:
                with torch.no_grad():
                    p.copy_(torch.randn_like(p))
        sd = {k.removeprefix("base_model.model."): v for k, v in
              get_peft_model_state_dict(model, adapter_name=name).items()}
        cfg = model.peft_config[name]
        meta = {f"unet.{k}": v for k, v in json.loads(json.dumps(cfg.to_dict(), default=list)).items()}
        save_file({f"unet.{k}": v.contiguous() for k, v in sd.items()}, tmp_path / f"{name}.safetensors",
                  metadata={"lora_adapter_metadata": json.dumps(meta)})
        loras.append(merge.read_lora(tmp_path / f"{name}.safetensors"))
    # DARE drops at random (PEFT: global generator in module order; dbkit: one per module), so
    # it is compared where nothing is dropped; its drops are checked below
    density = 1.0 if method.startswith("dare") else 0.6
    kw = {"density": density, "majority_sign_method": "total"} if method not in ("cat", "svd", "linear") else {}
    model.add_weighted_adapter(["a", "b"], [0.6, 1.4], "m", combination_type=method, **kw)
    want = {k.removeprefix("base_model.model."): v
            for k, v in get_peft_model_state_dict(model, adapter_name="m").items()}
    got = merge.merge(loras, [0.6, 1.4], method, density=density).state_dicts["unet"][0]
    assert set(got) == set(want)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-5), k
    if method.startswith("dare"):
        one = merge.merge(loras[:1], [1.0], method, density=0.5, seed=1).state_dicts["unet"][0]["conv.lora_A.weight"]
        again = merge.merge(loras[:1], [1.0], method, density=0.5, seed=1).state_dicts["unet"][0]["conv.lora_A.weight"]
        other = merge.merge(loras[:1], [1.0], method, density=0.5, seed=2).state_dicts["unet"][0]["conv.lora_A.weight"]
        full = loras[0].modules["unet.conv"][0] * loras[0].modules["unet.conv"][2] ** 0.5
        kept = one != 0
        assert torch.equal(one, again) and not torch.equal(one, other)
        assert 0.3 < kept.float().mean() < 0.7  # about half dropped …
        if method == "dare_linear":  # … and the rest rescaled by 1/density
            assert torch.allclose(one[kept], full[kept] / 0.5, atol=1e-5)


def test_ziplora_starts_at_the_sum_and_its_file_reproduces_it(base, two_files, tmp_path):
    loras = [merge.read_lora(f) for f in two_files]
    parts = ziplora.frozen(train.load_parts(base_model_path(), "sd2", {"train": {"prediction": "auto"}}))
    zm = ziplora.ZipModel(parts, loras, [1.0, 1.0])
    want = _outputs(*_hand_sum(base, two_files, [1.0, 1.0]), base.tokenizer)
    _close(_outputs(parts.unet, parts.text_encoders[0], parts.tokenizers[0]), want)
    lat = torch.randn(4, 4, 8, 8)
    log = ziplora.fit(zm, [(lat[:2], ["a sks star", "a sks heart"]), (lat[2:], ["a red star, zwx style"] * 2)],
                      steps=3, lr=0.05, lam=0.01, seed=0, res=64)
    assert len(log) == 3 and any((m.detach() != 1).any() for m in zm.parameters())
    zipped = _outputs(parts.unet, parts.text_encoders[0], parts.tokenizers[0])
    merged = merge.merge(ziplora.merged_loras(zm, loras), [1.0, 1.0], "cat")
    export.write_lora(tmp_path, merged.state_dicts, _meta("merge-ziplora", merged.rank))
    pipe = models.load_pipeline(base_model_path(), "sd2")
    pipe.load_lora_weights(str(tmp_path), weight_name=export.LORA_FILE)
    _close(_outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer), zipped)


def test_merge_refuses_mismatched_ranks_for_entrywise_methods(base, two_files, tmp_path):
    odd = merge.read_lora(_write(tmp_path / "c", base, 2, 2, 3))
    with pytest.raises(merge.MergeError, match="one rank"):
        merge.merge([merge.read_lora(two_files[0]), odd], [1, 1], "ties")
    with pytest.raises(merge.MergeError, match="no such LoRA file"):
        merge.read_lora(tmp_path / "missing.safetensors")

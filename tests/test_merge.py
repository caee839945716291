"""LoRA merging, checked against hand sums, PEFT's own add_weighted_adapter and ZipLoRA written out."""

from __future__ import annotations

import copy
import json
import pathlib
import types
import zlib

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

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


def _peft_files(tmp_path, configs: dict[str, LoraConfig]):
    """A PEFT model with one adapter per config (random A and B, so nothing hides in a zero B),
    each also saved as a diffusers-layout file and read back with merge.read_lora."""
    from peft import get_peft_model
    from safetensors.torch import save_file

    torch.manual_seed(0)
    names = list(configs)
    model = get_peft_model(_Tiny(), configs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, configs[name])
    loras = []
    for name in names:
        for n, p in model.named_parameters():
            if f".{name}." in n and "lora_" in n:
                with torch.no_grad():
                    p.copy_(torch.randn_like(p))
        sd = {k.removeprefix("base_model.model."): v for k, v in
              get_peft_model_state_dict(model, adapter_name=name).items()}
        meta = {f"unet.{k}": v for k, v in json.loads(json.dumps(model.peft_config[name].to_dict(),
                                                                 default=list)).items()}
        save_file({f"unet.{k}": v.contiguous() for k, v in sd.items()}, tmp_path / f"{name}.safetensors",
                  metadata={"lora_adapter_metadata": json.dumps(meta)})
        loras.append(merge.read_lora(tmp_path / f"{name}.safetensors"))
    return model, loras


def _seed_each_module_as_dbkit_does(monkeypatch, model, seed: int) -> None:
    """Make PEFT's add_weighted_adapter draw DARE's drop masks from the generator state dbkit
    uses for each module. Both draw A's mask then B's from the global generator (merge.py's
    _task_arithmetic; PEFT's _generalized_task_arithmetic_weighted_adapter); PEFT seeds it
    once, before its own adapter init, dbkit per module with seed·1000003 + crc32(name)."""
    from peft.tuners.lora.model import LoraModel

    names = {id(m): n for n, m in model.base_model.model.named_modules()}
    original = LoraModel._generalized_task_arithmetic_weighted_adapter

    def seeded(self, combination_type, adapters, weights, target, *args):
        torch.manual_seed(seed * 1_000_003 + zlib.crc32(f"unet.{names[id(target)]}".encode()))
        return original(self, combination_type, adapters, weights, target, *args)

    monkeypatch.setattr(LoraModel, "_generalized_task_arithmetic_weighted_adapter", seeded)


# (method, density, majority sign): every PEFT combination type at a density that prunes,
# DARE's random drops included, with both of TIES' sign elections
PEFT_CASES = [("cat", 1.0, "total"), ("svd", 1.0, "total"), ("linear", 1.0, "total"),
              ("ties", 0.6, "total"), ("ties", 0.6, "frequency"), ("magnitude_prune", 0.6, "total"),
              ("dare_linear", 0.5, "total"), ("dare_ties", 0.5, "total"), ("dare_ties", 0.5, "frequency"),
              ("dare_linear", 0.3, "total"), ("dare_ties", 0.7, "frequency")]


@pytest.mark.parametrize("weights", [[0.6, 1.4], [0.6, -1.4]], ids=["positive", "negative"])
@pytest.mark.parametrize(("method", "density", "sign"), PEFT_CASES)
def test_tensor_merges_match_peft_add_weighted_adapter(method, density, sign, weights, tmp_path, monkeypatch):
    model, loras = _peft_files(tmp_path, {"a": LoraConfig(r=3, lora_alpha=6, target_modules=["lin", "conv"]),
                                          "b": LoraConfig(r=3, lora_alpha=3, target_modules=["lin", "conv"])})
    seed = 5
    if method.startswith("dare"):
        _seed_each_module_as_dbkit_does(monkeypatch, model, seed)
    kw = {"density": density, "majority_sign_method": sign} if method not in ("cat", "svd", "linear") else {}
    model.add_weighted_adapter(["a", "b"], weights, "m", combination_type=method, **kw)
    want = {k.removeprefix("base_model.model."): v
            for k, v in get_peft_model_state_dict(model, adapter_name="m").items()}
    got = merge.merge(loras, weights, method, density=density, majority_sign=sign, seed=seed).state_dicts["unet"][0]
    assert set(got) == set(want)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-5), k
    if method.startswith("dare"):
        # entries dropped from both LoRAs are 0 (random A and B have none): drops were compared
        assert sum(int((got[k] == 0).sum()) for k in got) > 0


@pytest.mark.parametrize(("method", "sign"), [("dare_linear", "total"), ("dare_ties", "total"),
                                              ("dare_ties", "frequency")])
@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
def test_dare_keeps_a_density_fraction_rescaled_by_its_inverse(method, sign, density):
    """DARE (Yu et al. 2024) by its definition, on large tensors: each entry kept with
    probability `density`, kept entries divided by `density`. One LoRA, so TIES' sign election
    keeps every surviving entry and both methods are drop-and-rescale alone."""
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(64, 512, generator=gen), torch.randn(512, 64, generator=gen)
    lora = merge.Lora(pathlib.Path("big.safetensors"), {"unet.big": (a, b, 0.5)}, {"unet": {}}, {})
    sd = merge.merge([lora], [2.0], method, density=density, majority_sign=sign, seed=4).state_dicts["unet"][0]
    # the scale s·w = 1 splits as √1 on A and on B
    for got, full in ((sd["big.lora_A.weight"], a), (sd["big.lora_B.weight"], b)):
        kept = got != 0
        n = kept.numel()
        # binomial: within 5 standard deviations of density·n
        assert abs(int(kept.sum()) - density * n) < 5 * (density * (1 - density) * n) ** 0.5
        assert torch.allclose(got[kept], full[kept] / density, rtol=1e-6)
    # A's and B's masks are separate draws, not one pattern reused
    assert not torch.equal(sd["big.lora_A.weight"] != 0, (sd["big.lora_B.weight"] != 0).T)
    # `seed` fixes the drops: the same seed repeats them, another draws others
    again = merge.merge([lora], [2.0], method, density=density, majority_sign=sign, seed=4).state_dicts["unet"][0]
    other = merge.merge([lora], [2.0], method, density=density, majority_sign=sign, seed=5).state_dicts["unet"][0]
    assert torch.equal(again["big.lora_A.weight"], sd["big.lora_A.weight"])
    assert not torch.equal(other["big.lora_A.weight"], sd["big.lora_A.weight"])


def _hand_scale(cfg: LoraConfig, module: str) -> float:
    """LoRA's scale by its definition: alpha/r (alpha/√r with rsLoRA), alpha from alpha_pattern."""
    alpha = cfg.alpha_pattern.get(module, cfg.lora_alpha)
    return alpha / cfg.r ** 0.5 if cfg.use_rslora else alpha / cfg.r


def _hand_delta(a: torch.Tensor, b: torch.Tensor, scale: float, shape) -> torch.Tensor:
    return (scale * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1))).reshape(shape)


@pytest.mark.parametrize("method", ["weighted", "fused", "cat"])
def test_weighted_and_fused_files_hold_the_weighted_sum_of_the_deltas(method, tmp_path):
    """The runtime sum (diffusers set_adapters / fuse_lora) is Σ wᵢ·sᵢ·Bᵢ·Aᵢ: the file written
    for it must load (scale alpha/r of its own config) as exactly that, for LoRAs of different
    ranks and scales and one that leaves a module out."""
    configs = {"a": LoraConfig(r=3, lora_alpha=6, target_modules=["lin", "conv"]),
               "b": LoraConfig(r=2, lora_alpha=3, use_rslora=True, alpha_pattern={"conv": 5},
                               target_modules=["lin", "conv"]),
               "c": LoraConfig(r=4, lora_alpha=2, target_modules=["lin"])}
    model, loras = _peft_files(tmp_path, configs)
    weights = [0.7, 1.3, -0.4]
    merged = merge.merge(loras, weights, method)
    sd, cfg = merged.state_dicts["unet"]
    assert merged.rank == 3 + 2 + 4 and cfg["r"] == 9
    for module in ("lin", "conv"):
        layer = model.base_model.model.get_submodule(module)
        shape = layer.base_layer.weight.shape
        want = torch.zeros(shape)
        for (name, config), w in zip(configs.items(), weights):
            if module in config.target_modules:
                a, b = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()
                one = _hand_delta(a, b, _hand_scale(config, module), shape)
                # the hand formula is PEFT's own idea of this LoRA's update
                assert torch.allclose(one, layer.get_delta_weight(name).detach(), atol=1e-5)
                want += w * one
        got = _hand_delta(sd[f"{module}.lora_A.weight"], sd[f"{module}.lora_B.weight"],
                          cfg["lora_alpha"] / cfg["r"], shape)
        assert torch.allclose(got, want, atol=1e-5), (module, (got - want).abs().max())
        assert want.abs().max() > 1  # a real update, not two zeros agreeing


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


class _ZipUnet(torch.nn.Module):
    """A stand-in UNet: a 3×3 convolution and a per-pixel linear layer in parallel, so each
    merged module's share of the output, and of the loss's gradient, can be written by hand."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, x, t, ehs, added_cond_kwargs=None):
        return types.SimpleNamespace(sample=self.conv(x) + self.lin(x.movedim(1, -1)).movedim(-1, 1))


def _zip_loras(gen: torch.Generator, conv_in_second: bool = True) -> list[merge.Lora]:
    def part(shape_a, shape_b, scale):
        return (torch.randn(shape_a, generator=gen), torch.randn(shape_b, generator=gen), scale)

    first = {"unet.conv": part((2, 3, 3, 3), (3, 2, 1, 1), 0.5), "unet.lin": part((2, 3), (3, 2), 2.0)}
    second = {"unet.lin": part((4, 3), (3, 4), 0.25)}
    if conv_in_second:
        second["unet.conv"] = part((4, 3, 3, 3), (3, 4, 1, 1), 1.5)
    return [merge.Lora(pathlib.Path(f"{k}.safetensors"), mods, {"unet": {}}, {}) for k, mods in
            enumerate([first, second])]


def _zip_parts(unet: torch.nn.Module, scheduler) -> types.SimpleNamespace:
    # what ZipModel and fit read of train.Parts
    return types.SimpleNamespace(unet=unet, text_encoders=[torch.nn.Identity()], noise_scheduler=scheduler)


def _zip_hand_deltas(loras, weights, module: str, shape) -> list[torch.Tensor]:
    """ΔWᵢ = wᵢ·sᵢ·Bᵢ·Aᵢ by the definition, zero where LoRA i leaves the module out."""
    out = []
    for lo, w in zip(loras, weights):
        if f"unet.{module}" in lo.modules:
            a, b, s = lo.modules[f"unet.{module}"]
            out.append(w * s * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(shape))
        else:
            out.append(torch.zeros(shape))
    return out


def _column(m: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A merger as a per-input-column factor of a (out, in[, kh, kw]) weight."""
    return m.reshape(1, -1, *[1] * (like.dim() - 2))


def test_ziplora_layers_and_file_are_the_column_weighted_sum(tmp_path):
    """ZipLoRA (Shah et al. 2023): merged ΔW = m₁ ⊙ ΔW₁ + m₂ ⊙ ΔW₂, one coefficient per input
    column (channel for a convolution). Checked on the hooked modules' outputs and on the `cat`
    file written from the mergers, for a LoRA that leaves the convolution out."""
    torch.manual_seed(0)
    unet = _ZipUnet()
    gen = torch.Generator().manual_seed(1)
    loras, weights = _zip_loras(gen, conv_in_second=False), [0.8, 1.2]
    zm = ziplora.ZipModel(_zip_parts(unet, None), loras, weights)
    for m in zm.parameters():  # mergers away from their start at 1
        with torch.no_grad():
            m.copy_(torch.rand(m.shape, generator=gen) * 2 - 0.5)
    x = torch.randn(2, 3, 5, 5, generator=gen)
    merged = {}
    for module, run in (("conv", lambda w, mod: torch.nn.functional.conv2d(x, w, mod.bias, padding=1)),
                        ("lin", lambda w, mod: torch.nn.functional.linear(x.movedim(1, -1), w, mod.bias))):
        mod = unet.get_submodule(module)
        deltas = _zip_hand_deltas(loras, weights, module, mod.weight.shape)
        mergers = zm.layers[f"unet.{module}"].mergers
        merged[module] = sum(_column(m.detach(), d) * d for m, d in zip(mergers, deltas))
        with torch.no_grad():
            zm.mode = "zip"
            assert torch.allclose(mod(x if module == "conv" else x.movedim(1, -1)),
                                  run(mod.weight + merged[module], mod), atol=1e-5), module
            for i in range(2):  # the teachers: LoRA i alone
                zm.mode = i
                assert torch.allclose(mod(x if module == "conv" else x.movedim(1, -1)),
                                      run(mod.weight + deltas[i], mod), atol=1e-5), (module, i)
    # the file: a cat merge of Aᵢ·diag(mᵢ), with the original weights
    sd, cfg = merge.merge(ziplora.merged_loras(zm, loras), weights, "cat").state_dicts["unet"]
    for module, want in merged.items():
        a, b = sd[f"{module}.lora_A.weight"], sd[f"{module}.lora_B.weight"]
        got = (cfg["lora_alpha"] / cfg["r"]) * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1))
        assert torch.allclose(got.reshape(want.shape), want, atol=1e-5), module


def test_ziplora_first_step_loss_gradient_and_update_by_hand(monkeypatch):
    """One step of ZipLoRA's objective on the stand-in UNet, written out: for each LoRA k's
    batch x (noised as the scheduler does), loss = λ·mean_layers mean_c |m₁ m₂| +
    Σ_k mean((f_zip(x) − f_k(x))²), f_k the base with LoRA k alone; its gradient in each merger
    by hand (the model is linear in them), and Adam's first step, m − lr·g/(|g| + 1e-8)."""
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    unet = _ZipUnet()
    gen = torch.Generator().manual_seed(2)
    loras, weights = _zip_loras(gen), [0.9, 1.1]
    scheduler = DDPMScheduler(num_train_timesteps=10)
    calls = []

    def add_noise(latents, noise, t):  # the real scheduler, with what it was given kept
        calls.append((latents, noise, t))
        return scheduler.add_noise(latents, noise, t)

    # the text conditioning plays no part in the stand-in UNet
    monkeypatch.setattr(train, "encode_text", lambda parts, prompts, memo, res, **kw: (torch.zeros(len(prompts), 1, 4),
                                                                                        None))
    zm = ziplora.ZipModel(_zip_parts(unet, types.SimpleNamespace(config=scheduler.config, add_noise=add_noise)),
                          loras, weights)
    sets = [(torch.randn(3, 3, 4, 4, generator=gen), ["a sks star"] * 3),
            (torch.randn(2, 3, 4, 4, generator=gen), ["zwx style"] * 2)]
    lr, lam = 0.05, 0.3
    log = ziplora.fit(zm, sets, steps=1, lr=lr, lam=lam, seed=0, res=4, batch=2)

    # the noisy batches: teacher and student saw the same one, drawn from LoRA k's own latents
    assert len(calls) == 4
    noisy = []
    for k in range(2):
        (lat, noise, t), again = calls[2 * k], calls[2 * k + 1]
        assert all(torch.equal(u, v) for u, v in zip((lat, noise, t), again))
        assert all(any(torch.equal(row, r) for r in sets[k][0]) for row in lat)
        noisy.append(DDPMScheduler(num_train_timesteps=10).add_noise(lat, noise, t))

    def conv(x, w):
        return torch.nn.functional.conv2d(x, w, padding=1)

    def lin(x, w):
        return torch.einsum("bchw,oc->bohw", x, w)

    dw = {"conv": _zip_hand_deltas(loras, weights, "conv", unet.conv.weight.shape),
          "lin": _zip_hand_deltas(loras, weights, "lin", unet.lin.weight.shape)}
    apply = {"conv": conv, "lin": lin}
    # at the start every merger is 1; per layer, mean over its 3 columns of |m₁ m₂| = 1
    loss = torch.tensor(lam * 1.0)
    grad = {(mod, i): torch.full((3,), lam / (2 * 3)) for mod in dw for i in range(2)}  # d(λ·penalty)/dmᵢ
    mses = []
    for k, x in enumerate(noisy):
        # zip minus teacher k: the base's own output cancels, Σᵢ ΔWᵢ − ΔW_k remains
        r = sum(apply[mod](x, dw[mod][0] + dw[mod][1] - dw[mod][k]) for mod in dw)
        mses.append(float((r ** 2).mean()))
        loss = loss + (r ** 2).mean()
        for mod in dw:
            for i in range(2):
                # ∂ mean(r²)/∂mᵢ[c] = 2/N · Σ r · (output of column c of ΔWᵢ alone)
                per_column = torch.stack([apply[mod](x[:, [c]], dw[mod][i][:, [c]]) for c in range(3)])
                grad[mod, i] = grad[mod, i] + 2 / r.numel() * (per_column * r).sum(dim=(1, 2, 3, 4))
    assert log[0]["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert [log[0]["subject_mse"], log[0]["style_mse"]] == pytest.approx(mses, rel=1e-5)
    for (mod, i), g in grad.items():
        m = zm.layers[f"unet.{mod}"].mergers[i]
        assert torch.allclose(m.grad, g, rtol=1e-4, atol=1e-7), (mod, i, m.grad, g)
        assert torch.allclose(m.detach(), 1 - lr * g / (g.abs() + 1e-8), atol=1e-6), (mod, i)
    assert min(float(g.abs().min()) for g in grad.values()) > 1e-4  # every merger is pulled somewhere


def test_merge_refuses_mismatched_ranks_for_entrywise_methods(base, two_files, tmp_path):
    odd = merge.read_lora(_write(tmp_path / "c", base, 2, 2, 3))
    with pytest.raises(merge.MergeError, match="one rank"):
        merge.merge([merge.read_lora(two_files[0]), odd], [1, 1], "ties")
    with pytest.raises(merge.MergeError, match="no such LoRA file"):
        merge.read_lora(tmp_path / "missing.safetensors")

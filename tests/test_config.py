"""Tests of dbkit.config: extends chains, overrides, strict validation and the params hash."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from dbkit import config
from dbkit.config import ConfigError, diff, load, parse_override

BASE = config.BASE_PATH


def write(path: Path, data: dict | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def exp_file(tmp_path: Path, name: str = "x", **sections: object) -> Path:
    """A params file in tmp_path that extends the real base.yaml and sets ``sections``."""
    return write(tmp_path / f"{name}.yaml", {"extends": str(BASE), **sections})


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # image folders are relative to the cwd; keep every test's files in its own tmp dir
    monkeypatch.chdir(tmp_path)


# ----------------------------------------------------------------------------- loading


def test_base_loads_with_its_own_defaults() -> None:
    exp = load(BASE)
    assert exp.name == "base"
    assert exp.chain == (BASE.resolve(),)
    assert exp.parent_params() is None
    assert exp.get("train.lora.rank") == 8
    assert "extends" not in exp.params


def test_extends_chain_merges_dicts_and_replaces_lists(tmp_path: Path) -> None:
    a = exp_file(tmp_path, "a", train={"steps": 50, "lora": {"rank": 16}}, sample={"seeds": [7, 8]})
    b = write(tmp_path / "b.yaml", {"extends": "a.yaml", "train": {"lora": {"alpha": 4}}, "sample": {"seeds": [9]}})
    exp = load(b)
    assert exp.chain == (BASE.resolve(), a.resolve(), b.resolve())
    assert exp.get("train.steps") == 50  # from a
    assert exp.get("train.lora.rank") == 16  # from a, sibling of b's alpha: dicts merge
    assert exp.get("train.lora.alpha") == 4
    base_targets = yaml.safe_load(BASE.read_text())["train"]["lora"]["unet_targets"]
    assert exp.get("train.lora.unet_targets") == base_targets  # from base
    assert exp.get("sample.seeds") == [9]  # lists replace
    assert exp.name == "b"
    assert exp.params["experiment"] == "b"
    parent = exp.parent_params()
    assert parent is not None and parent["train"]["lora"]["alpha"] == 8 and parent["experiment"] == "a"


def test_experiment_name_and_notes_are_not_inherited(tmp_path: Path) -> None:
    exp_file(tmp_path, "a", experiment="alpha", notes={"hypothesis": "parent's guess"})
    b = write(tmp_path / "b.yaml", {"extends": "a.yaml"})
    exp = load(b)
    assert exp.name == "b"
    assert exp.get("notes.hypothesis") == ""


def test_file_without_extends_sits_on_base(tmp_path: Path) -> None:
    exp = load(write(tmp_path / "solo.yaml", {"seed": 3}))
    assert exp.chain[0] == BASE.resolve()
    assert exp.get("seed") == 3 and exp.get("train.steps") == yaml.safe_load(BASE.read_text())["train"]["steps"]


def test_ablation_vary_is_replaced_not_merged(tmp_path: Path) -> None:
    exp_file(tmp_path, "a", ablation={"vary": {"train.lora.rank": [4, 8]}})
    b = write(tmp_path / "b.yaml", {"extends": "a.yaml", "ablation": {"vary": {}}})
    assert load(b).get("ablation.vary") == {}


# ----------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(("text", "key", "value"), [
    ("train.lora.rank=32", "train.lora.rank", 32),
    ("ablation.vary.train.lora.rank=[4,8]", "ablation.vary.train.lora.rank", [4, 8]),
    ("captions.dropout=0.5", "captions.dropout", 0.5),
    ("captions.identifier=sks", "captions.identifier", "sks"),
    ("train.unet=false", "train.unet", False),
    ("base.model=", "base.model", ""),
    (" seed = 5 ", "seed", 5),
])
def test_parse_override_types(text: str, key: str, value: object) -> None:
    got = parse_override(text)
    assert got == (key, value)
    assert type(got[1]) is type(value)


def test_parse_override_needs_equals() -> None:
    with pytest.raises(ConfigError, match=r"not key=value"):
        parse_override("train.lora.rank")


def test_overrides_apply_after_files_and_keep_typed_strings(tmp_path: Path) -> None:
    exp = load(exp_file(tmp_path, train={"lora": {"rank": 16}}),
               ["train.lora.rank=32", "train.mixed_precision=no", "captions.identifier=123", "train.lr=1e-4"])
    assert exp.get("train.lora.rank") == 32
    assert exp.get("train.mixed_precision") == "no"  # bare `no` is false in YAML; the key wants a string
    assert exp.get("captions.identifier") == "123"
    assert exp.get("train.lr") == pytest.approx(1e-4)


def test_overrides_as_dict(tmp_path: Path) -> None:
    exp = load(exp_file(tmp_path), {"train.steps": 10, "ablation.vary.train.lora.rank": [4, 32]})
    assert exp.get("train.steps") == 10
    assert exp.get("ablation.vary") == {"train.lora.rank": [4, 32]}


# ----------------------------------------------------------------------------- strict errors


def test_unknown_key_in_file_names_file_and_nearest_key(tmp_path: Path) -> None:
    path = exp_file(tmp_path, train={"lora": {"rnak": 4}})
    with pytest.raises(ConfigError) as e:
        load(path)
    assert "x.yaml: unknown key 'train.lora.rnak' — did you mean 'train.lora.rank'?" in str(e.value)


def test_unknown_key_in_wrong_section_suggests_by_last_part(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'train\.rank' — did you mean 'train\.lora\.rank'\?"):
        load(exp_file(tmp_path), ["train.rank=4"])
    with pytest.raises(ConfigError, match=r"unknown key 'steps' — did you mean 'prior\.steps' or 'train\.steps'"):
        load(exp_file(tmp_path, steps=4))


def test_unknown_key_from_command_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load(exp_file(tmp_path), ["train.stpes=10"])
    assert str(e.value).startswith("command line: unknown key 'train.stpes'")
    assert "did you mean 'train.steps'?" in str(e.value)


@pytest.mark.parametrize(("section", "message"), [
    ({"train": {"steps": "many"}}, r"x\.yaml: 'train\.steps' must be an integer, got 'many' \(str\)"),
    ({"train": {"steps": 10.5}}, r"'train\.steps' must be an integer, got 10\.5 \(float\)"),
    ({"train": {"unet": 1}}, r"'train\.unet' must be true or false, got 1 \(int\)"),
    ({"train": {"lora": {"rank": True}}}, r"'train\.lora\.rank' must be an integer, got True \(bool\)"),
    ({"sample": {"seeds": 3}}, r"'sample\.seeds' must be a list, got 3 \(int\)"),
    ({"sample": {"seeds": [0, "one"]}}, r"'sample\.seeds\[1\]' must be an integer, got 'one'"),
    ({"train": {"mixed_precision": False}}, r"'train\.mixed_precision' must be a string.*quote the word"),
    ({"train": 5}, r"'train' must be a mapping"),
])
def test_wrong_type(tmp_path: Path, section: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(exp_file(tmp_path, **section))


def test_int_is_accepted_and_normalised_where_float_expected(tmp_path: Path) -> None:
    exp = load(exp_file(tmp_path, train={"lr": 1}))
    assert exp.get("train.lr") == 1.0 and isinstance(exp.get("train.lr"), float)
    assert exp.hash == load(exp_file(tmp_path, "y", train={"lr": 1.0})).hash


def test_enum_error_lists_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load(exp_file(tmp_path, train={"optimizer": "adam"}))
    assert "x.yaml: 'train.optimizer' is 'adam'; allowed values: adamw, adamw8bit, prodigy" in str(e.value)


def test_enums_match_base_yaml_comments() -> None:
    """ENUMS must list exactly the `a | b | c` choices in base.yaml's comments."""
    found: dict[str, tuple[str, ...]] = {}
    stack: list[tuple[int, str]] = []
    for line in BASE.read_text().splitlines():
        m = re.match(r"^( *)([a-z0-9_]+):([^#]*)(#.*)?$", line)
        if not m:
            continue
        indent, key, comment = len(m.group(1)), m.group(2), m.group(4) or ""
        stack = [(i, k) for i, k in stack if i < indent]
        dotted = ".".join([k for _, k in stack] + [key])
        stack.append((indent, key))
        if "|" in comment:
            found[dotted] = tuple(part.split()[0] for part in comment.lstrip("# ").split("|"))
    assert found == config.ENUMS


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.lora.rank=0"], r"^command line: 'train\.lora\.rank' must be ≥ 1, got 0$"),
    (["data.resolution=60"], r"resolution 60 is not a multiple of 8: use 56 or 64"),
    (["base.resolution=4"], r"'base\.resolution' must be ≥ 8, got 4"),
    (["captions.dropout=1.5"], r"'captions\.dropout' must be between 0 and 1, got 1\.5"),
    (["train.ema_decay=-0.1"], r"'train\.ema_decay' must be between 0 and 1"),
    (["train.lr=0"], r"'train\.lr' must be > 0, got 0\.0"),
    (["train.batch_size=0"], r"'train\.batch_size' must be ≥ 1"),
    (["data.max_images=-1"], r"'data\.max_images' must be ≥ 0"),
    (["sample.seeds=[]"], r"'sample\.seeds' must not be empty"),
    (["train.unet=false", "train.text_encoder=false"], r"nothing to train"),
    (["data.instance_images=toyworld:Bad-Name"], r"is not toyworld:<name>"),
])
def test_impossible_values(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(exp_file(tmp_path), overrides)


def test_range_error_names_the_file_that_set_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^x\.yaml: 'train\.lora\.rank' must be ≥ 1, got 0$"):
        load(exp_file(tmp_path, train={"lora": {"rank": 0}}))


def test_unknown_toyworld_subject_lists_known_ones(tmp_path: Path) -> None:
    subjects = pytest.importorskip("dbkit.toyworld.subjects").SUBJECTS
    with pytest.raises(ConfigError) as e:
        load(exp_file(tmp_path), ["data.instance_images=toyworld:no_such_subject"])
    assert "no_such_subject" in str(e.value)
    assert all(name in str(e.value) for name in subjects)


def test_missing_instance_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load(exp_file(tmp_path, data={"instance_images": "photos/dog"}))
    msg = str(e.value)
    assert msg.startswith("x.yaml: 'data.instance_images' folder 'photos/dog' does not exist")
    assert "put your subject photos in photos/dog or point data.instance_images at them" in msg
    # the disk checks are skipped on request
    assert load(exp_file(tmp_path, data={"instance_images": "photos/dog"}), check_files=False)


def test_empty_instance_folder_and_one_with_an_image(tmp_path: Path) -> None:
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "readme.txt").write_text("not an image")
    path = exp_file(tmp_path, data={"instance_images": "dog"})
    with pytest.raises(ConfigError, match=r"'data\.instance_images' folder 'dog' has no images"):
        load(path)
    (tmp_path / "dog" / "a.JPG").write_bytes(b"")
    assert load(path).get("data.instance_images") == "dog"


def test_missing_class_images_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'data\.class_images' folder 'cls' does not exist.*put your class"):
        load(exp_file(tmp_path), ["data.class_images=cls"])


def test_hub_model_must_be_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(ConfigError, match=r"'base\.model' 'acme/tiny-sd'.*cannot download weights"):
        load(exp_file(tmp_path), ["base.model=acme/tiny-sd"])
    snap = tmp_path / "hf" / "models--acme--tiny-sd"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("abc123")
    (snap / "snapshots" / "abc123").mkdir(parents=True)
    (snap / "snapshots" / "abc123" / "model_index.json").write_text("{}")
    assert load(exp_file(tmp_path), ["base.model=acme/tiny-sd"]).get("base.model") == "acme/tiny-sd"


def test_local_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'base\.model' folder 'weights/models/sd15' does not exist"):
        load(exp_file(tmp_path), ["base.model=weights/models/sd15"])
    # shaped like a hub id: the message covers both readings
    with pytest.raises(ConfigError, match=r"'base\.model' 'models/sd15' is neither a local folder nor in the"):
        load(exp_file(tmp_path), ["base.model=models/sd15"])
    (tmp_path / "models" / "sd15").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"'base\.model' folder 'models/sd15' has no model_index\.json"):
        load(exp_file(tmp_path), ["base.model=models/sd15"])
    (tmp_path / "models" / "sd15" / "model_index.json").write_text("{}")
    assert load(exp_file(tmp_path), ["base.model=models/sd15"]).get("base.model") == "models/sd15"


def test_extends_cycle(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", {"extends": "b.yaml"})
    write(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(ConfigError, match=r"extends cycle a\.yaml → b\.yaml → a\.yaml"):
        load(tmp_path / "a.yaml")


def test_missing_extends_target(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"x\.yaml: 'extends: nope\.yaml' not found"):
        load(write(tmp_path / "x.yaml", {"extends": "nope.yaml"}))


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "x.yaml", f"extends: {BASE}\ntrain:\n  steps: [1, 2\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"^x\.yaml: line \d+: invalid YAML"):
        load(path)


def test_params_file_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"x\.yaml: params must be a mapping.*list"):
        load(write(tmp_path / "x.yaml", "- 1\n- 2\n"))


def test_ablation_vary_bad_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'train\.lora\.rnak' — did you mean 'train\.lora\.rank'"):
        load(exp_file(tmp_path, ablation={"vary": {"train.lora.rnak": [4, 8]}}))


def test_ablation_vary_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'train\.lora\.rank' must be ≥ 1, got 0"):
        load(exp_file(tmp_path, ablation={"vary": {"train.lora.rank": [0, 8]}}))
    with pytest.raises(ConfigError, match=r"must be a non-empty list"):
        load(exp_file(tmp_path, ablation={"vary": {"train.lora.rank": []}}))
    with pytest.raises(ConfigError, match=r"allowed values: adamw, adamw8bit, prodigy"):
        load(exp_file(tmp_path, ablation={"vary": {"train.optimizer": ["adamw", "sgd"]}}))


def test_ablation_vary_good_key(tmp_path: Path) -> None:
    exp = load(exp_file(tmp_path, ablation={"vary": {"train.lora.rank": [4, 32], "train.lr": [1, 0.01]}}))
    assert exp.get("ablation.vary") == {"train.lora.rank": [4, 32], "train.lr": [1.0, 0.01]}


# ----------------------------------------------------------------------------- hash, diff, variants


def test_hash_stable_across_key_order_and_notes(tmp_path: Path) -> None:
    a = load(exp_file(tmp_path, "a", seed=1, train={"steps": 20, "lr": 0.01}))
    b = load(write(tmp_path / "b.yaml", {"train": {"lr": 0.01, "steps": 20}, "seed": 1, "extends": str(BASE),
                                         "notes": {"hypothesis": "rank matters"}}))
    assert a.hash == b.hash
    assert re.fullmatch(r"[0-9a-f]{64}", a.hash)
    c = load(exp_file(tmp_path, "c", seed=1, train={"steps": 21, "lr": 0.01}))
    assert c.hash != a.hash


def test_diff_lists_changed_leaves() -> None:
    a = {"train": {"steps": 1, "lora": {"rank": 8}}, "seed": 0, "sample": {"seeds": [0]}}
    b = {"train": {"steps": 2, "lora": {"rank": 8}}, "seed": 0, "sample": {"seeds": [0, 1]}, "extra": 1}
    assert diff(a, b) == {"extra": (None, 1), "sample.seeds": ([0], [0, 1]), "train.steps": (1, 2)}
    assert diff(a, a) == {}


def test_diff_against_parent(tmp_path: Path) -> None:
    exp = load(exp_file(tmp_path, train={"lora": {"rank": 32}}))
    d = diff(exp.parent_params(), exp.params)
    assert d == {"experiment": ("base", "x"), "train.lora.rank": (8, 32)}


def test_with_overrides_makes_a_validated_copy(tmp_path: Path) -> None:
    exp = load(exp_file(tmp_path))
    v = exp.with_overrides({"train.lora.rank": 32}, name="x-rank32")
    assert v.name == "x-rank32" and v.params["experiment"] == "x-rank32"
    assert v.get("train.lora.rank") == 32 and exp.get("train.lora.rank") == 8
    assert v.hash != exp.hash and v.path == exp.path and v.chain == exp.chain
    assert exp.with_overrides({}).hash == exp.hash
    with pytest.raises(ConfigError, match=r"'train\.lora\.rank' must be ≥ 1"):
        exp.with_overrides({"train.lora.rank": 0})
    with pytest.raises(ConfigError, match=r"did you mean 'train\.lora\.rank'"):
        exp.with_overrides({"train.lora.rnak": 4})


def test_get_unknown_key_suggests() -> None:
    with pytest.raises(KeyError, match=r"train\.lora\.rank"):
        load(BASE).get("train.lora.rnak")


_PARAMS = Path(__file__).resolve().parent.parent / "params"


@pytest.mark.parametrize("name", sorted(str(p.relative_to(_PARAMS)) for p in _PARAMS.rglob("*.yaml")))
def test_every_shipped_params_file_and_its_variants_load(name: str) -> None:
    from dbkit import workflow

    if name == "sd15_example.yaml":
        pytest.skip("names local SD1.5/CLIP/DINO folders that only a GPU user has")
    exp = config.load(_PARAMS / name)
    for _, variant in workflow.variants(exp):
        assert variant.hash != exp.hash


def test_new_weights_in_the_same_folder_change_the_run_hash(tmp_path: Path) -> None:
    base = tmp_path / "mybase"
    (base / "unet").mkdir(parents=True)
    (base / "model_index.json").write_text("{}")
    (base / "unet" / "w.safetensors").write_bytes(b"old weights")
    first = load(exp_file(tmp_path), [f"base.model={base}"]).hash
    assert load(exp_file(tmp_path), [f"base.model={base}"]).hash == first
    (base / "unet" / "w.safetensors").write_bytes(b"new weights")
    assert load(exp_file(tmp_path), [f"base.model={base}"]).hash != first


# ----------------------------------------------------------------------------- fail early: settings that cannot train


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.optimizer=prodigy"],
     r"base\.yaml: 'train\.lr' is 0\.002 but train\.optimizer=prodigy adapts its own step size .*train\.lr: 1\.0"),
    (["train.optimizer=prodigy", "train.lr=1.0"],
     r"^x\.yaml: 'train\.text_encoder_lr' is 0\.0004 but train\.optimizer=prodigy .* expects lr≈1\.0"),
    (["train.optimizer=prodigy", "train.lr=1.0", "train.text_encoder_lr=0.5"],
     r"^command line: 'train\.text_encoder_lr' is 0\.5 but train\.lr is 1\.0: .*same lr≈1\.0 for the UNet and the "
     r"text encoder"),
    (["captions.dropout=1"], r"^command line: 'captions\.dropout' is 1\.0: every training caption would be empty"),
    (["captions.keep_tags=[blurry]"],
     r"^command line: captions\.keep_tags=\['blurry'\] matches no tag .*: 'a sks star'$"),
])
def test_settings_that_cannot_train_fail_at_load_naming_the_key(tmp_path: Path, overrides: list[str],
                                                                 message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(exp_file(tmp_path, train={"text_encoder_lr": 0.0004}), overrides)


def test_prodigy_with_equal_lrs_or_one_trained_part_loads(tmp_path: Path) -> None:
    assert load(exp_file(tmp_path), ["train.optimizer=prodigy", "train.lr=1.0", "train.text_encoder_lr=1.0"])
    # the text encoder is not trained: its lr does not matter
    assert load(exp_file(tmp_path), ["train.optimizer=prodigy", "train.lr=1.0", "train.text_encoder=false"])
    # a fixed caption that keep_tags keeps
    assert load(exp_file(tmp_path), ["captions.instance_prompt={subject}", "captions.keep_tags=[blurry]"])


def test_adamw8bit_needs_bitsandbytes_and_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    import torch

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"^command line: 'train\.optimizer' is adamw8bit but bitsandbytes is "
                                          r"not installed .*use train\.optimizer: adamw$"):
        load(exp_file(tmp_path), ["train.optimizer=adamw8bit"])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # "installed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"'train\.optimizer' is adamw8bit but this machine has no CUDA GPU"):
        load(exp_file(tmp_path), ["train.optimizer=adamw8bit"])
    # the machine is not checked on request (params written here, trained elsewhere)
    assert load(exp_file(tmp_path), ["train.optimizer=adamw8bit"], check_files=False)


def test_an_ablation_variant_that_cannot_train_fails_at_load(tmp_path: Path) -> None:
    path = exp_file(tmp_path, ablation={"variants": {"fast": {"train.optimizer": "prodigy"}}})
    with pytest.raises(ConfigError, match=r"^x\.yaml: ablation variant train\.optimizer=\"prodigy\": .*'train\.lr' is "
                                          r"0\.002 but train\.optimizer=prodigy"):
        load(path)
    with pytest.raises(ConfigError, match=r"ablation variant captions\.dropout=1\.0: .*'captions\.dropout' is 1\.0"):
        load(exp_file(tmp_path, ablation={"vary": {"captions.dropout": [0.1, 1.0]}}))


def test_a_key_added_later_keeps_old_run_hashes_at_its_old_behaviour() -> None:
    """metrics.seed came after the notes' runs: at 100 (the seeds the code always drew) the hash
    is the one computed without the key; another seed is another run."""
    import copy

    MERGE = Path(__file__).resolve().parent.parent / "params" / "notes" / "merge.yaml"

    p = load(MERGE).params
    without = copy.deepcopy(p)
    del without["metrics"]["seed"]
    assert config.params_hash(p) == config.params_hash(without)
    assert load(MERGE, ["metrics.seed=200"]).hash != load(MERGE).hash
    # train.lokr came with the LoKr method: a run written before it hashes as it did
    without = copy.deepcopy(p)
    del without["train"]["lokr"]
    assert config.params_hash(p) == config.params_hash(without)
    assert load(MERGE, ["train.lokr.factor=4"]).hash != load(MERGE).hash


def test_moving_code_renames_no_run() -> None:
    """Every notes file hashes as the code before the methods/ and metric_registry moves hashed
    it (tests/data/notes_run_hashes.json, recorded by that commit): a refactor that changed a
    run hash would orphan its run folder and its committed report. The notes pin their thread
    count, so the hash is the same on any CPU."""
    import json

    root = Path(__file__).resolve().parent.parent
    recorded = json.loads((root / "tests" / "data" / "notes_run_hashes.json").read_text())["run_hashes"]
    assert len(recorded) == len(list((root / "params" / "notes").glob("*.yaml"))) - 1  # all but parent.yaml
    for path, run_hash in recorded.items():
        assert load(root / path).hash == run_hash, f"{path}: the run hash moved"
def test_the_thread_count_a_cpu_run_computes_with_is_in_its_hash(monkeypatch) -> None:
    """On a CPU the thread count decides the float rounding, so it is part of the run: threads:
    0 hashes as the count torch uses on this machine (another core count, another run), equal
    to that count written out; on a CUDA device the count computes nothing the model sees."""
    import torch

    from dbkit import cpu_threads

    MERGE = Path(__file__).resolve().parent.parent / "params" / "notes" / "merge.yaml"
    default = cpu_threads.default()
    hashes = {n: load(MERGE, [f"threads={n}"]).hash for n in (0, 1, 2, 3)}
    assert hashes[0] == hashes[default] and len({hashes[n] for n in (1, 2, 3)}) == 3
    monkeypatch.setattr(cpu_threads, "_default", default + 1)  # a machine with one more core
    assert load(MERGE, ["threads=0"]).hash != hashes[0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert len({load(MERGE, [f"threads={n}"]).hash for n in (0, 1, 2)}) == 1
    without = load(MERGE).params
    del without["threads"]  # a run written before the key existed reads as threads: 0
    assert config.with_added_keys(without)["threads"] == 0


def test_threads_and_workers_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'threads'"):
        load(exp_file(tmp_path, threads=-1))
    with pytest.raises(ConfigError, match=r"'ablation.workers'"):
        load(exp_file(tmp_path, ablation={"workers": 0}))

"""Merges as part of an experiment: the `merge:` params, run from 04_ablations.

Sources are this run's LoRA, other experiments' runs (trained first when missing, like
ablation variants) or LoRA files. Each method of `merge.methods` becomes a row of the
ablation table and a row of the merge grids; each merged LoRA is written in both layouts
with metadata naming its sources and method, and is scored through the public loader,
as every other output is. When the sources are a toy-world subject and a toy-world style,
rows are scored on prompts asking for both ("a sks heart …, ohwx style"), beside each LoRA
alone on the same prompts; a wA × wB grid of runtime sums gives images and a heat map.
Everything lands in a cache folder keyed by the sources' bytes and the merge settings.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from . import captions as cap
from . import (
    config,
    cpu_threads,
    data,
    export,
    merge,
    methods,
    metrics,
    models,
    report,
    runs,
    sample,
    train,
    workflow,
    ziplora,
)
from .files import atomic_write_bytes, atomic_write_json, read_json


@dataclasses.dataclass
class Source:
    label: str
    lora_dir: Path  # holds pytorch_lora_weights.safetensors
    params: dict | None  # the params it was trained with (None: a file from elsewhere)
    run_dir: Path | None


def resolve_sources(exp: config.Experiment, rd: Path, *, progress: bool = True) -> list[Source]:
    """Each `merge.loras` entry as a LoRA folder; params files are run (or reused) first."""
    out = []
    for entry in exp.params["merge"]["loras"]:
        if entry == "this":
            out.append(Source(exp.name, rd / "output", exp.params, rd))
            continue
        path = config.merge_source(entry, Path(exp.path))
        if path is None:
            raise merge.MergeError(f"merge.loras: {entry!r} does not exist; name \"this\", a params file, a run "
                                   "folder or a LoRA .safetensors file")
        if path.suffix in (".yaml", ".yml"):
            src = config.load(path, check_prose=False)  # a source is trained, not published
            srd, _ = workflow.train_variant(src, progress=progress)
            out.append(Source(src.name, srd / "output", src.params, srd))
        else:
            folder = path.parent if path.is_file() else (path / "output" if (path / "output").is_dir() else path)
            out.append(Source(path.stem if path.is_file() else path.name, folder, None, None))
    return out


def _lora_file(s: Source) -> Path:
    return s.lora_dir / export.LORA_FILE


def cache_key(exp: config.Experiment, sources: list[Source]) -> dict:
    p = exp.params
    path, _ = workflow.base_of(p)
    return {"merge": p["merge"], "sources": [data.file_digest(_lora_file(s)) for s in sources],
            "base": models.fingerprint(str(path)), "sample": p["sample"], "metrics": p["metrics"],
            "seed": p["seed"], "v": 1, **cpu_threads.cache_fields(p)}


def _weights(p: dict, n: int) -> list[float]:
    return p["merge"]["weights"] or [1.0] * n


def _metadata(p: dict, sources: list[Source], loras: list[merge.Lora], method: str, rank: int) -> dict:
    """The first source's training metadata with the merge's method and rank, and the merge
    recorded: sources (path, sha256, weight) and every knob the method used."""
    m = p["merge"]
    first = dict(loras[0].meta) or {"family": workflow.base_of(p)[1], "steps": 0, "resolution": 0, "lr": 0,
                                    "text_encoder_lr": 0, "tag_frequency": {}, "num_images": 0, "seed": 0,
                                    "subject": "", "class_noun": ""}
    return first | {"method": f"merge:{method}", "rank": rank, "alpha": rank, "merge": {
        "method": method, "weights": _weights(p, len(sources)), "density": m["density"],
        "majority_sign": m["majority_sign"], "svd_rank": m["svd_rank"],
        "ziplora": {"steps": m["ziplora_steps"], "lr": m["ziplora_lr"], "lambda": m["ziplora_lambda"]},
        "sources": [{"label": s.label, "file": str(_lora_file(s)), "sha256": data.file_digest(_lora_file(s))}
                    for s in sources]}}


def write_merged(out: Path, merged: merge.Merged, meta: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    export.write_lora(out, merged.state_dicts, meta)
    atomic_write_json(out / "training_metadata.json", meta)
    return out


def _ziplora(p: dict, sources: list[Source], loras: list[merge.Lora], out: Path) -> merge.Merged:
    """Train the mergers on both sources' training images and captions, then save them."""
    path, family = workflow.base_of(p)
    m, res = p["merge"], p["data"]["resolution"]
    parts = ziplora.frozen(train.load_parts(path, family, p))
    zm = ziplora.ZipModel(parts, loras, _weights(p, len(loras)))
    sets = []
    for s in sources:
        if s.run_dir is None or not (s.run_dir / "captions.jsonl").exists():
            raise merge.MergeError(f"ZipLoRA needs each LoRA's training images and captions; {s.label} is a file: "
                                   "name the params file or run folder it was trained by in merge.loras")
        recs = workflow.read_jsonl(s.run_dir / "captions.jsonl")
        sets.append((ziplora.encode_images(parts.vae, [r["file"] for r in recs], res), [r["caption"] for r in recs]))
    log = ziplora.fit(zm, sets, steps=m["ziplora_steps"], lr=m["ziplora_lr"], lam=m["ziplora_lambda"],
                      seed=p["seed"], res=res)
    workflow.write_jsonl(out / "ziplora_log.jsonl", log)
    return merge.merge(ziplora.merged_loras(zm, loras), _weights(p, len(loras)), "cat")


def build_merges(p: dict, sources: list[Source], folder: Path) -> dict[str, Path]:
    """Every method's merged LoRA folder (`weighted`/`fused` save their exact equal, cat)."""
    m = p["merge"]
    loras = [merge.read_lora(_lora_file(s)) for s in sources]
    out = {}
    for method in m["methods"]:
        target = folder / method
        if not (target / export.LORA_FILE).exists():
            if method == "ziplora":
                merged = _ziplora(p, sources, loras, target)
            else:
                merged = merge.merge(loras, _weights(p, len(loras)), method, density=m["density"],
                                     majority_sign=m["majority_sign"], svd_rank=m["svd_rank"], seed=p["seed"])
            write_merged(target, merged, _metadata(p, sources, loras, method, merged.rank))
        out[method] = target
    return out


# --------------------------------------------------------------------------- scoring


def runtime_pipeline(p: dict, sources: list[Source], weights: list[float], *, fuse: bool = False):
    """The base with every source loaded as its own adapter, summed at run time by
    `set_adapters` (and folded into the weights by `fuse_lora` when `fuse`)."""
    path, family = workflow.base_of(p)
    pipe = models.load_pipeline(path, family)
    names = [f"lora{k}" for k in range(len(sources))]
    with models.quiet_loading():
        for name, s in zip(names, sources):
            pipe.load_lora_weights(str(s.lora_dir), weight_name=export.LORA_FILE, adapter_name=name)
    pipe.set_adapters(names, adapter_weights=weights)
    if fuse:
        pipe.fuse_lora(adapter_names=names)
        pipe.unload_lora_weights()  # the fused sum stays in the weights
    return pipe


def pair_of(sources: list[Source]) -> tuple | None:
    """(subject, subject phrase, style, style phrase) when the sources are a toy-world subject
    and a toy-world style; None otherwise (then merges are written, not scored)."""
    subj = next((s for s in sources if s.params and workflow.subject_of(s.params)), None)
    sty = next((s for s in sources if s.params and workflow.style_of(s.params)), None)
    if subj is None or sty is None:
        return None
    return (workflow.subject_of(subj.params), cap.subject_phrase(cap.effective_params(subj.params)),
            workflow.style_of(sty.params), cap.subject_phrase(cap.effective_params(sty.params)))


def score(p: dict, pipe, pair: tuple, n_prompts: int = 8) -> dict:
    subject, sphrase, style, tphrase = pair
    seeds = workflow.evaluation_seeds(p)
    return metrics.evaluate_combination(workflow.generator_for(pipe, p), subject, sphrase, style, tphrase,
                                        seeds=seeds, n_prompts=n_prompts)


def _pipelines(p: dict, sources: list[Source], merged: dict[str, Path]):
    """(label, pipeline) per row: each source alone, then each method."""
    path, family = workflow.base_of(p)
    for s in sources:
        yield f"{s.label} alone", methods.load_trained(s.lora_dir, path, family)
    for method, folder in merged.items():
        if method in merge.RUNTIME_METHODS:
            yield f"merge: {method}", runtime_pipeline(p, sources, _weights(p, len(sources)), fuse=method == "fused")
        else:
            yield f"merge: {method}", methods.load_trained(folder, path, family)


def weight_grid(p: dict, sources: list[Source], pair: tuple, folder: Path) -> dict:
    """Runtime sums over wA × wB: scores per cell (fewer prompts) and one image per cell."""
    grid = p["merge"]["weight_grid"]
    subject, sphrase, style, tphrase = pair
    prompt = f"a {sphrase} on a gray background, {tphrase}"
    cells, images = [], []
    for wa in grid:
        row = []
        for wb in grid:
            pipe = runtime_pipeline(p, sources, [wa, wb])
            cells.append({"wA": wa, "wB": wb, **score(p, pipe, pair, n_prompts=4)})
            row.append(workflow.generator_for(pipe, p)([prompt], [p["sample"]["seeds"][0]])[0])
        images.append((f"wA {wa}", row))
    picture = report.image_grid(images, [f"wB {w}" for w in grid], title=prompt, scale=2)
    atomic_write_bytes(folder / "weight_grid.png", sample.png_bytes(picture))
    fig = report.plot_weight_heatmap(cells, grid, ("subject_fidelity", "style_rate", "product"))
    atomic_write_bytes(folder / "weight_heatmap.png", report.figure_png(fig))
    return {"cells": cells, "images": "weight_grid.png", "heatmap": "weight_heatmap.png"}


def run_merges(exp: config.Experiment, rd: Path, *, progress: bool = True) -> dict:
    """Build, save and score every merge; results cached by their inputs."""
    p = exp.params
    sources = resolve_sources(exp, rd, progress=progress)
    folder = runs.cache_path("merges", cache_key(exp, sources))
    if (hit := read_json(folder / "merges.json")) is not None:
        return hit
    runs.writable_cache_dir(folder)
    t0 = time.time()
    merged = build_merges(p, sources, folder)
    pair = pair_of(sources)
    rows, images = [], []
    if pair is not None:
        prompt = f"a {pair[1]} on a gray background, {pair[3]}"
        for label, pipe in _pipelines(p, sources, merged):
            rows.append({"label": label, "metrics": score(p, pipe, pair),
                         "lora_dir": str(merged.get(label.removeprefix("merge: "), ""))})
            images.append((label, workflow.generator_for(pipe, p)([prompt], p["sample"]["seeds"])))
        picture = report.image_grid(images, [f"seed {x}" for x in p["sample"]["seeds"]], title=prompt, scale=2)
        atomic_write_bytes(folder / "merge_grid.png", sample.png_bytes(picture))
    own = [{"label": s.label, "metrics": read_json(s.run_dir / "metrics.json")} for s in sources
           if s.run_dir is not None and s.run_dir != rd]  # this run is a row of the table already
    result = {"sources": [{"label": s.label, "lora": str(_lora_file(s))} for s in sources], "own": own,
              "methods": {k: str(v) for k, v in merged.items()}, "rows": rows, "folder": str(folder),
              "grid": "merge_grid.png" if pair else None,
              "weight_grid": weight_grid(p, sources, pair, folder) if pair and p["merge"]["weight_grid"] else None,
              "seconds": round(time.time() - t0, 1)}
    atomic_write_json(folder / "merges.json", result)
    return result


def ablation_rows(result: dict, rd: Path) -> tuple[list[dict], list[dict]]:
    """Rows and grids to append to ablation.json (the report's table and pictures); the
    pictures are copied into the run folder, which the report reads."""
    folder = Path(result["folder"])
    rows = [{"label": f"{r['label']} (its own prompts)", "run_dir": None, "metrics": r["metrics"]}
            for r in result.get("own", [])]
    rows += [{"label": f"{r['label']} (subject + style prompts)", "run_dir": None, "metrics": r["metrics"],
              "lora_dir": r["lora_dir"]} for r in result["rows"]]
    pictures = []
    if result.get("grid"):
        pictures.append(("merges: each LoRA alone, then each method (row), seeds (column)", result["grid"]))
    if result.get("weight_grid"):
        wg = result["weight_grid"]
        pictures += [("weight grid wA × wB (runtime sum)", wg["images"]), ("weight grid scores", wg["heatmap"])]
    grids = []
    for title, name in pictures:
        atomic_write_bytes(rd / "ablation" / f"merge_{name}", (folder / name).read_bytes())
        grids.append({"prompt": title, "file": f"ablation/merge_{name}"})
    return rows, grids


def extend_ablation(exp: config.Experiment, rd: Path, result: dict, *, progress: bool = True) -> dict:
    """04_ablations' second half: when the params ask for merges, run them and add their rows
    and pictures to the ablation table (ablation.json, which the report reads)."""
    p = exp.params
    if not (p["merge"]["methods"] or p["merge"]["weight_grid"]):
        return result
    merged = run_merges(exp, rd, progress=progress)
    more_rows, more_grids = ablation_rows(merged, rd)
    result = result | {"rows": result["rows"] + more_rows, "grids": result["grids"] + more_grids, "merge": merged}
    atomic_write_json(rd / "ablation.json", result)
    return result

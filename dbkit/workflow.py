"""What each notebook does, as plain functions that read and write files in the run folder.

01_data → `prepare_data`, 02_captions → `prepare_captions`, 03_train → `run_training`
(+ `evaluate_run`), 04_ablations → `run_ablations`, 05_report → `summarise`.
Notebooks hand each other files (manifest.jsonl, captions.jsonl, output/, metrics.json …),
never Python state, so any notebook can be re-run alone, and the tests call these same
functions without Jupyter.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from . import captions as cap
from . import (
    config,
    cpu_threads,
    data,
    framing,
    masks,
    matting,
    methods,
    metric_registry,
    metrics,
    models,
    parallel,
    paths,
    reuse,
    runs,
    sample,
)
from .files import atomic_write_bytes, atomic_write_json, atomic_write_text, intact_checkpoints, read_json


def open_experiment(params_path: str, overrides: list[str] | None = None,
                    run_dir: str = "", stage: str = "", needs: str = "") -> tuple[config.Experiment, Path]:
    """Load and validate the params, find (or create) the run folder, and record `stage`'s
    provenance (the notebook's: data, captions, ablations, report). Training records its own
    in run_training, only when it actually trains, so 03_train passes no stage.

    Works from any folder: the params file is searched from the cwd upwards and the process
    moves to the project root (dbkit.paths), so a kernel JupyterLab started in notebooks/
    writes to the same runs/ and reports/ as `dbkit run`. A relative `run_dir` is taken from
    where the caller stood. `needs` (a notebook name) refuses to start, in one line naming the
    notebook to run first, when that notebook's inputs are missing."""
    cwd = Path.cwd()
    params_file, root = paths.enter_project(params_path)  # JupyterLab's kernel starts in notebooks/
    exp = config.load(params_file, overrides or [])
    cpu_threads.apply(exp.params)
    if exp.params["ablation"]["workers"] > 1 and stage != "report":  # refused before 01_data works, not at 04
        check_parallel_threads([vexp for _, vexp in variants(exp)], exp.params["ablation"]["workers"])
    rd = paths.absolute_from(run_dir, cwd, root) if run_dir else runs.run_dir(exp)
    missing = missing_inputs(rd, needs)
    if missing:
        raise MissingInput(missing)
    rd.mkdir(parents=True, exist_ok=True)
    if stage:
        runs.write_provenance(rd, exp, stage)
    return exp, rd


# the files each notebook reads, and the notebook that writes them
NEEDS = {
    "02_captions": [("manifest.jsonl", "01_data")],
    "03_train": [("data.json", "01_data"), ("captions.jsonl", "02_captions")],
    "04_ablations": [("output", "03_train")],
    "05_report": [("output", "03_train"), ("ablation.json", "04_ablations")],
}


class MissingInput(RuntimeError):
    """An earlier notebook has not run for this experiment. Jupyter shows it as one line."""

    def _render_traceback_(self) -> list[str]:  # IPython's hook: no traceback for a user's ordering slip
        return [f"MissingInput: {self}"]


def missing_inputs(rd: Path, needs: str) -> str:
    """'' when `needs`' inputs are in the run folder, else which notebook to run first."""
    for name, writer in NEEDS.get(needs, []):
        if not (rd / name).exists():
            return (f"{rd / name} is missing: run notebooks/{writer}.ipynb first with the same params_path "
                    f"and overrides (or `dbkit run <params> --only {writer} {needs}`)")
    return ""


def header(exp: config.Experiment, rd: Path) -> str:
    """The first line every notebook shows: which params file, project root and run folder."""
    return (f"**{exp.name}** · params `{exp.path}` · params hash `{exp.hash[:12]}` · project root "
            f"`{Path.cwd()}` · run folder `{rd}`")


def base_of(p: dict) -> tuple[Path, str]:
    path = models.resolve(p["base"]["model"])
    return path, models.family_of(p, path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _toyworld_name(p: dict) -> str | None:
    spec = p["data"]["instance_images"]
    return spec.split(":", 1)[1].partition("@")[0] if spec.startswith("toyworld:") else None


def subject_of(p: dict):
    """The toy-world subject behind data.instance_images, or None (a user's photos, a style)."""
    from .toyworld import subjects

    return subjects.SUBJECTS.get(_toyworld_name(p) or "")


def style_of(p: dict):
    """The toy-world style behind data.instance_images, or None."""
    from .toyworld import styles

    return styles.STYLES.get(_toyworld_name(p) or "")


def has_oracle_metrics(p: dict) -> bool:
    """Whether the metrics step has anything to measure (a toy subject or style, or CLIP)."""
    return p["metrics"]["backend"] == "clip" or subject_of(p) is not None or style_of(p) is not None


# --------------------------------------------------------------------------- 01 data


def prepare_data(exp: config.Experiment, rd: Path) -> dict:
    """Validate the instance images, write manifest.jsonl, and get the class images
    (a folder of real ones, or generated by the base and cached by a hash of their inputs)."""
    t0 = time.time()
    p, d = exp.params, exp.params["data"]
    folder = data.resolve_folder(d["instance_images"])
    found = data.scan(folder, crop=d, max_images=d["max_images"], on_bad=d["on_bad_image"])
    manifest, dropped = data.filter_by_area(found.manifest, d["min_subject_area"], str(folder))
    manifest, detections = framing.frame_manifest(manifest, d, rd, toy=masks.is_toy(p))
    manifest = matting.matte_manifest(manifest, d, rd, toy=masks.is_toy(p))
    if p["train"]["masked_loss"]:  # a missing mask stops here, naming every photo, not at the first step
        masks.check_all([Path(r["file"]) for r in manifest], toy=masks.is_toy(p))
    write_jsonl(rd / "manifest.jsonl", manifest)
    if p["metrics"]["backend"] == "clip":  # a missing CLIP/DINO folder fails here, not after training
        from . import metric_backends

        metric_backends.check_backends(p)
    # warnings and skipped files go to data.json: the 01_data page lists them (data_markdown)
    info = {"instance_dir": str(folder), "n_instance": len(manifest), "class_dir": None, "n_class": 0,
            "class_source": None, "dropped_small_subject": [r["file"] for r in dropped],
            "skipped_bad_images": found.skipped, "warnings": found.warnings,
            "dropped_small_face": [r["file"] for r in detections if not r["kept"]], "detections": detections}
    if p["prior"]["enabled"]:
        if d["class_images"]:
            class_dir = data.resolve_folder(d["class_images"])
            info["warnings"] += data.scan(class_dir, crop=d, instance=False).warnings  # validates every file
            info["class_source"] = "toy world's pictures of the class" if d["class_images"].startswith("toyworld:") \
                else "folder"
        else:
            path, family = base_of(p)
            base_id = f"{path}#{models.fingerprint(str(path))}"
            # with class_prompt "{caption}" the instance captions decide the class prompts
            q = cap.effective_params(p)
            records = cap.build_captions(manifest, q) if q["prior"]["class_prompt"] == cap.CAPTION_CLASS_PROMPT else []
            class_dir, hit = sample.class_images(lambda: models.load_pipeline(path, family), base_id, p,
                                                 cap.class_prompts(q, records))
            info["class_source"] = "generated by the base (cache hit)" if hit else "generated by the base"
        info["class_dir"] = str(class_dir)
        info["n_class"] = len(data.list_images(class_dir))
    atomic_write_json(rd / "data.json", info)
    runs.record_timing(rd, "data", time.time() - t0)
    return info


# --------------------------------------------------------------------------- 02 captions


def prepare_captions(exp: config.Experiment, rd: Path) -> list[dict]:
    """Captions from the configured source → captions.jsonl and tag_frequencies.json."""
    manifest = read_jsonl(rd / "manifest.jsonl")
    records = cap.build_captions(manifest, cap.effective_params(exp.params))
    write_jsonl(rd / "captions.jsonl", records)
    atomic_write_json(rd / "tag_frequencies.json", cap.tag_frequencies(records))
    return records


def caption_rows(records: list[dict], thumb: int = 128) -> list[dict]:
    """Rows of the 02_captions table (report.captions_html): each photo's thumbnail, the
    tagger's tags with their probabilities, the captioner's sentence and the final caption."""
    return [{"thumb": data.open_rgb(Path(r["file"]), max_side=thumb), "name": Path(r["file"]).name,
             "tagger": ", ".join(f"{t} {x:.2f}" for t, x in r.get("tag_scores", {}).items()),
             "sentence": r.get("sentence", ""), "caption": r["caption"]} for r in records]


def captions_note(records: list[dict]) -> str:
    """For caption models: how many photos the cache answered (their models did not run)."""
    if not records or "from_cache" not in records[0]:
        return ""
    hits = sum(bool(r["from_cache"]) for r in records)
    return (f"Caption models: {hits} of {len(records)} photos from the cache (.cache/dbkit, keyed by the photo's "
            "content, the model files' content and the settings); the models ran on the others.")


# --------------------------------------------------------------------------- 03 train


def preview_writer(rd: Path, p: dict, subject=None, style=None):
    """Callback for the trainer: samples at fixed prompts/seeds (and, on the toy world,
    the subject-fidelity or style-rate curve) at every `train.sample_every` steps and at the last."""
    q = cap.effective_params(p)
    prompts = [cap.expand(t, q) for t in p["sample"]["prompts"]]
    s = p["sample"]

    def preview(step: int, pipe) -> None:
        # the evaluation's own sampler (scheduler, steps, guidance, size): the last preview
        # is the picture the evaluation of the saved output draws for this prompt and seed
        images = generator_for(pipe, p)(prompts, s["seeds"])
        folder = rd / "samples" / f"step_{step:06d}"
        for k, im in enumerate(images):
            pi, si = divmod(k, len(s["seeds"]))
            atomic_write_bytes(folder / f"p{pi}_s{s['seeds'][si]}.png", sample.png_bytes(im))
        atomic_write_json(folder / "index.json", {"step": step, "prompts": prompts, "seeds": s["seeds"]})
        n = len(s["seeds"])
        row: dict | None = None
        if subject is not None:
            row = {"step": step, "subject_fidelity": metrics.signature_rate(images[:n], subject),
                   "signature_score": metrics.mean_signature(images[:n], subject),
                   "pres": metrics.signature_rate(images[-n:], subject) if len(prompts) > 2 else None,
                   "div_subject": metrics.diversity(images[:n])}
        elif style is not None:  # first prompt asks for the style, the last (if any) does not
            row = {"step": step, "style_rate": metrics.style_rate(images[:n], style),
                   "style_drift": metrics.style_rate(images[-n:], style) if len(prompts) > 1 else None}
        if row is not None:
            row["n"] = n  # the images each rate is over: the plot's Wilson band (4 seeds: wide)
            with open(rd / "steps_curve.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    return preview


def run_training(exp: config.Experiment, rd: Path, *, progress: bool = True) -> Path:
    """Train (or reuse a finished run with the same params hash, in this folder or, with
    train.reuse_identical, another experiment's: dbkit.reuse; resume an interrupted one),
    holding the run folder's lock: a second trainer of the same run (another `dbkit run`, the
    notebook in JupyterLab) is refused, naming this one. DDP's other processes train inside
    the lock their main process holds."""
    if not _is_main_process():
        return _run_training(exp, rd, progress=progress)
    with runs.lock_run(rd):
        return _run_training(exp, rd, progress=progress)


def _run_training(exp: config.Experiment, rd: Path, *, progress: bool = True) -> Path:
    from . import train

    done = read_json(rd / "train_done.json")
    if done and done.get("hash") == exp.hash and (rd / "output").exists():
        return rd / "output"
    if _may_reuse(exp) and (src := reuse.reuse_training(rd, exp.hash)) is not None:
        print(f"training reused from {src}: a finished run of the same params hash (train.reuse_identical)")
        return rd / "output"
    p = exp.params
    info = read_json(rd / "data.json")
    if info is None:
        raise FileNotFoundError(f"{rd}/data.json is missing: run notebooks/01_data.ipynb first")
    records = read_jsonl(rd / "captions.jsonl")
    path, family = base_of(p)
    if not (rd / "checkpoints").exists():
        (rd / "steps_curve.jsonl").unlink(missing_ok=True)
    # metrics are read back rather than redrawn (current_metrics): any left here (a copy
    # interrupted before its train_done.json) would describe another model than this training's
    (rd / "metrics.json").unlink(missing_ok=True)
    record_training_provenance(exp, rd)
    t0 = time.time()
    out = train.train(p, rd, records, base_path=path, family=family,
                      class_dir=Path(info["class_dir"]) if info["class_dir"] else None, progress=progress,
                      preview=preview_writer(rd, p, subject_of(p), style_of(p)))
    runs.record_timing(rd, "train", time.time() - t0)
    atomic_write_json(rd / "train_done.json", {"hash": exp.hash, "seconds": round(time.time() - t0, 1)})
    if _is_main_process():
        runs.update_provenance(rd, "train", finished=runs.utc_now())
    return out


def _may_reuse(exp: config.Experiment) -> bool:
    # under DDP every process decides alone; one copying while the others train would hang them
    return exp.params["train"]["reuse_identical"] and os.environ.get("WORLD_SIZE", "1") == "1"


def record_training_provenance(exp: config.Experiment, rd: Path) -> None:
    """The "train" stage's provenance, written when training starts (never when a finished
    run is reused). A resumed run was trained by more than one session: the record names the
    checkpoint it resumed from and keeps the earlier sessions' records."""
    if not _is_main_process():
        return  # one record per run, not one per DDP process
    ckpts = intact_checkpoints(rd / "checkpoints")  # a damaged newest one is passed over by the resume
    earlier = runs.read_provenance(rd)["stages"].get("train") if ckpts else None
    history = (earlier.pop("earlier", []) + [earlier]) if earlier else []
    runs.write_provenance(rd, exp, "train", resumed_from=ckpts[-1].name if ckpts else None, earlier=history)


def _is_main_process() -> bool:
    # torchrun/accelerate launch set RANK; a plain process is the main one
    return os.environ.get("RANK", "0") == "0"


def trained_pipeline(exp: config.Experiment, rd: Path):
    path, family = base_of(exp.params)
    return methods.load_trained(rd / "output", path, family, lora_scale=exp.params["sample"]["lora_scale"])


def generator_for(pipe, p: dict):
    s = p["sample"]
    sample.set_scheduler(pipe, s["scheduler"])

    def gen(prompts: list[str], seeds: list[int]):
        return sample.generate(pipe, prompts, seeds, steps=s["steps"], guidance=s["guidance"],
                               negative_prompt=s["negative_prompt"], size=p["base"]["resolution"])

    return gen


def evaluation_seeds(p: dict) -> list[int]:
    """The seeds of every evaluation image: metrics.seed … metrics.seed + num_per_prompt − 1."""
    m = p["metrics"]
    return list(range(m["seed"], m["seed"] + m["num_per_prompt"]))


def _evaluate(p: dict, pipe) -> dict | None:
    """Metrics of one model with the configured backend: the toy oracle (exact, toy subjects
    only) or CLIP/DINO/LPIPS-ViT from local paths (any subject: compared to its real photos)."""
    q = cap.effective_params(p)
    seeds = evaluation_seeds(p)
    phrase, noun = cap.subject_phrase(q), p["captions"]["class_noun"]
    if p["metrics"]["backend"] == "clip":
        from . import metric_backends

        folder = data.resolve_folder(p["data"]["instance_images"])
        # the photos training used (bad ones skipped as the data step did), one at a time at a
        # bounded size: the CLIP/DINO backends resize to 224 px anyway
        kept = data.scan(folder, max_images=p["data"]["max_images"], on_bad=p["data"]["on_bad_image"]).manifest
        real = [data.open_rgb(Path(m["file"]), max_side=512) for m in kept]
        result = metric_backends.evaluate_real(generator_for(pipe, p), p, real, phrase, noun, seeds=seeds)
        return metric_backends.flatten(result) | {"paper_sd": result.get("paper_sd")}
    if (style := style_of(p)) is not None:
        return metrics.evaluate_style(generator_for(pipe, p), style, phrase, seeds=seeds)
    subject = subject_of(p)
    if subject is None:
        return None  # user photos need metrics.backend: clip (see docs/real-models.md)
    return metrics.evaluate(generator_for(pipe, p), subject, phrase, noun, seeds=seeds)


def evaluate_model(p: dict, pipe) -> dict | None:
    """The metrics of metrics.json for any loaded pipeline (a checkpoint's, say) with params `p`;
    None where there is no backend for the subject (user photos with the oracle)."""
    if not has_oracle_metrics(p):  # a toy style is measured too (it was refused as "user photos")
        return None
    return _evaluate(p, pipe)


def evaluate_run(exp: config.Experiment, rd: Path, pipe=None) -> dict | None:
    """Metrics of the trained model → metrics.json."""
    if not has_oracle_metrics(exp.params):
        return None
    result = _evaluate(exp.params, pipe or trained_pipeline(exp, rd))
    atomic_write_json(rd / "metrics.json", result)
    runs.write_provenance(rd, exp, "metrics")
    return result


def current_metrics(exp: config.Experiment, rd: Path) -> dict | None:
    """The run's metrics.json, else evaluate now: metrics.* and sample.* are in the params hash,
    so a metrics.json in this folder (written after its training, or copied with a reused one)
    is this model's; evaluating again would redraw the same images."""
    return read_json(rd / "metrics.json") or evaluate_run(exp, rd)


def evaluate_base(p: dict) -> dict | None:
    """The same metrics for the untouched base (cached: it depends only on base + prompts)."""
    if not has_oracle_metrics(p):
        return None
    path, family = base_of(p)
    # the clip backend compares with the real photos: new photos in the same folder, new metrics
    key = {"base": str(path), "fingerprint": models.fingerprint(str(path)),
           "instance": p["data"]["instance_images"], "data": data.data_fingerprint(p),
           "captions": cap.effective_params(p)["captions"],
           "sample": p["sample"], "metrics": p["metrics"], "res": p["base"]["resolution"], "v": 2,
           **cpu_threads.cache_fields(p)}
    cached = runs.cache_path("base_metrics", key) / "metrics.json"
    if (hit := read_json(cached)) is not None:
        return hit
    runs.writable_cache_dir(cached.parent)
    result = _evaluate(p, models.load_pipeline(path, family))
    atomic_write_json(cached, result)
    return result


# --------------------------------------------------------------------------- 04 ablations


def variants(exp: config.Experiment) -> list[tuple[str, config.Experiment]]:
    """One experiment per value of each `ablation.vary` key, then one per named
    `ablation.variants` entry (validated like any params)."""
    out = []
    for key, values in exp.params["ablation"]["vary"].items():
        for v in values:
            vname = config.variant_name(exp.name, f"{key.split('.')[-1]}-{v}")
            out.append((f"{key}={v}", exp.with_overrides({key: v}, name=vname)))
    for name, overrides in exp.params["ablation"]["variants"].items():
        out.append((name, exp.with_overrides(overrides, name=config.variant_name(exp.name, name))))
    return out


def train_variant(vexp: config.Experiment, *, progress: bool = True) -> tuple[Path, dict | None]:
    """Data, captions, training and metrics of one variant (or another params file's run), in
    its own folder, with its own thread count."""
    vrd = runs.run_dir(vexp)
    # the lock covers the variant's whole run, data included, not only its training
    with runs.lock_run(vrd), cpu_threads.applied(vexp.params):
        return _train_variant(vexp, vrd, progress=progress)


def train_variants(named: list[tuple[str, config.Experiment]], workers: int, *,
                   progress: bool = True) -> list[tuple[Path, dict | None]]:
    """:func:`train_variant` of each, in order; with ``workers`` > 1, that many at once in
    worker processes (results in the same order). Variants that name the same run folder are
    trained once. A finished variant is found by its hash, so what a stopped parallel run
    finished is not trained again."""
    exps = [vexp for _, vexp in named]
    if workers <= 1 or len(exps) <= 1:
        return [train_variant(vexp, progress=progress) for vexp in exps]
    check_parallel_threads(exps, workers)
    folders = [runs.run_dir(vexp) for vexp in exps]
    first = [k for k, f in enumerate(folders) if folders.index(f) == k]
    done = parallel.map_in_workers(train_variant_quietly, [exps[k] for k in first], workers,
                                   names=[str(folders[k]) for k in first])
    by_folder = {folders[k]: result for k, result in zip(first, done)}
    return [by_folder[f] for f in folders]


def train_variant_quietly(vexp: config.Experiment) -> tuple[Path, dict | None]:
    """A worker's call: progress bars of processes side by side would interleave."""
    return train_variant(vexp, progress=False)


def check_parallel_threads(exps: list[config.Experiment], workers: int) -> None:
    """Refuse trainings side by side on a CPU that would together want more threads than it
    has cores: trainings that each spin a thread on every core run at about half the speed
    of one (dbkit bench threads). Checked when a run opens (before any stage works) and again
    before the variants start."""
    import torch

    side = min(workers, len(exps))
    if side <= 1 or torch.cuda.is_available():
        return
    cores = cpu_threads.cores()
    crowded = [f"{e.name} ({cpu_threads.count(e.params)})" for e in exps if cpu_threads.count(e.params) * side > cores]
    if not crowded:
        return
    fix = (f"set threads: {cores // side} (top level)" if side <= cores
           else f"set ablation.workers to at most {cores}, and threads: 1")
    raise config.ConfigError(
        f"ablation.workers {workers}: {side} trainings side by side on {cores} CPU cores, but these variants "
        f"would use more threads than that (threads each): {', '.join(crowded)}; {fix}. Trainings that "
        "each spin a thread on every core run at about half the speed of one (dbkit bench threads)")


def _train_variant(vexp: config.Experiment, vrd: Path, *, progress: bool) -> tuple[Path, dict | None]:
    runs.write_provenance(vrd, vexp, "data")
    prepare_data(vexp, vrd)
    runs.write_provenance(vrd, vexp, "captions")
    prepare_captions(vexp, vrd)
    run_training(vexp, vrd, progress=progress)
    return vrd, current_metrics(vexp, vrd)


def run_ablations(exp: config.Experiment, rd: Path, *, progress: bool = True) -> dict:
    """Train every variant, then draw the same prompts × seeds for the base, the main run
    and each variant: one grid per prompt (row = model, column = seed), plus metrics."""
    from . import report
    p = exp.params
    rows: list[dict] = [{"label": "base", "run_dir": None, "metrics": evaluate_base(p)}]
    main_metrics = current_metrics(exp, rd)
    rows.append({"label": f"{exp.name} (this run)", "run_dir": str(rd), "metrics": main_metrics})
    named = variants(exp)
    for (label, vexp), (vrd, m) in zip(named, train_variants(named, p["ablation"]["workers"], progress=progress)):
        rows.append({"label": label, "run_dir": str(vrd), "metrics": m, "hash": vexp.hash})
    s = p["sample"]
    path, family = base_of(p)
    pipes = [models.load_pipeline(path, family)] + [
        methods.load_trained(Path(r["run_dir"]) / "output", path, family, lora_scale=s["lora_scale"])
        for r in rows[1:]]
    q = cap.effective_params(p)
    prompts = [cap.expand(t, q) for t in s["prompts"]]
    grids = []
    per_model = [generator_for(pipe, p)(prompts, s["seeds"]) for pipe in pipes]
    for k, prompt in enumerate(prompts):
        n = len(s["seeds"])
        grid = report.image_grid([(r["label"], imgs[k * n:(k + 1) * n]) for r, imgs in zip(rows, per_model)],
                                 [f"seed {x}" for x in s["seeds"]], title=prompt, scale=2)
        name = f"grid_p{k}.png"
        atomic_write_bytes(rd / "ablation" / name, sample.png_bytes(grid))
        grids.append({"prompt": prompt, "file": f"ablation/{name}"})
    # the run folder is shared by every report version of this run hash: the table names its version
    result = {"vary": p["ablation"]["vary"], "variants": p["ablation"]["variants"], "rows": rows, "grids": grids,
              "version": exp.version}
    atomic_write_json(rd / "ablation.json", result)
    return result


# --------------------------------------------------------------------------- 05 report


def key_metrics(rows: list[dict]) -> dict:
    """The numbers the experiment index shows: the best trained row's metrics."""
    trained = [r for r in rows[1:] if r.get("metrics")]
    if not trained:
        return {}
    rank = metric_registry.rank_metric(trained[0]["metrics"])
    best = max(trained, key=lambda r: r["metrics"].get(rank) or 0.0)
    keys = [k for k, v in best["metrics"].items() if isinstance(v, int | float) and k != "n_images"]
    out: dict = {k: round(best["metrics"][k], 3) for k in keys}
    base = rows[0].get("metrics") or {}
    if base.get(rank) is not None:
        out[f"base_{rank}"] = round(base[rank], 3)
    out["best"] = best["label"]
    return out


def data_fingerprint_of(exp: config.Experiment, rd: Path) -> str | None:
    """The data fingerprint the model was trained on (training's provenance), else today's
    (it is part of the params hash, so both agree for a run folder named by that hash)."""
    trained = runs.read_provenance(rd)["stages"].get("train") or {}
    return trained.get("data_fingerprint") or data.data_fingerprint(exp.params)


def _with_params(row: dict) -> dict:
    """A table row with its run's params, so the all-runs table can still diff them when
    only the report is kept (reports are committed, run folders are not)."""
    params = runs.read_params(Path(row["run_dir"])) if row.get("run_dir") else None
    return row | {"params": params} if params is not None else row


class AblationMismatch(ValueError):
    """The run folder's ablation.json was made for another report version of the same run."""


def summarise(exp: config.Experiment, rd: Path) -> dict:
    """Everything the report shows, gathered from the run folder's files."""
    from . import conclusions

    ab = read_json(rd / "ablation.json") or {"rows": [], "grids": [], "vary": {}}
    if ab.get("version") not in (None, exp.version):
        raise AblationMismatch(
            f"{rd / 'ablation.json'} holds the table of another version of this experiment ({ab['version'][:12]}, "
            f"these params make {exp.version[:12]}: ablation or merge changed): run notebooks/04_ablations.ipynb "
            "first with the same params (`dbkit run <params> --only 04_ablations 05_report`)")
    parent = exp.parent_params()
    diff = {k: v for k, v in (config.diff(parent, exp.params) if parent else {}).items()
            if not k.startswith(("notes", "experiment"))}
    ignore = conclusions.params_figures(ab["vary"], ab.get("variants", {}), diff)
    return {
        "experiment": exp.name,
        "params_file": str(exp.path),
        "hash": exp.hash,
        "version": exp.version,  # the report version: run hash + ablation, merge, report
        "notes": exp.params["notes"],
        "vary": ab["vary"],
        "variants": ab.get("variants", {}),
        "diff": diff,
        "rows": [_with_params(r) for r in ab["rows"]],
        # the written conclusion against this run's table (notes are outside the params hash)
        "conclusion_check": conclusions.check(exp.params["notes"].get("conclusion", ""), ab["rows"], ignore),
        "grids": ab["grids"],
        "metrics": key_metrics(ab["rows"]),
        "rank_by": ("dino" if exp.params["metrics"]["backend"] == "clip"
                    else "style_rate" if style_of(exp.params) else "subject_fidelity"),
        "provenance": runs.read_provenance(rd),
        "data_fingerprint": data_fingerprint_of(exp, rd),
        "timings": read_json(rd / "timings.json"),
        "data": read_json(rd / "data.json"),
        "run_dir": str(rd),
    }


# --------------------------------------------------------------------------- pictures for the notebooks


def instance_images(rd: Path) -> tuple[list, list[str]]:
    """Thumbnails (≤ data.THUMB px) of the manifest's photos and their names: the page shows
    no more, and a dozen 12-MP photos would otherwise sit in memory at full size together."""
    manifest = read_jsonl(rd / "manifest.jsonl")
    return ([data.open_rgb(Path(m["file"]), max_side=data.THUMB) for m in manifest],
            [Path(m["file"]).name for m in manifest])


def class_images(rd: Path, n: int = 8) -> list:
    """Thumbnails of the first `n` class images (see :func:`instance_images`)."""
    info = read_json(rd / "data.json") or {}
    if not info.get("class_dir"):
        return []
    return [data.open_rgb(f, max_side=data.THUMB) for f in data.list_images(Path(info["class_dir"]))[:n]]


def data_markdown(info: dict) -> str:
    """data.json for the 01_data page: the counts as a table, then every warning, skipped
    bad image and image dropped for a small subject, one line each."""
    from . import report

    counts = {k: v for k, v in info.items() if not isinstance(v, list)}
    parts = [report.markdown_table([counts])]
    if info.get("warnings"):
        parts.append("**Warnings**\n\n" + "\n".join(f"- {_md_text(w)}" for w in info["warnings"]))
    if info.get("skipped_bad_images"):
        parts.append("**Skipped bad images** (`data.on_bad_image: skip`)\n\n" + "\n".join(
            f"- `{Path(b['file']).name}`: {_md_text(b['reason'])}" for b in info["skipped_bad_images"]))
    if info.get("dropped_small_subject"):
        parts.append("**Dropped: subject smaller than `data.min_subject_area`**\n\n" + "\n".join(
            f"- `{Path(f).name}`" for f in info["dropped_small_subject"]))
    if info.get("detections"):
        parts.append("**Detections** (`data.detector`; face ratio = largest face box / frame, against "
                     "`data.min_face_ratio`; crop per `data.crop_to`)\n\n" + "\n".join(
                         f"- {_md_text(framing.caption(r))}" for r in info["detections"]))
    return "\n\n".join(parts)


def detection_grid(rd: Path, per_row: int = 6) -> list | None:
    """Every instance photo with its detected boxes and crop drawn, captioned kept/dropped and
    why (None when data.detector is none)."""
    from . import report

    recs = (read_json(rd / "data.json") or {}).get("detections") or []
    if not recs:
        return None
    rows = [recs[k : k + per_row] for k in range(0, len(recs), per_row)]
    return [report.image_grid([("", [framing.draw(Path(r["file"]), r) for r in row])],
                              [framing.caption(r) for r in row], scale=1) for row in rows]


def _md_text(text: str) -> str:
    # file names hold _ and * (IMG_0001.png): escaped, they print as written, not as emphasis
    return re.sub(r"([\\`*_\[\]<>#|])", r"\\\1", text)


def preview_steps(rd: Path) -> list[Path]:
    return sorted((rd / "samples").glob("step_*")) if (rd / "samples").exists() else []


def preview_grid(rd: Path, prompt_index: int = 0):
    """Samples during training: one row per saved step, one column per seed."""
    from . import report

    steps = preview_steps(rd)
    if not steps:
        return None
    idx = read_json(steps[0] / "index.json")
    rows = [(f"step {int(d.name.split('_')[1])}",
             [data.open_rgb(d / f"p{prompt_index}_s{s}.png", max_side=data.THUMB) for s in idx["seeds"]])
            for d in steps]
    return report.image_grid(rows, [f"seed {s}" for s in idx["seeds"]], title=idx["prompts"][prompt_index])

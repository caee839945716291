"""`dbkit bench trainer`: dbkit's trainer against diffusers' examples/dreambooth/train_dreambooth_lora.py
at equal work: the same base, photos, resolution, batch, LoRA rank and targets (the script's
to_k/to_q/to_v/to_out.0, UNet only), steps, fp32, no prior, validation or checkpoints.

Each tool runs as its own process; steps/s comes from its own per-step timestamps (dbkit's
train_log.jsonl `elapsed_s`; the script's tqdm bar, printed every step with the elapsed
seconds through tqdm's TQDM_* environment defaults), over the steps after `skip` (warm-up
and loading excluded). The script is not shipped: the user fetches it (see SCRIPT_HELP).
The script iterates a folder without looking at suffixes and drops no last partial batch,
so it gets a folder of image links, each photo repeated to a multiple of the batch size.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT_HELP = """diffusers' DreamBooth LoRA script is not part of dbkit; fetch the one matching the installed
diffusers (v{version}) and pass its path:

  curl -LO https://raw.githubusercontent.com/huggingface/diffusers/v{version}/examples/dreambooth/train_dreambooth_lora.py
  dbkit bench trainer --diffusers-script train_dreambooth_lora.py

It imports torchvision (transforms); without a torchvision build, give --torchvision-shim a folder
holding a `torchvision` package that provides Compose, Resize, RandomCrop, ToTensor, Normalize."""

TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the script's UNet targets (add_k/v_proj: none in SD UNets)
BAR_FORMAT = "{desc} {n}/{total} elapsed_s={elapsed_s:.4f}"  # the script's bar, via TQDM_BAR_FORMAT
_TQDM_LINE = re.compile(r"^Steps (\d+)/\d+ elapsed_s=([0-9.]+)", re.M)


def script_help() -> str:
    import diffusers

    return SCRIPT_HELP.format(version=diffusers.__version__)


def tqdm_points(text: str) -> list[tuple[int, float]]:
    """(step, elapsed seconds) from the script's bar, first time each step is printed."""
    seen: dict[int, float] = {}
    for m in _TQDM_LINE.finditer(text.replace("\r", "\n")):
        seen.setdefault(int(m.group(1)), float(m.group(2)))
    return sorted(seen.items())


def log_points(path: Path) -> list[tuple[int, float]]:
    """(step, elapsed_s) from dbkit's train_log.jsonl."""
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["step"], r["elapsed_s"]) for r in recs]


def steady_rate(points: list[tuple[int, float]], skip: int) -> float:
    """Steps per second between step `skip` and the last step."""
    start = dict(points)[skip]
    last, end = points[-1]
    return (last - skip) / (end - start)


def instance_folder(photos: Path, out: Path, batch: int) -> Path:
    """Links to the photos, repeated so that the script's every batch is full."""
    files = sorted(p for p in photos.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    out.mkdir(parents=True, exist_ok=True)
    reps = batch // math.gcd(len(files), batch)
    for r in range(reps):
        for f in files:
            (out / f"r{r}_{f.name}").symlink_to(f.resolve())
    return out


def dbkit_command(photos: Path, steps: int, batch: int, rank: int, res: int, noun: str = "heart") -> list[str]:
    params = Path(__file__).resolve().parent.parent / "params" / "base.yaml"
    ov = ["experiment=bench-trainer", f"data.instance_images={photos.resolve()}", f"captions.class_noun={noun}",
          "prior.enabled=false", "train.text_encoder=false", f"train.lora.unet_targets=[{','.join(TARGETS)}]",
          f"train.steps={steps}", f"train.batch_size={batch}", f"train.lora.rank={rank}", f"data.resolution={res}",
          "train.sample_every=0", "train.save_every=0", "train.mixed_precision=no", "train.cache_latents=true"]
    return [sys.executable, "-m", "dbkit.cli", "train", str(params)] + [x for o in ov for x in ("-p", o)]


def dbkit_env(root: Path) -> dict[str, str]:
    """The environment of a `dbkit train` subprocess in its own project root, importing this dbkit."""
    env = dict(os.environ, DBKIT_ROOT=str(root))
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
    return env


def script_command(script: Path, base: Path, folder: Path, out: Path, steps: int, batch: int, rank: int,
                   res: int, lr: float, noun: str = "heart") -> list[str]:
    """The script's own defaults otherwise: the instance prompt is dbkit's fixed caption."""
    return [sys.executable, str(script), f"--pretrained_model_name_or_path={base}", f"--instance_data_dir={folder}",
            f"--instance_prompt=a sks {noun}", f"--output_dir={out}", f"--resolution={res}",
            f"--train_batch_size={batch}", f"--rank={rank}", f"--max_train_steps={steps}",
            f"--checkpointing_steps={10 * steps}", f"--learning_rate={lr}", "--seed=0", "--mixed_precision=no"]


class BenchError(RuntimeError):
    """A trainer failed; the message names its log."""


def _timed(cmd: list[str], env: dict, log: Path) -> float:
    t0 = time.time()
    with open(log, "w") as f:
        if subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode:
            raise BenchError(f"{cmd[1] if cmd[1] != '-m' else 'dbkit train'} failed: see {log}")
    return time.time() - t0


def run_dbkit(work: Path, photos: Path, steps: int, batch: int, rank: int, res: int, skip: int,
              noun: str) -> tuple[float, float]:
    """(steady steps/s, wall seconds) of `dbkit train` in a fresh project root (nothing reused)."""
    (work / "root").mkdir()
    env = dbkit_env(work / "root")
    wall = _timed(dbkit_command(photos, steps, batch, rank, res, noun), env, work / "dbkit.log")
    return steady_rate(log_points(next((work / "root" / "runs").rglob("train_log.jsonl"))), skip), wall


def run_script(work: Path, script: Path, shim: Path | None, photos: Path, steps: int, batch: int, rank: int,
               res: int, skip: int, lr: float, noun: str) -> tuple[float, float]:
    """(steady steps/s, wall seconds) of diffusers' script, its bar printing every step."""
    from .models import resolve

    env = dict(os.environ, TQDM_MININTERVAL="0", TQDM_MINITERS="1",
               TQDM_BAR_FORMAT=BAR_FORMAT)
    if shim:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(shim).resolve()), env.get("PYTHONPATH", "")])
    folder = instance_folder(photos, work / "instance", batch)
    cmd = script_command(Path(script).resolve(), resolve("toyworld"), folder, work / "script_out", steps, batch,
                         rank, res, lr, noun)
    wall = _timed(cmd, env, work / "script.log")
    return steady_rate(tqdm_points((work / "script.log").read_text(errors="replace")), skip), wall


def bench_trainer(script: Path, shim: Path | None = None, *, subject: str = "eyed_heart", steps: int = 200,
                  batch: int = 4, rank: int = 8, res: int = 64, skip: int = 20, lr: float = 2e-3,
                  repeats: int = 1) -> dict:
    """Both trainers `repeats` times, in turn (dbkit, script, dbkit, …), at equal work: steps/s
    (steady state), wall seconds and the ratio of each pair, and their medians. Pairing keeps
    each ratio meaningful when the machine's speed drifts (on a shared 2-core machine single
    runs have differed by a quarter). A failed trainer's log is kept (the error names it)."""
    from . import data
    from .toyworld import subjects

    noun = subjects.get(subject).class_noun
    photos = data.resolve_folder(f"toyworld:{subject}")
    pairs = []
    for _ in range(repeats):
        work = Path(tempfile.mkdtemp(prefix="dbkit-bench-trainer-"))
        d_rate, d_wall = run_dbkit(work, photos, steps, batch, rank, res, skip, noun)
        s_rate, s_wall = run_script(work, script, shim, photos, steps, batch, rank, res, skip, lr, noun)
        shutil.rmtree(work, ignore_errors=True)
        pairs.append({"dbkit_steps_per_s": round(d_rate, 2), "diffusers_steps_per_s": round(s_rate, 2),
                      "ratio": round(d_rate / s_rate, 2), "dbkit_wall_s": round(d_wall, 1),
                      "diffusers_wall_s": round(s_wall, 1)})
    return {"steps": steps, "batch": batch, "rank": rank, "resolution": res, "steady_from_step": skip,
            **summarise_pairs(pairs), "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset")}


def summarise_pairs(pairs: list[dict]) -> dict:
    """One pair: its figures. Several: the median of each figure (the ratio's median is taken
    over the pairs' ratios, not the ratio of medians), with every pair listed."""
    if len(pairs) == 1:
        return dict(pairs[0])
    med = {k: round(statistics.median(p[k] for p in pairs), 2) for k in pairs[0]}
    return {f"median_{k}": v for k, v in med.items()} | {"pairs": pairs}

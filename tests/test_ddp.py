"""Several processes (DDP over gloo, on CPU) for every combination of trained parts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from dbkit import captions, config, data, export, models

ROOT = Path(__file__).resolve().parent.parent

UNET, TE, TE2 = "unet", "text_encoder", "text_encoder_2"
# name: (family, the parts that train, overrides). DDP refuses a module without a trainable
# parameter, so each part also trains alone: the frozen one must stay out of `accel.prepare`.
COMBOS = {
    "lora-unet": ("sd15", {UNET}, ["train.text_encoder=false"]),
    "lora-te": ("sd15", {TE}, ["train.unet=false"]),
    "lora-both-accum": ("sd15", {UNET, TE}, ["train.grad_accum=2"]),  # no_sync on micro-batch 1, sync on 2
    "full-unet": ("sd15", {UNET}, ["train.method=full", "train.text_encoder=false"]),
    # SDXL conditions on text_encoder's penultimate layer: its last layer gets no gradient
    "xl-lora-te": ("sdxl", {TE, TE2}, ["train.unet=false", "data.resolution=32", "base.resolution=32"]),
}


def _job(name: str, base: Path, family: str, extra: list[str], root: Path) -> dict:
    p = config.load(ROOT / "params" / "base.yaml", [
        f"base.model={base}", "train.steps=2", "train.batch_size=1", "train.save_every=0", "train.sample_every=0",
        "prior.enabled=false", "experiment=ddp", *extra]).params
    recs = captions.build_captions(data.build_manifest(data.resolve_folder(p["data"]["instance_images"])), p)
    return {"params": p, "run_dir": str(root / name), "records": recs, "base": str(base), "family": family,
            "weights": str(root / f"{name}-rank%d.pt")}


def _moved(state: dict[str, torch.Tensor], base: Path) -> bool:
    """Training changed something: a LoRA up-projection left zero, or a full weight left the base's."""
    if any("lora_B" in k for k in state):
        return any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)
    from diffusers import UNet2DConditionModel

    ref = UNet2DConditionModel.from_pretrained(base / "unet").state_dict()
    return any(not torch.equal(v, ref[k.removeprefix("unet.")]) for k, v in state.items())


def test_two_processes_train_every_combination_of_parts(in_tmp, tiny_base):
    bases = {"sd15": tiny_base, "sdxl": models.build_random("sdxl", in_tmp / "xl")}
    jobs = [_job(name, bases[fam], fam, extra, in_tmp / "runs") for name, (fam, _, extra) in COMBOS.items()]
    (in_tmp / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "tests" / "ddp_worker.py"), str(in_tmp / "jobs.json")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    for job, (name, (fam, parts, _)) in zip(jobs, COMBOS.items()):
        out = Path(job["run_dir"]) / "output"
        assert (out / ("pipeline" if name.startswith("full") else export.LORA_FILE)).exists(), name
        steps = [json.loads(x)["step"] for x in (Path(job["run_dir"]) / "train_log.jsonl").read_text().splitlines()]
        assert steps == [1, 2], name
        a, b = (torch.load(job["weights"] % k) for k in (0, 1))
        assert {k.split(".")[0] for k in a} == parts, name
        # the ranks saw different images; equal weights mean their gradients were averaged
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert _moved(a, bases[fam]), name

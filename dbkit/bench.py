"""Benchmarks (`dbkit bench …`): the toy world's acceptance figures, measured, never assumed.

- `base`: the shipped base prompted with held-out captions (combinations never seen in
  pretraining): share of images whose oracle-read background / shape / colour / pattern /
  position match the prompt; and, per subject, the signature rate of class-noun and
  description prompts (the subject must be new to the base).
- `load`: seconds to load the shipped pipeline and draw a first batch.
- `dreambooth`: a plain LoRA DreamBooth run on one subject; signature rate after training
  and wall time.
Each prints JSON (and returns it) so figures can be pasted into notes with their command.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def held_out_prompts(n: int, seed: int = 0) -> list[tuple[str, object]]:
    from .toyworld import scenes

    stream = scenes.scenes(seed + 10_000, held_out=True)
    return [(scenes.caption_sentence(s), s) for s in (next(stream) for _ in range(n))]


def base_accuracy(pipe, n: int = 100, *, steps: int = 25, guidance: float = 4.0, seed: int = 0) -> dict:
    """Oracle-read attributes vs the prompt, over `n` held-out captions (one seed each)."""
    from .sample import generate
    from .toyworld import oracle

    prompts = held_out_prompts(n, seed)
    images = []
    for k, (text, _) in enumerate(prompts):
        images += generate(pipe, [text], [seed + k], steps=steps, guidance=guidance)
    hits: dict[str, list[bool]] = {k: [] for k in ("background", "shape", "colour", "pattern", "size", "position")}
    for (_, scene), im in zip(prompts, images):
        r = oracle.read(im)
        m = scene.main
        want = {"background": scene.background, "shape": m.shape, "colour": m.colour, "pattern": m.pattern,
                "size": m.size, "position": m.position}
        for key in hits:
            hits[key].append(getattr(r, key) == want[key])
    return {k: float(np.mean(v)) for k, v in hits.items()} | {"n": n, "steps": steps, "guidance": guidance}


def subject_novelty(pipe, n: int = 20, *, steps: int = 25, guidance: float = 4.0) -> dict:
    """Signature rate of the base for each subject's class noun and descriptions of it."""
    from .metrics import signature_rate
    from .sample import generate
    from .toyworld import subjects

    out = {}
    for sub in subjects.SUBJECTS.values():
        prompts = [f"a {sub.class_noun}", f"a sks {sub.class_noun}", f"a large {sub.class_noun} on a gray background"]
        prompts += [f"a {c} {p} {sub.class_noun}" for c in ("red", "blue") for p in ("striped", "dotted")]
        images = generate(pipe, prompts, list(range(n)), steps=steps, guidance=guidance)
        out[sub.name] = signature_rate(images, sub)
    return out


def vae_ceiling(vae, subject, n: int = 16) -> float:
    """Signature rate of the subject's own photos after a round trip through the base's VAE:
    the most any fine-tune of the UNet can reach on that subject (the decoder draws every image)."""
    import torch

    from .data import to_image, to_tensor
    from .metrics import signature_rate
    from .toyworld import subjects

    x = torch.stack([to_tensor(im) for im, _ in subjects.photos(subject, n)])
    with torch.no_grad():
        rec = vae.decode(vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean).sample
    return signature_rate([to_image(r) for r in rec], subject)


def bench_base(model: str = "toyworld", n: int = 100, *, card: bool = False) -> dict:
    """Accuracy on held-out captions and subject novelty; `card` also measures what the model
    card quotes besides (load time, parameter counts) and writes the card."""
    from .models import detect_family, load_pipeline, resolve

    path = resolve(model)
    pipe = load_pipeline(path, detect_family(path))
    t0 = time.time()
    acc = base_accuracy(pipe, n)
    novelty = subject_novelty(pipe)
    from .toyworld import subjects

    ceiling = {name: vae_ceiling(pipe.vae, sub) for name, sub in subjects.SUBJECTS.items()}
    result = {"accuracy": acc, "subject_signature_rate": novelty, "vae_ceiling": ceiling,
              "seconds": round(time.time() - t0, 1)}
    if card:
        from .toyworld.recipe import _n

        # in the result, so that the printed JSON (and its evidence record) holds every figure of the card
        result["load"] = bench_load(str(path))
        result["parameters_m"] = {part: float(_n(path, part)) for part in ("unet", "text_encoder")}
        write_card(str(path), result)
    return result


def write_card(model: str, result: dict, record: str | None = None, hardware: str | None = None) -> Path:
    """The model card (README.md in the model folder) from `bench_base(card=True)`'s result,
    naming its evidence record when there is one."""
    from .files import atomic_write_text
    from .models import resolve
    from .toyworld.recipe import model_card

    path = Path(resolve(model)) / "README.md"
    atomic_write_text(path, model_card(path.parent, result, result["load"], record=record, hardware=hardware))
    return path


def bench_load(model: str = "toyworld") -> dict:
    t0 = time.time()
    from .models import detect_family, load_pipeline, resolve
    from .sample import generate

    path = resolve(model)
    pipe = load_pipeline(path, detect_family(path))
    t1 = time.time()
    generate(pipe, ["a red star on a blue background"], [0, 1, 2, 3], steps=25, guidance=4.0)
    t2 = time.time()
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    return {"load_s": round(t1 - t0, 2), "sample_4_images_25_steps_s": round(t2 - t1, 2),
            "total_s": round(t2 - t0, 2), "weights_mb": round(size / 2**20, 2)}


def bench_dreambooth(subject: str = "eyed_heart", steps: int = 1500, overrides: list[str] | None = None,
                     plain_seeds: int = 50) -> dict:
    """LoRA DreamBooth on one subject through the real data/caption/train path (no notebooks)."""
    from . import config, workflow

    params = Path(__file__).resolve().parent.parent / "params" / "demo.yaml"
    ov = [f"data.instance_images=toyworld:{subject}", f"train.steps={steps}", "experiment=bench-dreambooth",
          "train.sample_every=0", "train.reuse_identical=false"] + list(overrides or [])  # train_s is timed
    from .toyworld import subjects

    ov.append(f"captions.class_noun={subjects.get(subject).class_noun}")
    exp = config.load(params, ov)
    workflow.cpu_threads.apply(exp.params)
    rd = workflow.runs.run_dir(exp)
    t0 = time.time()
    workflow.prepare_data(exp, rd)
    workflow.prepare_captions(exp, rd)
    t1 = time.time()
    workflow.run_training(exp, rd, progress=False)
    t2 = time.time()
    m = workflow.evaluate_run(exp, rd)
    # the figure: the signature rate of the bare "a sks <class>" prompt, on more seeds
    # than the metrics use (they spread theirs over context prompts too)
    from .metrics import signature_rate

    pipe = workflow.trained_pipeline(exp, rd)
    # named as training named it (pivotal tokens replace the identifier)
    phrase = f"a {workflow.cap.subject_phrase(workflow.cap.effective_params(exp.params))}"
    images = workflow.generator_for(pipe, exp.params)([phrase], list(range(plain_seeds)))
    return {"subject": subject, "steps": steps, "data_s": round(t1 - t0, 1), "train_s": round(t2 - t1, 1),
            "plain_prompt": phrase, "plain_signature_rate": signature_rate(images, subjects.get(subject)),
            "plain_seeds": plain_seeds, "vae_ceiling": vae_ceiling(pipe.vae, subjects.get(subject)),
            "metrics": m, "run_dir": str(rd)}

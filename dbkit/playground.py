"""Try your own prompts on a trained run: the final output or any checkpoint, any sampler settings.

The model is always loaded from the files training wrote, with the public loaders
(`methods.load_trained`: `from_pretrained`, `load_lora_weights`, `load_textual_inversion`),
exactly as the metrics load it; a checkpoint is first written out the same way
(`train.export_checkpoint`). So what the playground shows is what a user gets from the files.
`Playground.draw` is the whole logic (tests call it directly); `Playground.widget` only wires
ipywidgets to it. On the toy world each image gets the oracle's reading.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from PIL import Image

from . import captions as cap
from . import config, export, methods, sample, train, workflow

FINAL = "final output"
SCHEDULERS = tuple(sample.SCHEDULERS)


def sources(rd: Path) -> dict[str, Path]:
    """What can be sampled: the final output (when training finished) and every kept checkpoint."""
    found = {}
    if (rd / "output" / "training_metadata.json").exists():
        found[FINAL] = rd / "output"
    for ckpt in sorted((rd / "checkpoints").glob("checkpoint-*"), reverse=True):
        found[f"step {int(ckpt.name.split('-')[1])}"] = ckpt
    return found


class Playground:
    """One trained run; keeps the last loaded pipeline (loading costs more than a few samples)."""

    def __init__(self, exp: config.Experiment, rd: Path) -> None:
        self.exp, self.rd = exp, Path(rd)
        self.base_path, self.family = workflow.base_of(exp.params)
        self._loaded: tuple[str, Any, bool] | None = None  # (source, pipeline, has a LoRA)

    def pipeline(self, source: str, lora_scale: float):
        """The pipeline of `source` with its LoRA (if any) at `lora_scale`; loaded once per source,
        since a scale is only the adapter's weight."""
        if self._loaded is None or self._loaded[0] != source:
            found = sources(self.rd)
            if source not in found:
                raise ValueError(f"{self.rd}: no {source!r} to sample (have: {', '.join(found) or 'nothing'}): "
                                 "run notebooks/03_train.ipynb first")
            out = found[source]
            if source != FINAL:
                records = workflow.read_jsonl(self.rd / "captions.jsonl")
                out = train.export_checkpoint(out, self.exp.params, self.base_path, self.family, records)
            pipe = methods.load_trained(out, self.base_path, self.family, lora_scale=lora_scale)
            self._loaded = (source, pipe, (out / export.LORA_FILE).exists())
        _, pipe, has_lora = self._loaded
        if has_lora:  # the adapter name methods.load_trained gives
            pipe.set_adapters(["subject"], adapter_weights=[lora_scale])
        return pipe

    def draw(self, prompt: str, *, source: str = FINAL, negative_prompt: str = "", seeds: list[int] | None = None,
             steps: int | None = None, guidance: float | None = None, scheduler: str | None = None,
             lora_scale: float | None = None) -> tuple[list[Image.Image], list[dict]]:
        """Images for `prompt` (``{subject}`` and ``{class_noun}`` expand as in params), one per
        seed, plus the toy oracle's reading of each (empty dicts for other bases). Unset
        settings take the experiment's `sample.*` values."""
        s = self.exp.params["sample"]
        scheduler = scheduler or s["scheduler"]
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler {scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
        pipe = self.pipeline(source, s["lora_scale"] if lora_scale is None else float(lora_scale))
        sample.set_scheduler(pipe, scheduler)
        text = cap.expand(prompt, cap.effective_params(self.exp.params))
        images = sample.generate(pipe, [text], list(seeds if seeds is not None else s["seeds"]),
                                 steps=int(steps or s["steps"]), guidance=s["guidance"] if guidance is None
                                 else float(guidance), negative_prompt=negative_prompt,
                                 size=self.exp.params["base"]["resolution"])
        return images, [self.reading(img) for img in images]

    def reading(self, img: Image.Image) -> dict:
        subject = self.subject()
        if self.exp.params["base"]["model"] != "toyworld" and subject is None:
            return {}  # the oracle reads the toy world's renderings only
        from .toyworld import oracle

        found = oracle.read(img).as_dict()
        if subject is not None:
            found["subject signature"] = round(oracle.signature_score(img, subject), 2)
        return found

    def subject(self):
        return workflow.subject_of(self.exp.params)

    def widget(self, scale: int = 3):
        """The controls and an output area; each click of *Draw* calls :meth:`draw`."""
        import ipywidgets as w

        from . import report

        s = self.exp.params["sample"]
        found = list(sources(self.rd))
        c = {
            "source": w.Dropdown(options=found, value=found[0] if found else None, description="model"),
            "prompt": w.Text(value=s["prompts"][0], description="prompt", layout=w.Layout(width="90%")),
            "negative_prompt": w.Text(value=s["negative_prompt"], description="negative"),
            "seeds": w.Text(value=", ".join(map(str, s["seeds"])), description="seeds"),
            "steps": w.IntSlider(value=s["steps"], min=1, max=100, description="steps"),
            "guidance": w.FloatSlider(value=s["guidance"], min=0.0, max=15.0, step=0.5, description="guidance"),
            "scheduler": w.Dropdown(options=list(SCHEDULERS), value=s["scheduler"], description="scheduler"),
            "lora_scale": w.FloatSlider(value=s["lora_scale"], min=0.0, max=2.0, step=0.05, description="LoRA scale"),
        }
        button, img, info = w.Button(description="Draw", button_style="primary"), w.Image(format="png"), w.HTML()

        def on_draw(_: Any = None) -> None:
            # an Image and an HTML widget rather than an Output area: the static report can show
            # their saved state (runner._freeze_widgets), so the HTML page keeps the last drawing
            settings = {k: v.value for k, v in c.items() if k not in ("prompt", "seeds")}
            try:
                seeds = [int(x) for x in c["seeds"].value.replace(",", " ").split()]
                images, readings = self.draw(c["prompt"].value, seeds=seeds, **settings)
            except ValueError as e:  # bad seeds, no such checkpoint: say so where the user looks
                info.value = f"<b>cannot draw:</b> {html.escape(str(e))}"
                return
            grid = report.image_grid([(settings["source"], images)], [f"seed {x}" for x in seeds],
                                     title=c["prompt"].value, scale=scale)
            img.value = sample.png_bytes(grid)
            info.value = readings_html(seeds, readings)

        button.on_click(on_draw)
        self.on_draw = on_draw  # the notebook and the browser test press it without a mouse
        return w.VBox([c["source"], c["prompt"], c["negative_prompt"], w.HBox([c["seeds"], c["scheduler"]]),
                       w.HBox([c["steps"], c["guidance"], c["lora_scale"]]), button, img, info])


def readings_html(seeds: list[int], readings: list[dict]) -> str:
    """The oracle's readings as a small table ('' when there are none: a real base)."""
    if not any(readings):
        return ""
    keys = list(readings[0])
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ["seed", *keys])
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in [x, *(r.get(k) for k in keys)])
                   + "</tr>" for x, r in zip(seeds, readings))
    return f"<table><tr>{head}</tr>{rows}</table>"


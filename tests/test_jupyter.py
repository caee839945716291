"""The notebooks as JupyterLab runs them (kernel in notebooks/), and the playground.

A project is laid out in a temp folder the way a user has it (params/, notebooks/) and
papermill starts each kernel in its notebooks/ folder, which is what JupyterLab does. The
playground's images are compared with what plain diffusers code written here draws from the
exported files, and a checkpoint's with an independent run stopped at that step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dbkit import cpu_threads, paths, playground, runner, workflow

ROOT = Path(__file__).resolve().parent.parent
TINY = ("train: {steps: 4, batch_size: 2, save_every: 2, sample_every: 0, lr: 0.01, text_encoder_lr: 0.01}\n"
        "prior: {enabled: false}\nsample: {steps: 2, seeds: [0, 1]}\nmetrics: {num_per_prompt: 2}\n")


@pytest.fixture()
def project(tmp_path: Path, tiny_base: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's project: params/exp.yaml and a copy of dbkit's notebooks."""
    proj = tmp_path / "proj"
    (proj / "params").mkdir(parents=True)
    (proj / "params" / "exp.yaml").write_text(
        f"extends: {ROOT / 'params' / 'base.yaml'}\nexperiment: exp\nbase: {{model: {tiny_base}}}\n" + TINY)
    shutil.copytree(ROOT / "notebooks", proj / "notebooks")
    monkeypatch.setenv("DBKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(paths.ROOT_ENV, raising=False)
    return proj


def papermill(proj: Path, nb: str, params_path: str) -> subprocess.CompletedProcess:
    out = proj / "out" / f"{nb}.ipynb"
    out.parent.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "papermill", f"notebooks/{nb}.ipynb", str(out), "--cwd",
                           "notebooks", "-p", "params_path", params_path, "--no-progress-bar"],
                          cwd=proj, capture_output=True, text=True, env=env, timeout=300)


def test_find_params_walks_up_and_the_root_is_above_params(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(paths.ROOT_ENV, raising=False)
    (tmp_path / "params" / "notes").mkdir(parents=True)
    f = tmp_path / "params" / "notes" / "x.yaml"
    f.write_text("")
    (tmp_path / "notebooks").mkdir()
    for where, given in [("notebooks", "params/notes/x.yaml"), ("notebooks", "../params/notes/x.yaml"),
                         (".", "params/notes/x.yaml")]:
        monkeypatch.chdir(tmp_path / where)
        assert paths.find_params(given) == f
        assert paths.project_root(paths.find_params(given)) == tmp_path
    with pytest.raises(paths.ParamsNotFound, match="nope.yaml: params file not found"):
        paths.find_params("params/nope.yaml")
    monkeypatch.setenv(paths.ROOT_ENV, str(tmp_path / "elsewhere"))
    assert paths.project_root(f) == tmp_path / "elsewhere"


def test_notebooks_run_from_their_own_folder_and_name_the_missing_step(project: Path) -> None:
    r = papermill(project, "01_data", "params/exp.yaml")
    assert r.returncode == 0, r.stderr[-2000:]
    runs = list((project / "runs" / "exp").iterdir())  # in the project root, not in notebooks/
    assert len(runs) == 1 and (runs[0] / "manifest.jsonl").exists()
    assert not (project / "notebooks" / "runs").exists()
    r = papermill(project, "02_captions", "../params/exp.yaml")  # the same experiment, same run folder
    assert r.returncode == 0, r.stderr[-2000:]
    assert (runs[0] / "captions.jsonl").exists() and list((project / "runs" / "exp").iterdir()) == runs
    header = (project / "out" / "02_captions.ipynb").read_text()
    assert "params `params/exp.yaml`" in header and f"project root `{project}`" in header
    r = papermill(project, "04_ablations", "params/exp.yaml")  # 03 has not run
    assert r.returncode != 0
    assert f"MissingInput: runs/exp/{runs[0].name}/output is missing: run notebooks/03_train.ipynb first" in r.stderr
    assert "Traceback" not in (project / "out" / "04_ablations.ipynb").read_text()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_base: Path):
    """A 4-step run with a checkpoint at step 2, and an independent run of the same params that
    stops at step 2 (trained once for the module: training dominates these tests' time)."""
    tmp = tmp_path_factory.mktemp("playground")
    (tmp / "params").mkdir()
    (tmp / "params" / "base.yaml").symlink_to(ROOT / "params" / "base.yaml")
    (tmp / "params" / "exp.yaml").write_text(f"extends: base.yaml\nexperiment: pg\nbase: {{model: {tiny_base}}}\n"
                                             + TINY)
    runs = []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mp.setenv("DBKIT_CACHE", str(tmp / ".cache"))
        for extra in ([], ["train.steps=2", "experiment=pg2"]):
            exp, rd = workflow.open_experiment(str(tmp / "params" / "exp.yaml"), extra)
            workflow.prepare_data(exp, rd)
            workflow.prepare_captions(exp, rd)
            workflow.run_training(exp, rd, progress=False)
            runs.append((exp, tmp / rd))
    return runs, tmp


def plain_diffusers(base: Path, lora_dir: Path, prompt: str, seeds: list[int], scale: float):
    """What a user's own code draws from the exported LoRA: nothing from dbkit."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(lora_dir), weight_name="pytorch_lora_weights.safetensors")
    pipe.set_adapters(["default_0"], adapter_weights=[scale])
    pipe.set_progress_bar_config(disable=True)
    return [pipe(prompt, num_inference_steps=3, guidance_scale=2.5, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(s)).images[0] for s in seeds]


def test_playground_draws_what_the_exported_files_hold(trained, tiny_base: Path) -> None:
    import numpy as np

    exp, rd = trained[0][0]
    pg = playground.Playground(exp, rd)
    assert list(playground.sources(rd)) == ["final output", "step 2"]
    images, readings = pg.draw("a photo of {subject}", seeds=[3, 4], steps=3, guidance=2.5, scheduler="ddim",
                               lora_scale=0.7)
    assert [im.size for im in images] == [(64, 64), (64, 64)] and set(readings[0]) >= {"background", "shape"}
    ref = plain_diffusers(tiny_base, rd / "output", "a photo of sks star", [3, 4], 0.7)
    for im, r in zip(images, ref):
        assert np.abs(np.asarray(im, dtype=float) - np.round(r * 255)).max() <= 1
    # the same prompt at LoRA scale 0 is the base: the scale reaches the model
    base_imgs, _ = pg.draw("a photo of {subject}", seeds=[3], steps=3, guidance=2.5, lora_scale=0.0)
    assert not np.array_equal(np.asarray(base_imgs[0]), np.asarray(images[0]))


def test_playground_checkpoint_is_the_run_stopped_at_that_step(trained) -> None:
    import numpy as np

    (exp, rd), (exp2, rd2) = trained[0]
    pg = playground.Playground(exp, rd)
    at2, _ = pg.draw("a {subject}", source="step 2", seeds=[0], steps=3)
    assert (rd / "checkpoints" / "checkpoint-000002" / "output" / "pytorch_lora_weights.safetensors").exists()
    # the independent run stopped at step 2 (constant LR: its steps 1–2 are the long run's)
    ref, _ = playground.Playground(exp2, rd2).draw("a {subject}", seeds=[0], steps=3)
    final, _ = pg.draw("a {subject}", seeds=[0], steps=3)
    assert np.abs(np.asarray(at2[0], dtype=float) - np.asarray(ref[0], dtype=float)).max() <= 1
    assert not np.array_equal(np.asarray(final[0]), np.asarray(at2[0]))  # step 4 is another model


def test_playground_widget_callback_fills_the_image_and_says_what_is_wrong(trained) -> None:
    exp, rd = trained[0][0]
    pg = playground.Playground(exp, rd)
    box = pg.widget()
    controls = {type(c).__name__: c for c in box.children}
    image, info = controls["Image"], controls["HTML"]
    pg.on_draw()
    assert image.value[:8] == b"\x89PNG\r\n\x1a\n" and "<table>" in info.value
    seeds = box.children[3].children[0]
    seeds.value = "1, x"
    pg.on_draw()
    assert "cannot draw" in info.value


CHROMIUM = runner.find_chromium()


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (`make test` installs Debian's chromium)")
def test_jupyterlab_runs_03_train_and_the_playground_draws_a_typed_prompt(trained, tmp_path: Path) -> None:
    """JupyterLab as a user meets it: open notebooks/03_train.ipynb, Run All, type a prompt, Draw."""
    from lab_browser import Browser, kernel_env, lab

    root = trained[1]
    nb = json.loads((ROOT / "notebooks" / "03_train.ipynb").read_text())
    params_cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    params_cell["source"] = ['params_path = "params/exp.yaml"\n', "overrides = []\n", 'run_dir = ""']
    (root / "notebooks").mkdir(exist_ok=True)
    (root / "notebooks" / "03_train.ipynb").write_text(json.dumps(nb))
    env = {**kernel_env(), "DBKIT_CACHE": str(root / ".cache")}
    env.pop(paths.ROOT_ENV, None)
    # the run hash holds the CPU thread count (threads: 0 is torch's default, which OMP_NUM_THREADS
    # sets): the kernel must default to the count `trained` computed with, or it opens another run
    env["OMP_NUM_THREADS"] = str(cpu_threads.default())
    with lab(root, env, tmp_path / "lab.log") as served:
        url, token = served.split("|")
        browser = Browser(CHROMIUM)
        try:
            browser.open(f"{url}/lab/tree/notebooks/03_train.ipynb?token={token}&reset")
            # the notebook panel (headless, nothing has focus, so shell.currentWidget stays null)
            panel = ("(window.jupyterapp && Array.from(jupyterapp.shell.widgets('main'))"
                     ".find(x => x.sessionContext))")
            idle = (f"(() => {{const w = {panel}; const s = w && w.sessionContext.session;"
                    " return !!(s && s.kernel) && s.kernel.status === 'idle';})()")
            browser.wait_for(idle, 120, "the notebook's kernel")
            # not awaited: the command's promise settles only when every cell has run
            browser.js(f"(() => {{jupyterapp.shell.activateById({panel}.id);"
                       " jupyterapp.commands.execute('notebook:run-all-cells'); return true;})()")
            done = (f"(() => {{const w = {panel}; const cells = w.content.widgets;"
                    " return cells.every(c => c.model.type !== 'code' || c.model.executionCount)"
                    " && w.sessionContext.session.kernel.status === 'idle';})()")
            browser.wait_for(done, 240, "Run All to finish")
            errors = browser.js("document.querySelectorAll('.jp-OutputArea-output[data-mime-type*=error]').length")
            assert errors == 0, browser.js("document.querySelector('.jp-OutputArea-output[data-mime-type*=error]')"
                                           ".innerText")
            first = browser.wait_for("(() => {const i = document.querySelector('.jupyter-widgets img');"
                                     " return i && i.src.startsWith('blob:') && i.naturalWidth > 0 && i.src;})()",
                                     60, "the playground's first image")
            browser.js("""(() => {const input = document.querySelector('.widget-text input');
                input.value = 'a {subject} on green'; input.dispatchEvent(new Event('input', {bubbles: true}));
                input.dispatchEvent(new Event('change', {bubbles: true}));
                [...document.querySelectorAll('button')].find(b => b.textContent.trim() === 'Draw').click();})()""")
            browser.wait_for(f"(() => {{const i = document.querySelector('.jupyter-widgets img');"
                             f" return i.src !== {json.dumps(first)} && i.naturalWidth > 0;}})()", 60,
                             "the image for the typed prompt")
            browser.js("document.querySelector('.jupyter-widgets img').scrollIntoView()")
            shot = browser.screenshot(tmp_path / "lab.png")
            if os.environ.get("DBKIT_LAB_SCREENSHOT"):
                shutil.copy(shot, os.environ["DBKIT_LAB_SCREENSHOT"])
            assert not runner.is_blank(shot)
            # what the playground put on the page: the PNG behind the image and the oracle's table
            shown = browser.js("""(async () => {const i = document.querySelector('.jupyter-widgets img');
                const blob = await (await fetch(i.src)).blob();
                return await new Promise(done => {const r = new FileReader(); r.onload = () => done(r.result);
                                                  r.readAsDataURL(blob);});})()""")
            table = browser.js("[...document.querySelectorAll('.widget-html table tr')]"
                               ".map(tr => [...tr.children].map(td => td.textContent))")
        finally:
            browser.close()
    # … held against the typed prompt drawn here, from the same run's files, with the widget's
    # defaults (the experiment's sample.* settings). A click that drew the first prompt again
    # (the typed text never reaching the kernel) would show other pixels.
    import base64
    import io

    import numpy as np
    from PIL import Image

    from dbkit import report

    exp, rd = trained[0][0]
    pg = playground.Playground(exp, rd)
    seeds, typed_prompt = exp.params["sample"]["seeds"], "a {subject} on green"
    typed, readings = pg.draw(typed_prompt, seeds=seeds)
    first, _ = pg.draw(exp.params["sample"]["prompts"][0], seeds=seeds)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(typed, first))
    want = report.image_grid([(playground.FINAL, typed)], [f"seed {x}" for x in seeds], title=typed_prompt, scale=3)
    got = Image.open(io.BytesIO(base64.b64decode(shown.split(",", 1)[1]))).convert("RGB")
    assert got.size == want.size, (got.size, want.size)
    diff = int(np.abs(np.asarray(got, int) - np.asarray(want, int)).max())
    # another process (the kernel), same thread count: equal up to float rounding
    assert diff <= 2, f"the page's image differs from the typed prompt's drawing by up to {diff}/255"
    assert readings[0] and table == [["seed", *readings[0]],
                                     *[[str(x), *map(str, r.values())] for x, r in zip(seeds, readings)]]

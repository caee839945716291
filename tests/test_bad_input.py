"""A catalogue of bad input: what a user can get wrong, and what dbkit says.

Each case of :data:`CASES` prepares one mistake in a small world (params file, photos, an
earlier run of the same params with its log and checkpoint, and that run's published report),
runs `dbkit run` and checks the exit code, the message (it names the file, key or notebook
and says what to do, in one or two lines, with no traceback) and that the user's files, the
earlier run and the earlier report are byte for byte as they were. Params mistakes must
change nothing at all. Bad images are catalogued in tests/test_bad_images.py.

The tests after the table cover what is not one `dbkit run`: two processes and the run lock,
a torn train log, leftovers of a killed run, reports kept as versions.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pytest
import torch
from PIL import Image

from dbkit import captions, cli, config, data, report, runner, runs, train, workflow

ROOT = Path(__file__).resolve().parent.parent
PARAMS = f"""extends: {ROOT / 'params' / 'base.yaml'}
experiment: exp
data: {{instance_images: photos}}
prior: {{enabled: false}}
train: {{steps: 4, save_every: 2}}
"""
OK_NOTEBOOK = "print('fine')"


def make_notebook(path: Path, *codes: str) -> Path:
    """A notebook with papermill's parameters cell, then ``codes`` (one cell each)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell('params_path = ""\noverrides = []\nrun_dir = ""')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, *(nbformat.v4.new_code_cell(c) for c in codes)]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


@dataclass
class World:
    """A user's folder: params/exp.yaml, photos/, nbs/ (throwaway notebooks), and an earlier
    run of params/exp.yaml (runs/exp/<h>/ with a log and a checkpoint) with its report."""

    root: Path
    monkeypatch: pytest.MonkeyPatch
    hash: str = ""
    version: str = ""  # the report version (run hash + ablation, merge, report)
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    @property
    def h(self) -> str:
        return self.hash[:12]

    @property
    def v(self) -> str:
        return self.version[:12]

    def write(self, rel: str, content: str | bytes) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    def argv(self, *extra: str, params: str = "params/exp.yaml") -> list[str]:
        return ["run", params, "--notebooks", "nbs", "--no-progress", *extra]

    def hash_of(self, *overrides: str) -> str:
        return config.load(self.root / "params" / "exp.yaml", list(overrides)).hash

    def version_of(self, *overrides: str) -> str:
        return config.load(self.root / "params" / "exp.yaml", list(overrides)).version


def _zip_bytes() -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("data.pkl", b"weights")
    return buf.getvalue()


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def protected(w: World, snap: dict[str, str]) -> dict[str, str]:
    """The user's files, the earlier run's log and checkpoints, every published report version."""
    keep = ("params/", "photos/", f"runs/exp/{w.h}/train_log.jsonl", f"runs/exp/{w.h}/checkpoints/",
            f"reports/exp/{w.v}/")
    return {k: v for k, v in snap.items() if k.startswith(keep)}


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DBKIT_CACHE", str(tmp_path / ".cache"))
    w = World(tmp_path, monkeypatch)
    w.write("params/exp.yaml", PARAMS)
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        (tmp_path / "photos").mkdir(exist_ok=True)
        Image.new("RGB", (16, 16), color).save(tmp_path / "photos" / f"p{i}.png")
    for nb in runner.NOTEBOOKS:
        make_notebook(tmp_path / "nbs" / f"{nb}.ipynb", OK_NOTEBOOK)
    exp = config.load(tmp_path / "params" / "exp.yaml")
    w.hash, w.version = exp.hash, exp.version
    rd = runs.run_dir(exp)
    w.write(f"{rd}/train_log.jsonl", "".join(json.dumps({"step": s, "loss": 0.1}) + "\n" for s in (1, 2, 3)))
    w.write(f"{rd}/checkpoints/checkpoint-000002/state.pt", _zip_bytes())  # torch.save's format
    version = tmp_path / "reports" / "exp" / w.v
    w.write(f"{version}/index.html", "<p>the good report</p>")
    w.write(f"{version}/01_data.html", "<p>the good data page</p>")
    w.write(f"{version}/summary.json", json.dumps({"experiment": "exp", "hash": exp.hash, "metrics": {"m": 1}}))
    w.write(f"{version}/version.json", json.dumps({"hash": exp.hash, "status": "ok"}))
    runner.build_index(tmp_path / "reports")
    yield w
    for undo in w.cleanup:
        undo()


# --------------------------------------------------------------------------- the setups


def write_params(name: str, text: str | bytes) -> Callable[[World], list[str]]:
    def setup(w: World) -> list[str]:
        w.write(f"params/{name}", text)
        return w.argv(params=f"params/{name}")
    return setup


def override(*pairs: str, extra: tuple[str, ...] = ()) -> Callable[[World], list[str]]:
    def setup(w: World) -> list[str]:
        return w.argv(*(x for p in pairs for x in ("-p", p)), *extra)
    return setup


def sidecar(name: str, content: bytes) -> Callable[[World], list[str]]:
    def setup(w: World) -> list[str]:
        w.write(f"photos/{name}", content)
        return w.argv()
    return setup


def holder_process(w: World) -> list[str]:
    """Another process holds the run folder (what a second `dbkit run` of the same params meets)."""
    code = ("import sys, time\nfrom pathlib import Path\nfrom dbkit import runs\n"
            "with runs.lock_run(Path(sys.argv[1]), 'dbkit run params/exp.yaml'):\n"
            "    print('held', flush=True)\n    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, f"runs/exp/{w.h}"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    w.cleanup.append(lambda: (proc.kill(), proc.wait()))
    assert proc.stdout.readline().strip() == "held"
    return w.argv()


def other_params_in_folder(w: World) -> list[str]:
    h = w.hash_of("seed=7")
    w.write(f"runs/exp/{h[:12]}/hash.txt", "deadbeef\n")
    return w.argv("-p", "seed=7")


def read_only_reports(w: World) -> list[str]:
    """As if reports/ were read-only (root ignores chmod, so mkdir itself refuses)."""
    real = Path.mkdir

    def mkdir(self: Path, *a, **kw) -> None:
        if "reports" in self.parts and not self.exists():
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        real(self, *a, **kw)

    w.monkeypatch.setattr(Path, "mkdir", mkdir)
    return w.argv("--only", "01_data")


def fake_papermill(w: World, fail: dict[str, Exception] | None = None) -> None:
    """papermill without a kernel: the output is the input notebook (or the error given)."""
    import papermill

    def execute(src: str, out: str, **kw) -> None:
        nbformat.write(nbformat.read(src, as_version=4), out)
        if fail and Path(src).stem in fail:
            raise fail[Path(src).stem]
        if Path(src).stem == "05_report":  # what the real one leaves where $DBKIT_REPORTS says
            rd = Path(kw["parameters"]["run_dir"])
            report.write_summary(report.reports_dir(rd.parent.name), {
                "experiment": rd.parent.name, "hash": (rd / "hash.txt").read_text().strip(), "metrics": {"m": 2}})

    w.monkeypatch.setattr(papermill, "execute_notebook", execute)


def disk_full_writing_page(w: World) -> list[str]:
    fake_papermill(w)

    def render(nb_path: Path, html_path: Path, **kw) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device", str(html_path))

    w.monkeypatch.setattr(runner, "render_html", render)
    return w.argv("--only", "01_data")


def notebook_03(*codes: str) -> Callable[[World], list[str]]:
    def setup(w: World) -> list[str]:
        make_notebook(w.root / "nbs" / "03_train.ipynb", *codes)
        return w.argv("--only", "03_train")
    return setup


def phone_photos(w: World) -> list[str]:
    for i in range(5):
        w.write(f"phone/IMG_{i:04d}.HEIC", b"\0\0\0\x18ftypheic" + bytes(64))
    return w.argv("-p", "data.instance_images=phone")


def model_file(w: World) -> list[str]:
    w.write("models/sd15.safetensors", b"not a folder")
    return w.argv("-p", "base.model=models/sd15.safetensors")


def cache_not_writable(w: World) -> list[str]:
    """01_data (as the shipped notebook calls it) with the cache where no folder can be made. A
    read-only .cache is simulated by a cache root inside a regular file: the tests run as root,
    which chmod does not stop, and the kernel is another process, which a monkeypatch would miss."""
    w.write("cache-file", "")
    w.monkeypatch.setenv("DBKIT_CACHE", "cache-file/dbkit")
    make_notebook(w.root / "nbs" / "01_data.ipynb", "from dbkit import workflow",
                  "exp, rd = workflow.open_experiment(params_path, overrides, run_dir, stage='data')",
                  "workflow.prepare_data(exp, rd)")
    return w.argv("-p", "prior.enabled=true", "-p", "prior.num_images=2", "--only", "01_data")


LONG = "x" * 130
NO_CUDA = not torch.cuda.is_available()
DUP = f"extends: {ROOT / 'params' / 'base.yaml'}\ntrain:\n  steps: 50\n  lr: 0.001\n  steps: 1000\n"


# --------------------------------------------------------------------------- the catalogue

# (case, setup → argv of `dbkit`, the message (a regex; {h} = the params hash[:12], {v} = the report
#  version[:12]), exit code,
#  whether the run may write new files: a params mistake writes nothing at all)
CASES = [
    ("duplicate key", write_params("dup.yaml", DUP),
     r"^error: params/dup\.yaml: line 5: key 'steps' is set twice in the same block \(first on line 3\); YAML "
     r"would keep only the last one: merge the two into one$", 2, False),
    ("empty params file", write_params("empty.yaml", ""),
     r"^error: params/empty\.yaml: the params file is empty \(or all comments\): write at least "
     r"`extends: base\.yaml` and the keys this experiment changes$", 2, False),
    ("params file of comments only", write_params("comments.yaml", "# extends: base.yaml\n# train: {}\n"),
     r"^error: params/comments\.yaml: the params file is empty \(or all comments\)", 2, False),
    ("params file not UTF-8", write_params("latin.yaml", PARAMS.encode() + b"notes: {hypothesis: caf\xe9}\n"),
     r"^error: params/latin\.yaml: line 6: the params file is not UTF-8 text \(byte 0xe9\): save it as UTF-8",
     2, False),
    ("invalid YAML", write_params("broken.yaml", "train: [steps: 4\n"),
     r"^error: params/broken\.yaml: line 2: invalid YAML \(.*\): fix the syntax there$", 2, False),
    ("params file missing", lambda w: w.argv(params="params/nope.yaml"),
     r"^error: params/nope\.yaml: params file not found \(looked in \S+ and every folder above it\): pass a path "
     r"relative to the project root, e.g\. params/demo\.yaml$", 2, False),
    ("extends a missing file", write_params("orphan.yaml", "extends: nope.yaml\n"),
     r"^error: params/orphan\.yaml: 'extends: nope\.yaml' not found \(looked for params/nope\.yaml\)", 2, False),
    ("caption sidecar not UTF-8", sidecar("p0.txt", b"a photo of sks star, caf\xe9\n"),
     r"^error: photos/p0\.txt: line 1: the caption sidecar is not UTF-8 text \(byte 0xe9\): save it as UTF-8",
     2, False),
    ("metadata.jsonl not UTF-8", sidecar("metadata.jsonl", b'{"file": "p0.png"}\n{"file": "p1.png", "c": "\xff"}\n'),
     r"^error: photos/metadata\.jsonl: line 2: metadata\.jsonl is not UTF-8 text \(byte 0xff\)", 2, False),
    ("experiment name too long", override(f"experiment={LONG}"),
     rf"^error: command line: experiment name {'x' * 40}… is 130 characters long; it names folders, whose names "
     r"file systems limit: use at most 120 characters$", 2, False),
    ("ablation variant name too long", override(f"experiment={'y' * 115}", "ablation.vary={train.lora.rank: [16]}"),
     r"^error: params/exp\.yaml: ablation variant train\.lora\.rank=16: .*experiment name y{40}… is 124 "
     r"characters long", 2, False),
    ("typo in a key", override("train.stpes=10"),
     r"^error: command line: unknown key 'train\.stpes' — did you mean 'train\.steps'\?$", 2, False),
    ("wrong type", override("train.steps=many"),
     r"^error: command line: 'train\.steps' must be an integer, got 'many' \(str\)", 2, False),
    ("override without =", override("train.steps"),
     r"^error: command line: override 'train\.steps' is not key=value: write e\.g\. train\.lora\.rank=32$", 2, False),
    ("photo folder missing", override("data.instance_images=nophotos"),
     r"^error: command line: 'data\.instance_images' folder 'nophotos' does not exist", 2, False),
    ("unknown toy-world subject", override("data.instance_images=toyworld:unicorn"),
     r"^error: command line: 'data\.instance_images' names unknown toy-world subject or style 'unicorn'", 2, False),
    ("base model folder missing", override("base.model=models/sd/none"),
     r"^error: command line: 'base\.model' folder 'models/sd/none' does not exist", 2, False),
    ("base.family contradicts the model", override("base.family=sdxl"),
     r"^error: command line: base\.family=sdxl but \S+/toyworld/base is a sd2 model; set base\.family: auto or "
     r"sd2$", 2, False),
    ("nothing to train", override("train.unet=false", "train.text_encoder=false"),
     r"^error: params/exp\.yaml: nothing to train: set train\.unet, train\.text_encoder or "
     r"train\.pivotal\.enabled to true$", 2, False),
    ("pivotal tuning without a trigger", override("train.pivotal.enabled=true", "captions.trigger=none"),
     r"^error: command line: train\.pivotal\.enabled needs a token in the captions but captions\.trigger is none",
     2, False),
    ("prior on, zero class images", override("prior.enabled=true", "prior.num_images=0"),
     r"^error: command line: 'prior\.num_images' is 0 but prior\.enabled is true and data\.class_images is empty",
     2, False),
    ("Prodigy with AdamW's lr", override("train.optimizer=prodigy"),
     r"^error: \S+/params/base\.yaml: 'train\.lr' is 0\.002 but train\.optimizer=prodigy adapts its own step "
     r"size and expects train\.lr≈1\.0: set train\.lr: 1\.0 and train\.text_encoder_lr: 1\.0$", 2,
     False),
    ("DoRA on listed convolutions", override("train.method=dora", "train.lora.unet_targets=[to_q,conv1,proj_in]"),
     r"^error: command line: 'train\.lora\.unet_targets' lists conv1, proj_in, convolutions in this base's UNet, "
     r"but train\.method is dora", 2, False),
    ("LoKr with the text encoder", override("train.method=lokr"),
     r"^error: command line: train\.method is lokr, which trains the UNet only \(diffusers loads no LoKr into a "
     r"text encoder\): set train\.text_encoder: false$", 2, False),
    ("EDM on a DDPM-trained base", override("train.prediction=edm"),
     r"^error: command line: 'train\.prediction' is edm but base\.model is a sd2 model, trained for DDPM "
     r"timesteps: EDM training needs an EDM-trained base", 2, False),
    ("min-SNR with EDM", override("train.prediction=edm", "train.min_snr_gamma=5"),
     r"^error: command line: 'train\.min_snr_gamma' is defined for DDPM timesteps, not EDM's σ", 2, False),
    pytest.param("fp16 without a GPU", override("train.mixed_precision=fp16"),
                 r"^error: command line: 'train\.mixed_precision' is fp16, which needs a CUDA GPU, and this "
                 r"machine has none: use bf16 or no$", 2, False,
                 marks=pytest.mark.skipif(not NO_CUDA, reason="this machine has a GPU")),
    pytest.param("adamw8bit without a GPU", override("train.optimizer=adamw8bit"),
                 r"^error: command line: 'train\.optimizer' is adamw8bit but .*: use train\.optimizer: adamw$", 2,
                 False, marks=pytest.mark.skipif(not NO_CUDA, reason="this machine has a GPU")),
    pytest.param("tracker not installed", override("train.log_with=wandb"),
                 r"^error: command line: 'train\.log_with' is wandb but it is not installed: `pip install wandb`",
                 2, False, marks=pytest.mark.skipif(importlib.util.find_spec("wandb") is not None,
                                                    reason="wandb is installed")),
    ("--only names no notebook", lambda w: w.argv("--only", "07_magic"),
     r"^error: --only '07_magic': not a notebook; choose from 01_data, 02_captions, 03_train, 04_ablations, "
     r"05_report$", 2, False),
    ("notebooks folder not found", lambda w: w.argv("--notebooks", "elsewhere/nbs"),
     r"^error: elsewhere/nbs: notebook\(s\) not found: 01_data\.ipynb, .*05_report\.ipynb: point --notebooks at "
     r"the folder that holds them, or leave it out to use dbkit's own \(.*/notebooks\)$", 2, False),
    ("run folder in use by another process", holder_process,
     r"^error: runs/exp/{h}/run\.lock: this run folder is in use by pid \d+ on \S+ since \S+ \(`dbkit run "
     r"params/exp\.yaml`\): wait until that run ends; if that process is gone, delete runs/exp/{h}/run\.lock and "
     r"run again$", 2, False),
    ("run folder holds other params", other_params_in_folder,
     r"^error: runs/exp/\w{12} holds a run with params hash deadbeef, not \w{64}: move that folder away", 2, True),
    ("reports folder read-only", read_only_reports,
     r"^error: reports/exp/\.staging-{v}/exp: Permission denied: not writable here: make it writable, or write "
     r"elsewhere \(--reports <folder> for reports\)$", 2, True),
    ("disk full writing a page", disk_full_writing_page,
     r"^error: 01_data\.ipynb: reports/exp/\.staging-{v}/exp/01_data\.html: No space left on device: the disk is "
     r"full: free some space", 2, True),
    ("a cell fails: the good report stays", notebook_03("raise ValueError('loss is nan at step 3')"),
     r"^FAILED: 03_train\.ipynb, cell \d+: ValueError: loss is nan at step 3\n  see reports/exp/failed-{v}/"
     r"03_train\.html; the last good report is unchanged: reports/exp/{v}/index\.html$", 1, True),
    ("disk full inside a notebook", notebook_03("raise OSError(28, 'No space left on device', 'runs/exp/ckpt')"),
     r"^FAILED: 03_train\.ipynb, cell \d+: OSError: \[Errno 28\] No space left on device: 'runs/exp/ckpt' — the disk "
     r"is full: free some space .*, then `dbkit run params/exp\.yaml --only 03_train --notebooks nbs` \(training "
     r"resumes from its latest checkpoint\)\n  see reports/exp/failed-{v}/03_train\.html", 1, True),
    ("kernel dies (out of memory)", notebook_03("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"),
     r"^FAILED: 03_train\.ipynb: DeadKernelError: Kernel died — the notebook's Python process died, most often "
     r"for lack of memory: lower train\.batch_size or data\.resolution, or close other programs, then `dbkit run "
     r"params/exp\.yaml --only 03_train --notebooks nbs` \(training resumes from its latest checkpoint; the "
     r"process's last output is in runs/exp/{h}/kernel-03_train\.log\)", 1, True),
    ("photo folder of .heic only", phone_photos,
     r"^error: command line: 'data\.instance_images' folder 'phone' has no images dbkit reads; it holds 5 file\(s\) "
     r"dbkit does not read: IMG_0000\.HEIC, IMG_0001\.HEIC, IMG_0002\.HEIC and 2 more; dbkit reads \.png \.jpg "
     r"\.jpeg \.webp \.bmp: convert them to PNG or JPEG \(HEIC: export as JPEG, or `pip install pillow-heif` and "
     r"re-save with Pillow\)$", 2, False),
    ("base.model is a file", model_file,
     r"^error: command line: base\.model: models/sd15\.safetensors is a file; point it at the model folder \(the "
     r"one with model_index\.json\) or 'toyworld'$", 2, False),
    ("params path is a folder", lambda w: w.argv(params="params"),
     r"^error: params is a folder, not a params file: name a \.yaml file, e\.g\. params/demo\.yaml \(or "
     r"params/notes/\*\.yaml\)$", 2, False),
    ("resolution below the base's latent grid", override("data.resolution=8"),
     r"^error: command line: 'data\.resolution' is 8, but this sd2 base \(toyworld\) needs a multiple of 16 \(its "
     r"VAE and UNet downsample 16×\), so at least 16: use 16$", 2, False),
    ("cache folder not writable", cache_not_writable,
     r"^FAILED: 01_data\.ipynb, cell \d+: CacheNotWritable: cache-file/dbkit: the cache folder is not writable \(Not "
     r"a directory: cache-file/dbkit/class_images/\w+\): make it writable, or set DBKIT_CACHE=<a writable folder> "
     r"to move the cache\n  see reports/exp/failed-\w{12}/01_data\.html", 1, True),
]


@pytest.mark.parametrize("case,setup,message,code,writes", CASES, ids=[
    c.values[0] if hasattr(c, "values") else c[0] for c in CASES])
def test_bad_input(world: World, capsys: pytest.CaptureFixture, case: str, setup, message: str, code: int,
                   writes: bool) -> None:
    argv = setup(world)
    before = snapshot(world.root)
    capsys.readouterr()

    assert cli.main(argv) == code

    err = capsys.readouterr().err.strip()
    assert re.search(message.replace("{h}", world.h).replace("{v}", world.v), err, re.M | re.S), err
    assert "Traceback" not in err and len(err.splitlines()) <= 2, err
    after = snapshot(world.root)
    if writes:
        assert protected(world, after) == protected(world, before)
    else:
        assert after == before  # nothing written, not even a run folder


# --------------------------------------------------------------------------- beyond one `dbkit run`


def test_ctrl_c_says_where_training_stopped_and_how_to_resume(world: World) -> None:
    make_notebook(world.root / "nbs" / "03_train.ipynb", (
        "import json, time, zipfile\nfrom pathlib import Path\nrd = Path(run_dir)\n"
        "for step in range(1, 6):\n"
        "    (rd / 'train_log.jsonl').open('a').write(json.dumps({'step': step}) + '\\n')\n"
        "    if step % 2 == 0:\n        (rd / 'checkpoints' / f'checkpoint-{step:06d}').mkdir(parents=True)\n"
        # a zip, as torch.save writes: progress names only checkpoints a resume can load
        "        zipfile.ZipFile(rd / 'checkpoints' / f'checkpoint-{step:06d}' / 'state.pt', 'w').close()\n"
        "(rd / 'stepping').write_text('')\ntime.sleep(120)"))
    h = world.hash_of("seed=1")[:12]
    before = protected(world, snapshot(world.root))
    proc = subprocess.Popen([sys.executable, "-m", "dbkit.cli", *world.argv("-p", "seed=1", "--only", "03_train")],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    world.cleanup.append(lambda: proc.poll() is None and proc.kill())
    for _ in range(600):
        if (world.root / "runs" / "exp" / h / "stepping").exists():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # Ctrl-C

    assert proc.wait(60) == 130
    err = proc.stderr.read().strip()
    assert err == (f"stopped at step 5; `dbkit run params/exp.yaml -p seed=1 --only 03_train --notebooks nbs` "
                   f"resumes from step 4 (the latest checkpoint, in runs/exp/{h}/checkpoints)"), err
    assert not (world.root / "runs" / "exp" / h / "run.lock").exists()  # released, the kernel is gone
    assert not list((world.root / "reports" / "exp").glob(".staging-*"))
    assert protected(world, snapshot(world.root)) == before


TRAINER = """
import json, sys, time
from pathlib import Path
from dbkit import runs
rd, go = Path(sys.argv[1]), Path(sys.argv[2])
while not go.exists():
    time.sleep(0.005)
try:
    with runs.lock_run(rd, "trainer " + sys.argv[3]):
        for step in range(1, 21):
            with open(rd / "train_log.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "by": sys.argv[3]}) + "\\n")
            time.sleep(0.05)
except runs.RunLocked as e:
    print(e, file=sys.stderr)
    sys.exit(2)
"""


def test_two_processes_one_run_folder_one_trains_the_other_is_told_who(tmp_path: Path) -> None:
    rd, go = tmp_path / "runs" / "exp" / "abc", tmp_path / "go"
    rd.mkdir(parents=True)
    procs = [subprocess.Popen([sys.executable, "-c", TRAINER, str(rd), str(go), name], stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}) for name in ("A", "B")]
    time.sleep(1.0)  # both imported and waiting
    go.write_text("")  # started together
    codes = sorted((p.wait(60), p.stderr.read()) for p in procs)

    assert [c for c, _ in codes] == [0, 2]
    winner = json.loads((rd / "train_log.jsonl").read_text().splitlines()[0])["by"]
    assert re.fullmatch(rf"{re.escape(str(rd))}/run\.lock: this run folder is in use by pid \d+ on \S+ since \S+ "
                        rf"\(`trainer {winner}`\): wait until that run ends; if that process is gone, delete .*\n",
                        codes[1][1])
    steps = [json.loads(x)["step"] for x in (rd / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))  # exactly one line per step
    assert not (rd / "run.lock").exists()


SLOW_HOLDER = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(0.5)  # the gap between taking the lock and writing who holds it, stretched
os.ftruncate(fd, 0)
os.write(fd, json.dumps({"pid": os.getpid(), "host": "h", "since": "now", "command": "slow writer",
                         "token": "t"}).encode())
time.sleep(5)
"""


@pytest.mark.parametrize("left_by_a_killed_run", [False, True])
def test_a_loser_that_comes_before_the_holder_wrote_its_record_still_names_the_holder(
        tmp_path: Path, left_by_a_killed_run: bool) -> None:
    lock = tmp_path / runs.LOCK_FILE
    if left_by_a_killed_run:  # the file still names a dead process until the new holder writes
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "since": "yesterday",
                                    "command": "killed run", "token": "old"}))
    with subprocess.Popen([sys.executable, "-c", SLOW_HOLDER, str(lock)], stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout.readline().strip() == "locked"
            with pytest.raises(runs.RunLocked, match=rf"in use by pid {holder.pid} on h since now \(`slow writer`\)"):
                with runs.lock_run(tmp_path, "second"):
                    pass
        finally:
            holder.kill()


def test_run_training_refuses_a_folder_another_process_holds(world: World) -> None:
    holder_process(world)
    exp = config.load(world.root / "params" / "exp.yaml")
    rd = world.root / "runs" / "exp" / world.h
    log = (rd / "train_log.jsonl").read_bytes()
    with pytest.raises(runs.RunLocked, match=r"in use by pid \d+ .*`dbkit run params/exp\.yaml`"):
        workflow.run_training(exp, rd, progress=False)  # e.g. 03_train opened in JupyterLab meanwhile
    assert (rd / "train_log.jsonl").read_bytes() == log


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / runs.LOCK_FILE
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": "here", "since": "yesterday"}))
    (tmp_path / ".train_log.jsonl.abc.tmp").write_text("half")  # an atomic write cut short
    (tmp_path / "checkpoints" / ".tmp-000004").mkdir(parents=True)  # a checkpoint being saved
    with runs.lock_run(tmp_path, "next run") as holder:
        assert holder["pid"] == os.getpid() and json.loads(lock.read_text())["command"] == "next run"
        assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoints", "run.lock"]
        with runs.lock_run(tmp_path):  # nested in the same process: passes through
            pass
        assert lock.exists()
    assert not lock.exists()


def test_a_torn_last_line_of_the_train_log_is_skipped_with_a_warning(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')  # killed mid-write
    assert [r["step"] for r in train.read_train_log(log)] == [1, 2]
    assert capsys.readouterr().err.strip() == (f"warning: {log}: line 3 is incomplete or not a JSON record (a run "
                                               "stopped while writing it?); skipped")
    assert runs.training_progress(tmp_path) == (2, 0)


def test_dora_alone_works_leaving_the_convolutions_out(world: World, capsys: pytest.CaptureFixture) -> None:
    p = config.load(world.root / "params" / "exp.yaml", ["train.method=dora"]).params
    assert p["train"]["lora"]["unet_targets"] == ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
    assert "left proj_in, proj_out, conv1, conv2 out of the default train.lora.unet_targets" in capsys.readouterr().err


def test_dbkit_finds_its_notebooks_from_another_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert runner.find_notebooks(None, list(runner.NOTEBOOKS)) == ROOT / "notebooks"


def test_reports_are_versions_and_a_failed_rerun_keeps_the_good_set(world: World,
                                                                     capsys: pytest.CaptureFixture) -> None:
    from papermill import PapermillExecutionError

    fake_papermill(world)
    reports = world.root / "reports"
    world.write(f"reports/exp/.staging-{world.v}/exp/01_data.ipynb", "{}")  # left by a killed run
    world.write("reports/exp/.05_report.abcd.ipynb", "{}")  # a temp notebook of an older dbkit
    other = world.version_of("seed=1")[:12]
    assert cli.main(world.argv("-p", "seed=1", "--only", "01_data", "05_report")) == 0  # other params
    assert cli.main(world.argv("--only", "02_captions")) == 0  # the same params: 02 added to its version
    good = snapshot(reports / "exp" / world.v)
    fake_papermill(world, {"03_train": PapermillExecutionError(1, 2, "x", "ValueError", "boom", [])})
    assert cli.main(world.argv("--only", "02_captions", "03_train")) == 1

    assert snapshot(reports / "exp" / world.v) == good  # no mixed set: the good pages as they were
    assert {"01_data.html", "02_captions.html", "index.html"} <= set(good)
    assert sorted(p.name for p in (reports / "exp").iterdir()) == sorted(
        [world.v, other, f"failed-{world.v}", "index.html"])
    assert sorted(os.listdir(reports / "exp" / f"failed-{world.v}")) == [
        "02_captions.html", "02_captions.ipynb", "03_train.html", "03_train.ipynb", "version.json"]
    index = (reports / "index.html").read_text()
    assert f'href="exp/{world.v}/index.html"' in index and f'href="exp/{other}/index.html"' in index
    versions = (reports / "exp" / "index.html").read_text()
    assert versions.count("<tr><td>") == 3 and "failed in 03_train" in versions


def test_a_flat_report_of_an_older_dbkit_becomes_a_version(world: World) -> None:
    fake_papermill(world)
    flat = world.root / "reports" / "old"
    world.write("reports/old/index.html", "<p>old report</p>")
    world.write("reports/old/03_train.html", "<p>old training</p>")
    world.write("reports/old/summary.json", json.dumps({"experiment": "old", "hash": "f" * 64}))
    assert cli.main(world.argv("-p", "experiment=old", "--only", "01_data")) == 0
    assert (flat / ("f" * 12) / "index.html").read_text() == "<p>old report</p>"
    assert (flat / ("f" * 12) / "03_train.html").read_text() == "<p>old training</p>"
    assert 'href="ffffffffffff/index.html"' in (flat / "index.html").read_text()


# --------------------------------------------------------------------------- training on the tiny base


def tiny_params(*extra: str) -> dict:
    return config.load("params/base.yaml", ["train.steps=6", "train.batch_size=1", "train.save_every=2",
                                            "train.keep_checkpoints=3", "train.sample_every=0",
                                            "prior.enabled=false", "experiment=t", *extra]).params


def train_tiny(p: dict, rd: Path, **kw) -> Path:
    records = captions.build_captions(data.build_manifest(data.resolve_folder(p["data"]["instance_images"])),
                                      captions.effective_params(p))
    return train.train(p, rd, records, base_path=Path(p["base"]["model"]), family="sd15", progress=False, **kw)


def cut_in_half(path: Path) -> None:
    """What a full disk or an interrupted copy leaves: the first half of the file."""
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def test_a_damaged_checkpoint_is_passed_over_for_the_one_before_it(in_tmp: Path, tiny_base: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    p, rd = tiny_params(f"base.model={tiny_base}"), in_tmp / "run"
    train_tiny(p, rd, max_steps=4)  # checkpoints at steps 2 and 4
    bad = rd / "checkpoints" / "checkpoint-000004" / "state.pt"
    uninterrupted = torch.load(bad, weights_only=False)["params"]
    cut_in_half(bad)
    capsys.readouterr()

    train_tiny(p, rd, max_steps=4)  # steps 3 and 4 again, from checkpoint 2

    assert re.search(rf"^warning: {re.escape(str(bad))} \(PytorchStreamReader failed reading zip archive: failed "
                     r"finding central directory\): damaged checkpoint, not loadable; resumed from checkpoint-000002 "
                     r"instead$", capsys.readouterr().err, re.M)
    assert [r["step"] for r in train.read_train_log(rd / "train_log.jsonl")] == [1, 2, 3, 4]
    again = torch.load(bad, weights_only=False)["params"]  # saved anew over the damaged one
    assert again.keys() == uninterrupted.keys() and all(torch.equal(again[k], uninterrupted[k]) for k in again)

    for ckpt in (rd / "checkpoints").iterdir():
        cut_in_half(ckpt / "state.pt")
    train_tiny(p, rd, max_steps=2)
    assert re.search(r"^warning: \S+/checkpoint-000004/state\.pt \(.*\); \S+/checkpoint-000002/state\.pt \(.*\): "
                     r"damaged checkpoint, not loadable, and no other checkpoint is left: training starts again "
                     r"from step 0$", capsys.readouterr().err, re.M)
    assert [r["step"] for r in train.read_train_log(rd / "train_log.jsonl")] == [1, 2]


def test_a_nan_loss_advises_only_what_the_params_have_not_tried(in_tmp: Path, tiny_base: Path) -> None:
    p = tiny_params(f"base.model={tiny_base}", "train.lr=1e30", "train.steps=30", "train.save_every=10")
    assert p["train"]["max_grad_norm"] == 1.0  # clipping is on: advising it would send the user in a circle
    with pytest.raises(train.TrainingError) as e:
        train_tiny(p, in_tmp / "run")
    assert re.fullmatch(r"loss became \S+ at step \d: lower train\.lr \(now 1e\+30\); no checkpoint was saved "
                        r"before it \(train\.save_every 10\)", str(e.value)), e.value
    t = p["train"] | {"max_grad_norm": 0.0, "mixed_precision": "bf16"}
    assert train.nan_message(t, 11, float("nan"), Path("ck/checkpoint-000010")) == (
        "loss became nan at step 12: lower train.lr (now 1e+30) or set train.max_grad_norm: 1.0 or set "
        "train.mixed_precision: no (now bf16); last good checkpoint: ck/checkpoint-000010")


def test_versions_pages_do_not_change_on_a_fresh_clone(tmp_path: Path) -> None:
    """A clone gives every file the checkout's time: rebuilding the index there (as `dbkit run`
    and `dbkit report` do) must leave each committed versions page byte for byte as it is."""
    reports = tmp_path / "reports"
    shutil.copytree(ROOT / "reports", reports)
    now = time.time()
    for i, f in enumerate(sorted(reports.rglob("*"))):  # later folders older: against the publication order
        os.utime(f, (now - i, now - i))

    runner.build_index(reports, notes_dir=ROOT / "params" / "notes")

    pages = sorted(ROOT.glob("reports/*/index.html"))
    assert len(pages) > 10
    assert [p.parent.name for p in pages if (reports / p.parent.name / "index.html").read_bytes() != p.read_bytes()] \
        == []
